"""What crosses a link between two stage workers: a header, the encoded tensor, the mask.

A message is a fixed-size int64 header (ndim, dtype, has-mask flag, codec, up to 5 dims,
arrival time) followed by the tensor as its link's codec packs it (:mod:`splitlearn.codecs`)
and, for an activation, the padding mask. Sends are posted without waiting; the step waits
for them all before it ends (:meth:`Transport.wait_sends`). Messages between two ranks
arrive in the order they were posted.

Link rehearsal (``runtime.emulate_links``): the sender stamps each message with the time the
real link would deliver it (one transfer at a time per direction, latency overlapping the
next), and the receiver does not hand it over before then.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from cluster.topology import Topology
from partitioners.choices import CODECS
from splitlearn import codecs

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool, torch.float64]
HEADER_LEN = 10  # ndim, dtype, has-mask flag, codec, up to 5 dims, arrival time (ns, 0 = now)
_CODECS = list(CODECS)


def header(t: torch.Tensor, has_mask: bool, codec: str = "none", arrival_ns: int = 0) -> torch.Tensor:
    h = torch.zeros(HEADER_LEN, dtype=torch.int64)
    h[0], h[1], h[2], h[3] = t.dim(), DTYPES.index(t.dtype), int(has_mask), _CODECS.index(codec)
    h[4 : 4 + t.dim()] = torch.tensor(t.shape)
    h[HEADER_LEN - 1] = arrival_ns
    return h


def parse_header(h: torch.Tensor) -> tuple[list[int], torch.dtype, bool, str, int]:
    """Shape, dtype, has-mask flag, codec and arrival time (ns) of a received header."""
    ndim = int(h[0])
    return [int(x) for x in h[4 : 4 + ndim]], DTYPES[int(h[1])], bool(h[2]), _CODECS[int(h[3])], int(h[-1])


class LinkClock:
    """Link rehearsal: when a transfer posted now would arrive on the real link."""

    def __init__(self, topology: Topology, device_name: str, device_of: Callable[[int], str]):
        self.topology, self.device_name, self.device_of = topology, device_name, device_of
        self._free_ns: dict[int, int] = {}  # when each outgoing wire is free, by peer rank

    def arrival_ns(self, peer: int, nbytes: int) -> int:
        """One transfer at a time per direction; latency overlaps the next. 0 on a free link."""
        link = self.topology.link(self.device_name, self.device_of(peer))
        if link.bandwidth_mbps == float("inf"):
            return 0
        now = time.time_ns()
        start = max(now, self._free_ns.get(peer, 0))
        wire_ns = int(nbytes * 8 / (link.bandwidth_mbps * 1e6) * 1e9)
        self._free_ns[peer] = start + wire_ns
        return start + wire_ns + int(link.latency_ms * 1e6)


class Transport:
    """Sends and receives of one worker over its process groups (:class:`splitlearn.stage.fabric.Group`).

    ``device``: where this worker computes; a message travels on the GPU only over an NCCL
    group from a CUDA worker, through host memory otherwise. ``clock``: link rehearsal, or None.
    """

    def __init__(self, device: torch.device, clock: LinkClock | None):
        self.device, self.clock = device, clock
        self._pending: list[tuple[Any, torch.Tensor]] = []  # (work, tensor) of sends posted this step
        self._inboxes: dict[tuple[int, int], _Inbox] = {}  # (id of group, src): receives posted ahead

    def _on_gpu(self, group: Any) -> bool:
        return self.device.type == "cuda" and group.backend == "nccl"

    def send(self, t: torch.Tensor, dst: int, group: Any, codec: str = "none", mask: torch.Tensor | None = None) -> int:
        """Post the header, the encoded tensor (and the padding mask) to rank ``dst`` without
        waiting. Returns the bytes sent."""
        gpu = self._on_gpu(group)
        t = t.detach().contiguous()
        parts = codecs.encode(t if gpu else _to_host(t), codec)
        if mask is not None:
            parts.append(mask.contiguous() if gpu else _to_host(mask.contiguous()))
        nbytes = HEADER_LEN * 8 + codecs.wire_bytes(parts)
        arrival = self.clock.arrival_ns(dst, nbytes) if self.clock is not None else 0
        h = header(t, mask is not None, codec, arrival)
        for part in [h.to(t.device) if gpu else h, *parts]:
            self._pending.append((group.isend(part, dst), part))
        return nbytes

    def wait_sends(self) -> None:
        """Wait for every send posted since the last call."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def prepost(self, wanted: list[tuple[int, Any]]) -> None:
        """Post now the receives ``wanted`` (``(src, group)``, in the order :meth:`recv` will
        take them); each peer's messages are received in a thread of their own, in order.
        NCCL groups are left out (their receives run on the GPU's stream, at the action)."""
        counts: dict[tuple[int, int], tuple[int, Any, int]] = {}
        for src, group in wanted:
            if self._on_gpu(group):
                continue
            key = (id(group), src)
            assert key not in self._inboxes, "prepost() again before the last posted receives were taken"
            n = counts[key][2] if key in counts else 0
            counts[key] = (src, group, n + 1)
        for key, (src, group, n) in counts.items():
            self._inboxes[key] = _Inbox(self, src, group, n)

    def _receive(self, src: int, group: Any) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """The next message's header, encoded parts and mask, as they arrived."""
        where = self.device if self._on_gpu(group) else torch.device("cpu")
        h = torch.empty(HEADER_LEN, dtype=torch.int64, device=where)
        group.recv(h, src)
        h = h.cpu()
        shape, dtype, has_mask, codec, _ = parse_header(h)
        pin = self.device.type == "cuda" and where.type == "cpu"  # bound for this worker's GPU
        parts = codecs.payload_like(shape, dtype, codec, where, pin=pin)
        for part in parts:
            group.recv(part, src)
        mask = None
        if has_mask:
            mask = torch.empty(shape[:2], dtype=torch.int64, device=where, pin_memory=pin)
            group.recv(mask, src)
        return h, parts, mask

    def recv(self, src: int, group: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next tensor (and mask) from rank ``src``, decoded, on this worker's device."""
        key = (id(group), src)
        inbox = self._inboxes.get(key)
        if inbox is not None:
            try:
                h, parts, mask = inbox.take()
            finally:
                if inbox.left == 0:  # all taken, or failed
                    del self._inboxes[key]
        else:
            h, parts, mask = self._receive(src, group)
        shape, dtype, has_mask, codec, arrival = parse_header(h)
        if arrival:  # link rehearsal: the transfer is not here before the real link would deliver it
            wait = (arrival - time.time_ns()) / 1e9
            if wait > 0:
                time.sleep(wait)
        # pinned host buffers (a CUDA worker's, see _receive) reach the GPU without a staging copy,
        # queued on the stream the actions run on; the codec's decoding runs there too
        parts = [p.to(self.device, non_blocking=True) for p in parts]
        t = codecs.decode(parts, dtype, codec)
        return t, (None if mask is None else mask.to(self.device, non_blocking=True))


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` in host memory; a CUDA tensor is copied into pinned memory (torch's caching host
    allocator: reused once nothing uses it) and waited for. ``Tensor.cpu()`` copies into
    pageable memory, which the driver stages through its own pinned buffer: measured on the
    H200, 6.3-6.7 ms of the GPU's stream for a 16.8 MB gradient, twice a step on an E2 run's
    critical path."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()  # gloo reads it as soon as it is posted
    return host


class _Inbox:
    """``count`` messages from ``src`` over ``group``, received in a thread as they come."""

    def __init__(self, transport: Transport, src: int, group: Any, count: int):
        self.left = count
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(transport, src, group, count), name=f"splitlearn-recv-{src}", daemon=True
        )
        self._thread.start()

    def _run(self, transport: Transport, src: int, group: Any, count: int) -> None:
        try:
            for _ in range(count):
                self._q.put(transport._receive(src, group))
        except BaseException as e:  # handed to the action that waits for the message
            self._q.put(e)

    def take(self) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        item = self._q.get()
        if isinstance(item, BaseException):
            self.left = 0
            raise item
        self.left -= 1
        if self.left == 0:
            self._thread.join()
        return item
