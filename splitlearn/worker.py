"""The stage worker: one segment of the model on one device, run by its action list.

A plain class, unit-testable without Ray; :mod:`splitlearn.runtime` wraps it with
``ray.remote`` when it places it. Life cycle, each step driven by one call from the driver:

1. ``prepare()``: build the model, cut this stage's segment, make its optimizer, and on the
   data-owning first stage read the data. User errors surface here, before any process
   group exists, so no peer is left waiting.
2. ``init_dist(addr, port)``: join the one ``torch.distributed`` world (one rank per stage
   replica) and create one group per link, so independent links never serialise; a group
   per replicated stage; DeepSpeed's engine for an offloaded stage.
3. ``run_step(step)``: execute this stage's actions for the step and report its metrics.
4. ``save_checkpoint(dir)`` / ``load_checkpoint(dir)``: tensors and optimizer state by name.

Replicas: a stage on R identical devices runs R workers; replica r takes the micro-batches m
with m % R == r (its action list is the stage's, filtered), and the replicas sum their
gradients in their group before the step (DeepSpeed does it for an offloaded stage).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cluster.conf import to_typed
from cluster.topology import topology_from_container
from partitioners import schedule as S
from partitioners.plan import Plan
from splitlearn import codecs
from splitlearn.errors import ConfigError, DataError, StageFailed
from splitlearn.optim import clip_coefficient, lr_at, make_optimizer, set_lr, sum_of_squares

log = logging.getLogger(__name__)

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool]
_CODECS = list(codecs.CODECS)
_HEADER_LEN = 10  # ndim, dtype, has-mask flag, codec, up to 5 dims, arrival time (ns, 0 = now)


def _header(t: torch.Tensor, has_mask: bool, codec: int = 0, arrival_ns: int = 0) -> torch.Tensor:
    h = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    h[0], h[1], h[2], h[3] = t.dim(), _DTYPES.index(t.dtype), int(has_mask), codec
    h[4 : 4 + t.dim()] = torch.tensor(t.shape)
    h[_HEADER_LEN - 1] = arrival_ns
    return h


def _ray_node_id() -> str:
    """The Ray node this worker runs on (the host name when not under Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    return socket.gethostname()


class _ActionTimer:
    """Times a step's actions. On a CPU: host wall time. On a GPU, where an action returns once
    its kernels are queued, CUDA events on the compute stream give each action's span on the
    device (a receive: the stream waiting for its data; the step's one wait is at the end).
    With ``trace``, each action's ``[kind, mb, start ms, end ms]`` on the wall clock (ms since
    the epoch: comparable across workers on one host); on a GPU the device spans placed on the
    wall clock at a synchronisation when the step begins. ``STEP``'s span in the trace is its
    own compute, after its waits."""

    def __init__(self, gpu: bool, trace: bool):
        self.gpu = gpu
        self.trace: list[list] | None = [] if trace else None
        self.rows: list[tuple[S.Action, float, float, Any, Any, int, int]] = []  # act, host s, wait s, events, walls
        self.ref = None  # on a GPU with trace: the event recorded at the step's synchronised start
        if gpu and trace:
            torch.cuda.synchronize()
            self.ref_ns = time.time_ns()
            self.ref = self._event()

    @staticmethod
    def _event():
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def start(self, act: S.Action) -> None:
        self._t0, self._wall0 = time.perf_counter(), time.time_ns()
        timed = act.kind in (S.F, S.B, S.STEP) or self.ref is not None
        self._ev0 = self._event() if self.gpu and timed else None

    def end(self, act: S.Action, wait_s: float = 0.0) -> None:
        """``wait_s``: the part of the action's host time spent waiting on others."""
        host_s = time.perf_counter() - self._t0
        ev1 = self._event() if self._ev0 is not None else None
        self.rows.append((act, host_s, wait_s, self._ev0, ev1, self._wall0, time.time_ns()))

    def durations(self) -> list[tuple[str, float, float]]:
        """Per action: kind, seconds, seconds of it spent waiting; fills ``trace``."""
        if self.gpu and self.rows and self.rows[-1][4] is not None:
            self.rows[-1][4].synchronize()
        out = []
        for act, host_s, wait_s, ev0, ev1, wall0, wall1 in self.rows:
            dt = ev0.elapsed_time(ev1) / 1e3 if ev0 is not None else host_s
            wait_s = min(wait_s, dt)
            out.append((act.kind, dt, wait_s))
            if self.trace is not None:
                if self.ref is not None:
                    start = self.ref_ns / 1e6 + self.ref.elapsed_time(ev0)
                    end = start + dt * 1e3
                else:
                    start, end = wall0 / 1e6, wall1 / 1e6
                if act.kind == S.STEP:
                    start = end - (dt - wait_s) * 1e3
                self.trace.append([act.kind, act.mb, start, end])
        return out


class _Shards:
    """A checkpoint's tensors by key, each file opened once (closed with ``stack``)."""

    def __init__(self, found: dict[str, tuple[Path, str]], stack: ExitStack):
        from safetensors import safe_open

        self._open = lambda path: stack.enter_context(safe_open(str(path), framework="pt"))
        self.found, self.handles = found, {}

    def _file(self, key: str):
        path, k = self.found[key]
        if path not in self.handles:
            self.handles[path] = self._open(path)
        return self.handles[path], k

    def shape(self, key: str) -> tuple[int, ...]:
        f, k = self._file(key)
        return tuple(f.get_slice(k).get_shape())

    def get(self, key: str) -> torch.Tensor:
        f, k = self._file(key)
        return f.get_tensor(k)


class StageWorker:
    def __init__(self, stage: int, run: dict[str, Any], plan: dict[str, Any], base_dir: str, replica: int = 0):
        from splitlearn.config import RunConfig

        self.stage, self.replica = stage, replica
        self.run = to_typed(RunConfig, run, prefix="", source="run config", error=ConfigError)
        self.topology = topology_from_container(self.run.topology.inline, "run config")
        self.plan = Plan.from_dict(plan)
        self.spec = self.plan.stages[stage]
        self.device_name = self.spec.devices[replica]
        self.replicas = [len(s.devices) for s in self.plan.stages]
        self.num_replicas = self.replicas[stage]
        self.offsets = [sum(self.replicas[:i]) for i in range(len(self.replicas))]
        self.rank = self.offsets[stage] + replica
        self.world_size = sum(self.replicas)
        self.offload = self.spec.offload
        self.engine = None  # DeepSpeed's, for an offloaded stage
        self.device_cfg = self.topology.device(self.device_name)
        self.base_dir = Path(base_dir)
        self.num_stages = self.plan.num_stages
        self.is_first, self.is_last = stage == 0, stage == self.num_stages - 1
        # a link's codec is set on the stage it leaves from; gradients come back through it
        self.codec_out = self.spec.codec
        self.codec_in = self.plan.stages[stage - 1].codec if stage > 0 else "none"
        stage_actions = S.build(self.run.runtime.schedule, self.num_stages, self.run.train.micro_batches)[stage]
        self.actions = S.replica_actions(stage_actions, replica, self.num_replicas)
        self.num_forwards = sum(a.kind == S.F for a in self.actions)  # this replica's micro-batches
        self.last_backward = max((i for i, a in enumerate(self.actions) if a.kind == S.B), default=-1)
        torch.set_num_threads(self.device_cfg.cpu_threads)
        self.device = torch.device(
            "cuda" if self.device_cfg.accelerator == "cuda" and torch.cuda.is_available() else "cpu"
        )
        self.segment = None
        self.batches = None
        self.world_ready = False
        self._pending: list = []  # (work, tensor) of sends posted this step
        self._link_free_ns: dict[int, int] = {}  # link rehearsal: when each outgoing wire is free

    # -- set-up ---------------------------------------------------------------------------
    def _resolve(self, p: str) -> Path:
        path = Path(p).expanduser()
        if path.is_absolute():
            return path
        beside = self.base_dir / path
        return beside if beside.exists() or not path.exists() else path

    def prepare(self) -> dict[str, Any]:
        from splitlearn.data import BatchSource, load_dataset
        from splitlearn.finetune import prepare_segment, stage_method
        from splitlearn.models.chain import Segment, build_model

        torch.manual_seed(self.run.train.seed)
        model = build_model(self.run.model, self.run.train.seed)
        self.segment = Segment(model, self.spec.start, self.spec.stop)
        if self.offload == "none":  # DeepSpeed places an offloaded stage itself
            self.segment.to(self.device)
        # the plan's method for this stage: LoRA adapters, frozen weights (compact), recompute
        self.adapted = prepare_segment(self.segment, self.plan, self.stage, self.run)
        self.segment.train()
        tied = self.segment.tied_parameters() if self.num_stages > 1 else {}
        self.tied = {k: p for k, p in tied.items() if p.requires_grad}  # both ends agree: see tied_trainable
        if self.offload == "none":
            self.optimizer = make_optimizer(self.segment.parameters(), self.run.train)  # trainable ones only
        else:
            self._check_offload()
        info: dict[str, Any] = {
            "stage": self.stage,
            "device": self.device_name,
            "pid": os.getpid(),
            "node": _ray_node_id(),
            "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in self.segment.parameters()),
            "trainable_params": sum(p.numel() for p in self.segment.parameters() if p.requires_grad),
            "method": stage_method(self.spec).label,
            "replica": self.replica,
            "offload": self.offload,
        }
        if self.is_first:
            dataset, tokenizer = load_dataset(self.run.data, self._resolve)
            vocab = model.config.vocab_size
            if tokenizer.vocab_size > vocab:
                raise DataError(
                    f"model.config.vocab_size={vocab} is smaller than the tokenizer's "
                    f"{tokenizer.vocab_size} tokens; raise model.config.vocab_size"
                )
            self.batches = BatchSource(dataset, self.run.train.batch_size, self.run.train.seed)
            info["rows"] = dataset.num_rows
        return info

    def rendezvous_address(self) -> tuple[str, int]:
        """An address of this node and a free port on it, for the world's rendezvous."""
        try:
            import ray

            ip = ray.util.get_node_ip_address()
        except Exception:
            ip = "127.0.0.1"
        with socket.socket() as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def _check_offload(self) -> None:
        """What an offloaded stage needs, checked before any process group exists."""
        from splitlearn import zero

        if self.tied:
            raise ConfigError(
                f"stage {self.stage} holds a weight tied to another stage ({', '.join(sorted(self.tied))}), whose "
                "gradients are summed across stages before the step; DeepSpeed reduces them itself, so this "
                "stage cannot be offloaded: offload another stage, or untie the embeddings"
            )
        zero.check_user_section(self.run.deepspeed, self.offload)
        zero.check_schedule(self.offload, self.actions, self.stage, self.run.runtime.schedule)
        zero.ensure_ops(self.device_name, self.device.type == "cuda")

    def _rank_of(self, stage: int, mb: int) -> int:
        """The rank of the replica of ``stage`` that handles micro-batch ``mb``."""
        return self.offsets[stage] + mb % self.replicas[stage]

    def init_dist(self, addr: str, port: int) -> None:
        """Join the pipeline: standalone process groups on one store served by rank 0 (see
        :mod:`splitlearn.fabric`), then, on an offloaded stage, torch's default group over
        the stage's replicas and DeepSpeed's engine on it."""
        from splitlearn import fabric

        timeout = datetime.timedelta(seconds=self.run.runtime.timeout_s)
        self.store = fabric.store_for(addr, port, self.rank, self.world_size, timeout)
        n, M = self.num_stages, self.run.train.micro_batches
        wanted: list[tuple[str, list[int], str]] = [("world", list(range(self.world_size)), "gloo")]
        # one group per pair of ranks that exchange micro-batches: NCCL when both ends are
        # CUDA devices (tensors stay on the GPUs), gloo through host memory otherwise
        pairs = sorted({(self._rank_of(s, m), self._rank_of(s + 1, m)) for s in range(n - 1) for m in range(M)})
        for a, b in pairs:
            backend = "nccl" if self._is_cuda_rank(a) and self._is_cuda_rank(b) else "gloo"
            wanted.append((f"link/{a}-{b}", [a, b], backend))
        # the data owner and every replica of the loss stage: labels, tied embed/head gradients
        if n > 1:
            wanted.append(("ends", [0, *[self.offsets[n - 1] + r for r in range(self.replicas[n - 1])]], "gloo"))
        for s in range(n):
            if self.replicas[s] > 1:
                wanted.append((f"replicas/{s}", [self.offsets[s] + r for r in range(self.replicas[s])], "gloo"))
        groups = fabric.build(self.store, self.rank, timeout, wanted)
        self.world = groups["world"]
        self.link_groups = {k: g for k, g in groups.items() if k.startswith("link/")}
        self.ends_group = groups.get("ends")
        self.replica_group = groups.get(f"replicas/{self.stage}")
        self.world_ready = True
        if self.offload != "none":
            self._init_deepspeed(timeout)

    def _init_deepspeed(self, timeout: datetime.timedelta) -> None:
        """torch's default group over this stage's replicas (replica 0 publishes an address
        in the store), then DeepSpeed on it: its world is the replica group."""
        from splitlearn import zero

        key = f"splitlearn/deepspeed/{self.stage}"
        if self.replica == 0:
            ip, port = self.rendezvous_address()
            self.store.set(key, f"{ip}:{port}")
        address = self.store.get(key).decode()
        on_cuda = self.device.type == "cuda"
        dist.init_process_group(
            "nccl" if on_cuda else "gloo",
            init_method=f"tcp://{address}",
            rank=self.replica,
            world_size=self.num_replicas,
            timeout=timeout,
        )
        own = [dist.new_group([r]) for r in range(self.num_replicas)]
        mbs = self.run.train.micro_batches
        params = [p for p in self.segment.parameters() if p.requires_grad]
        config = zero.ds_config(
            self.run.train,
            offload=self.offload,
            rows_per_micro_batch=self.run.train.batch_size // mbs,
            micro_batches_per_replica=mbs // self.num_replicas,
            replicas=self.num_replicas,
            trainable_params=sum(p.numel() for p in params),
            on_cuda=on_cuda,
            user=self.run.deepspeed,
        )
        env = {"RANK": self.replica, "WORLD_SIZE": self.num_replicas, "LOCAL_RANK": 0}
        groups = zero.ReplicaGroups(dist.group.WORLD, own[self.replica])
        self.engine = zero.initialize(self.segment, params, config, groups, env)
        self.optimizer = zero.inner_optimizer(self.engine)

    def _device_of(self, rank: int) -> str:
        stage = max(s for s in range(self.num_stages) if self.offsets[s] <= rank)
        return self.plan.stages[stage].devices[rank - self.offsets[stage]]

    def _is_cuda_rank(self, rank: int) -> bool:
        dev = self.topology.device(self._device_of(rank))
        return dev.accelerator == "cuda" and torch.cuda.is_available()

    def _group(self, peer: int):
        return self.link_groups[f"link/{min(self.rank, peer)}-{max(self.rank, peer)}"]

    # -- transfers ------------------------------------------------------------------------
    def _arrival_ns(self, peer: int, nbytes: int) -> int:
        """With ``runtime.emulate_links``: when a transfer posted now to ``peer`` would arrive
        on the real link. One transfer at a time per direction; latency overlaps the next."""
        if not self.run.runtime.emulate_links:
            return 0
        src, dst = self.device_name, self._device_of(peer)
        link = self.topology.link(src, dst)
        if link.bandwidth_mbps == float("inf"):
            return 0
        now = time.time_ns()
        start = max(now, self._link_free_ns.get(peer, 0))
        wire_ns = int(nbytes * 8 / (link.bandwidth_mbps * 1e6) * 1e9)
        self._link_free_ns[peer] = start + wire_ns
        return start + wire_ns + int(link.latency_ms * 1e6)

    def _send(self, t: torch.Tensor, dst: int, group, codec: str = "none", mask: torch.Tensor | None = None) -> int:
        """Post the header, the encoded tensor (and the padding mask) without waiting: the
        stage moves on, and the step waits for every posted send before it ends. Messages
        between two ranks arrive in the order they were posted. Returns the bytes sent."""
        gpu = self._on_gpu(group)
        t = t.detach().contiguous()
        parts = codecs.encode(t if gpu else t.cpu(), codec)
        if mask is not None:
            parts.append(mask.contiguous() if gpu else mask.contiguous().cpu())
        nbytes = _HEADER_LEN * 8 + codecs.wire_bytes(parts)
        header = _header(t, mask is not None, _CODECS.index(codec), self._arrival_ns(dst, nbytes))
        for part in [header.to(t.device) if gpu else header, *parts]:
            self._pending.append((group.isend(part, dst), part))
        return nbytes

    def _on_gpu(self, group) -> bool:
        return self.device.type == "cuda" and group.backend == "nccl"

    def _wait_sends(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def _recv(self, src: int, group) -> tuple[torch.Tensor, torch.Tensor | None]:
        gpu = self._on_gpu(group)
        where = self.device if gpu else torch.device("cpu")
        h = torch.empty(_HEADER_LEN, dtype=torch.int64, device=where)
        group.recv(h, src)
        h = h.cpu()
        ndim, code, has_mask, codec = int(h[0]), int(h[1]), bool(h[2]), _CODECS[int(h[3])]
        shape = [int(x) for x in h[4 : 4 + ndim]]
        dtype = _DTYPES[code]
        parts = codecs.payload_like(shape, dtype, codec, where)
        for part in parts:
            group.recv(part, src)
        mask = None
        if has_mask:
            mask = torch.empty(shape[:2], dtype=torch.int64, device=where)
            group.recv(mask, src)
        arrival = int(h[_HEADER_LEN - 1])
        if arrival:  # link rehearsal: the transfer is not here before the real link would deliver it
            wait = (arrival - time.time_ns()) / 1e9
            if wait > 0:
                time.sleep(wait)
        t = codecs.decode(parts, dtype, codec).to(self.device)
        return t, (None if mask is None else mask.to(self.device))

    # -- one step -------------------------------------------------------------------------
    def run_step(self, step: int) -> dict[str, Any]:
        """Execute this stage's actions for ``step``; return its metrics. With
        ``runtime.measure_memory`` also the step's peak allocation above what was allocated
        when it began (torch's own accounting; see ``partitioners.profile.peak_allocated_bytes``)."""
        assert self.segment is not None and self.world_ready, "prepare() and init_dist() first"
        if not self.run.runtime.measure_memory:
            return self._run_step(step)
        from partitioners.profile import peak_allocated_bytes

        out: dict[str, Any] = {}
        peak = peak_allocated_bytes(lambda: out.update(self._run_step(step)), self.device)
        out["peak_bytes"] = peak
        return out

    def _run_step(self, step: int) -> dict[str, Any]:
        mbs = self.run.train.micro_batches
        rows = self.run.train.batch_size // mbs
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.run.train.dtype == "bf16" else nullcontext()
        )
        batch = self.batches.batch(step) if self.is_first else None
        labels_all = batch["labels"] if batch is not None else None
        num_items = None
        inputs: dict[int, Any] = {}
        outputs: dict[int, torch.Tensor] = {}
        masks: dict[int, torch.Tensor | None] = {}
        grads_in: dict[int, torch.Tensor] = {}
        compute_s = comm_s = 0.0
        phase_s = {S.F: 0.0, S.B: 0.0}  # compute_s split into forwards and backwards
        sent = {"next": 0, "prev": 0, "labels": 0}
        loss_total = 0.0
        last_ranks = [self.offsets[-1] + r for r in range(self.replicas[-1])]
        set_lr(self.optimizer, lr_at(step, self.run.train))
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=False)  # gradients persist: steady memory
        grad_norm = 0.0
        timer = _ActionTimer(self.device.type == "cuda", self.run.runtime.trace)
        for i, act in enumerate(self.actions):
            timer.start(act)
            waited = 0.0  # of this action's time, waiting on other workers (STEP's sends, collectives)
            try:
                m = act.mb
                if act.kind == S.SEND_LABELS:  # every replica of the loss stage gets the step's labels
                    for dst in last_ranks:
                        sent["labels"] += self._send(labels_all, dst, self.ends_group)
                elif act.kind == S.RECV_LABELS:
                    labels_all, _ = self._recv(0, self.ends_group)
                elif act.kind == S.RECV_ACT:
                    src = self._rank_of(self.stage - 1, m)
                    x, mask = self._recv(src, self._group(src))
                    inputs[m] = x.requires_grad_(True)
                    masks[m] = mask
                elif act.kind == S.F:
                    if self.is_first:
                        sl = slice(m * rows, (m + 1) * rows)
                        inputs[m] = batch["input_ids"][sl].to(self.device)
                        bm = batch["attention_mask"]
                        masks[m] = None if bm is None else bm[sl].to(self.device)
                    lab = None
                    if self.is_last:
                        from splitlearn.models.chain import count_items

                        if num_items is None:
                            num_items = count_items(labels_all)
                        lab = labels_all[m * rows : (m + 1) * rows].to(self.device)
                    with autocast:
                        fwd = self.engine if self.engine is not None else self.segment
                        outputs[m] = fwd(inputs[m], masks[m], lab, num_items)
                    if self.is_last:
                        loss_total += float(outputs[m].detach())
                elif act.kind == S.SEND_ACT:
                    dst = self._rank_of(self.stage + 1, m)
                    sent["next"] += self._send(outputs[m], dst, self._group(dst), self.codec_out, masks[m])
                elif act.kind == S.RECV_GRAD:
                    src = self._rank_of(self.stage + 1, m)
                    grads_in[m], _ = self._recv(src, self._group(src))
                elif act.kind == S.B:
                    out = outputs.pop(m)
                    grad = None if self.is_last else grads_in.pop(m)
                    if self.engine is not None:
                        self._ds_backward(out, grad, last=i == self.last_backward)
                    elif out.requires_grad:  # a frozen first stage has nothing to differentiate
                        out.backward(grad)
                elif act.kind == S.SEND_GRAD:
                    x = inputs.pop(m)
                    dst = self._rank_of(self.stage - 1, m)
                    grad = x.grad if self.engine is None else x.grad / self.num_replicas  # see _ds_backward
                    sent["prev"] += self._send(grad, dst, self._group(dst), self.codec_in)
                elif act.kind == S.STEP:
                    t_wait = time.perf_counter()
                    self._wait_sends()
                    waited = time.perf_counter() - t_wait
                    grad_norm, collectives_s = self._optimizer_step()
                    waited += collectives_s
                else:  # pragma: no cover - validated schedules hold only known kinds
                    raise AssertionError(f"unknown action {act}")
            except Exception as e:
                grid = " ".join(str(a) for a in self.actions)
                log.error("stage %d actions: %s  <-- ERROR HERE at %s (#%d)", self.stage, grid, act, i)
                raise StageFailed(self.stage, self.device_name, step, str(act), f"{type(e).__name__}: {e}") from e
            timer.end(act, waited)
        # per action: its time, and the part of it spent waiting (STEP's sends and collectives)
        for kind, dt, wait in timer.durations():
            if kind in (S.F, S.B, S.STEP):
                compute_s += dt - wait
                comm_s += wait
                if kind in phase_s:
                    phase_s[kind] += dt
            else:
                comm_s += dt
        links = {}
        tag = f"{self.stage}" if self.num_replicas == 1 else f"{self.stage}.{self.replica}"
        if not self.is_last:
            links[f"{tag}->{self.stage + 1}"] = sent["next"]
        if not self.is_first:
            links[f"{tag}->{self.stage - 1}"] = sent["prev"]
        if sent["labels"]:
            links[f"0->{self.num_stages - 1} (labels)"] = sent["labels"]
        out = {
            "stage": self.stage,
            "replica": self.replica,
            "device": self.device_name,
            "compute_s": compute_s,
            "fwd_s": phase_s[S.F],
            "bwd_s": phase_s[S.B],
            "micro_batches": self.num_forwards,
            "comm_s": comm_s,
            "bytes_sent": links,
            "loss": loss_total if self.is_last else None,
            "grad_norm": grad_norm,
            "tokens": int(batch["input_ids"].numel()) if batch is not None else None,
        }
        if timer.trace is not None:
            out["trace"] = timer.trace
        return out

    def _ds_backward(self, out: torch.Tensor, grad: torch.Tensor | None, last: bool) -> None:
        """Backward of one micro-batch through DeepSpeed. A stage without a loss of its own
        differentiates ``sum(out * grad)``, whose gradient with respect to ``out`` is exactly
        ``grad``. The sum over micro-batches is the step's gradient (each loss is already
        divided by the whole batch's token count), so DeepSpeed must not divide by its
        accumulation steps, and its average over the replicas is undone by multiplying by
        their count (which the gradient sent back to the previous stage divides out)."""
        self.engine.set_gradient_accumulation_boundary(last)
        target = out if grad is None else (out * grad.to(out.dtype)).sum()
        self.engine.backward(target * self.num_replicas, scale_wrt_gas=False)

    def _optimizer_step(self) -> tuple[float, float]:
        """Sum the gradients of tied embed/head copies and of the replicas, clip by the
        global norm over every stage, step. Returns the norm and the seconds spent in the
        collectives (waiting for the other workers, mostly)."""
        t_sync = time.perf_counter()
        sync = 0.0
        if self.tied:  # the data owner's copy and every loss-stage replica's share
            for p in self.tied.values():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if p.grad.is_cuda:  # the ends group is gloo: reduce through host memory
                    host = p.grad.cpu()
                    self.ends_group.all_reduce(host)
                    p.grad.copy_(host)
                else:
                    self.ends_group.all_reduce(p.grad)
        sync += time.perf_counter() - t_sync
        if self.engine is not None:
            # the replicas' reduced gradients are in DeepSpeed's fp32 partitions, disjoint
            # across replicas: each contributes its own partition to the global norm
            from splitlearn import zero

            grads = zero.grad_partitions(self.engine)
            local = sum_of_squares(grads)
        else:
            params = [p for p in self.segment.parameters() if p.grad is not None]
            if self.num_replicas > 1:
                t_sync = time.perf_counter()
                self._all_reduce_replicas([p for p in params if not any(p is t for t in self.tied.values())])
                sync += time.perf_counter() - t_sync
            grads = [p.grad for p in params]
            # Count a tied weight once (on the first stage), as the unsplit model does, and a
            # replicated stage's gradients once (on its first replica).
            skip = {id(p) for p in self.tied.values()} if (self.is_last and self.tied) else set()
            local = sum_of_squares(p.grad for p in params if id(p) not in skip)
            if self.replica > 0:
                local = torch.zeros_like(local)
        if self.world_size > 1:
            t_sync = time.perf_counter()
            self.world.all_reduce(local)
            sync += time.perf_counter() - t_sync
        norm = float(local.sqrt())
        coef = clip_coefficient(norm, self.run.train.max_grad_norm)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        if self.engine is not None:
            self.engine.step()
        else:
            self.optimizer.step()
        return norm, sync

    def _all_reduce_replicas(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the replicas' gradients, flattened into one buffer per call."""
        if not params:
            return
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        host = flat.cpu() if flat.is_cuda else flat  # replica groups are gloo
        self.replica_group.all_reduce(host)
        if host is not flat:
            flat.copy_(host)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # -- results --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """This segment's tensors under the model's own names, shared tensors once; LoRA
        adapters under peft's names (``base_model.model.<module>.lora_A.weight``). A ZeRO-3
        stage's weights are partitioned: they are gathered over its replicas (every replica
        takes part)."""
        from splitlearn.models.finetune import checkpoint_tensors

        tensors = checkpoint_tensors(self.segment.model)
        if self.engine is not None and self.offload == "params":
            from splitlearn import zero

            tensors.update(zero.full_params(self._named_params()))
        return tensors

    def gradients(self) -> dict[str, torch.Tensor]:
        """The gradients left by the last step (after the tied-weight sum and clipping). An
        offloaded stage has none here: DeepSpeed moved them to the host and stepped."""
        from splitlearn.models.finetune import checkpoint_params

        return {
            name: p.grad.detach().cpu().clone()
            for name, p in checkpoint_params(self.segment.model).items()
            if p.grad is not None
        }

    # -- checkpoints ----------------------------------------------------------------------
    def _named_params(self) -> dict[str, torch.nn.Parameter]:
        """Parameters by checkpoint name (model's own names; LoRA adapters by peft's names;
        compactly stored frozen weights left out: they are rebuilt from the model's source)."""
        from splitlearn.models.finetune import checkpoint_params

        return checkpoint_params(self.segment.model)

    def save_checkpoint(self, directory: str) -> dict[str, Any]:
        """Write this stage's tensors and its optimizer and RNG state, by parameter name, each
        file atomically; return the files with their sizes and SHA-256 for the manifest."""
        from safetensors.torch import save_file

        from splitlearn.checkpoint import sha256

        d = Path(directory)
        optim: dict[str, torch.Tensor] = {}
        weights = None
        if self.engine is not None:  # gathered over the replica group: every replica takes part
            from splitlearn import zero
            from splitlearn.models.finetune import checkpoint_tensors

            params = self._named_params()
            state = zero.get_state(self.engine, params)
            optim = {k: v for k, v in state.items() if k.startswith("optim/")}
            weights = {**checkpoint_tensors(self.segment.model), **{k: v for k, v in state.items() if k in params}}
        if self.replica > 0:  # replicas hold the same tensors: the first one writes them
            return {"stage": self.stage, "replica": self.replica, "device": self.device_name, "files": []}
        d.mkdir(parents=True, exist_ok=True)
        if self.engine is None:
            for name, p in self._named_params().items():
                for key, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        optim[f"optim/{name}/{key}"] = value.detach().cpu().contiguous().clone()
        optim["rng/torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            optim["rng/cuda"] = torch.cuda.get_rng_state()
        files = []
        for name, tensors in (
            (f"stage_{self.stage}.safetensors", weights if weights is not None else self.state_dict()),
            (f"stage_{self.stage}.optim.safetensors", optim),
        ):
            tmp = d / f".{name}.tmp"
            save_file(tensors, str(tmp), metadata={"stage": str(self.stage), "device": self.device_name})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, d / name)
            files.append({"name": name, "bytes": (d / name).stat().st_size, "sha256": sha256(d / name)})
        return {"stage": self.stage, "device": self.device_name, "files": files}

    def check_checkpoint(self, directory: str, files: list[str]) -> int:
        """What :meth:`load_checkpoint` checks, changing nothing: the driver asks every stage
        before any loads, so a checkpoint is taken whole or not at all."""
        params, found = self._index_checkpoint(directory, files)
        with ExitStack() as stack:
            self._check_shapes(params, found, _Shards(found, stack))
        return len(params)

    @staticmethod
    def _check_shapes(params: dict[str, torch.nn.Parameter], found, shards: _Shards) -> None:
        """Every parameter's shape in the checkpoint (read from the files' headers) is the
        plan's model's (a ZeRO-3 parameter's whole shape is its ``ds_shape``)."""
        from splitlearn.checkpoint import CheckpointError

        for name, p in params.items():
            shape = shards.shape(name)
            want = tuple(getattr(p, "ds_shape", p.shape))
            if shape != want:
                raise CheckpointError(f"{found[name][0]}: {name} has shape {shape}, the plan's model has {want}")

    def _index_checkpoint(self, directory: str, files: list[str]):
        """This stage's parameters and where each of its tensors is in the checkpoint's files."""
        from safetensors import safe_open

        from splitlearn.checkpoint import CheckpointError

        d = Path(directory)
        params = self._named_params()
        want = set(params) | {f"optim/{n}" for n in params}
        found: dict[str, tuple[Path, str]] = {}
        for fname in files:
            path = d / fname
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        base = key if not key.startswith("optim/") else "optim/" + key[6:].rsplit("/", 1)[0]
                        if base in want or key.startswith("rng/"):
                            found.setdefault(key, (path, key))
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from e
        missing = [n for n in params if n not in found]
        if missing:
            raise CheckpointError(f"{d}: no tensor for {missing[0]} (and {len(missing) - 1} more) in any shard")
        return params, found

    def load_checkpoint(self, directory: str, files: list[str]) -> int:
        """Load this stage's parameters and optimizer state by name from a checkpoint written
        by any plan. A name missing from every file or a shape that differs is a
        CheckpointError naming the file."""
        params, found = self._index_checkpoint(directory, files)
        with ExitStack() as stack:
            shards = _Shards(found, stack)
            self._check_shapes(params, found, shards)
            if self.engine is not None:
                from splitlearn import zero

                zero.set_state(self.engine, params, lambda key: shards.get(key) if key in found else None)
            else:
                with torch.no_grad():
                    for name, p in params.items():
                        p.copy_(shards.get(name))
                        prefix = f"optim/{name}/"
                        state = {k[len(prefix) :]: shards.get(k).to(p.device) for k in found if k.startswith(prefix)}
                        if state:
                            self.optimizer.state[p] = state
            if "rng/torch" in found:
                torch.set_rng_state(shards.get("rng/torch"))
            if "rng/cuda" in found and self.device.type == "cuda":
                torch.cuda.set_rng_state(shards.get("rng/cuda"))
        return len(params)

    def export(self, directory: str, merge: bool) -> dict[str, Any]:
        """The stage's LoRA adapters (peft's names, returned: they are small) and, with
        ``merge``, its shard of the merged model written to ``directory`` as
        ``model-<i>-of-<n>.safetensors`` (LoRA deltas added to the base weights)."""
        from safetensors.torch import save_file

        from splitlearn.models.finetune import adapter_state_dict, merged_state_dict

        out: dict[str, Any] = {
            "stage": self.stage,
            "lora_modules": list(self.adapted),
            "adapter": adapter_state_dict(self.segment.model),
        }
        if merge:
            d = Path(directory)
            d.mkdir(parents=True, exist_ok=True)
            state = merged_state_dict(self.segment.model)
            name = f"model-{self.stage + 1:05d}-of-{self.num_stages:05d}.safetensors"
            tmp = d / f".{name}.tmp"
            save_file(state, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, d / name)
            out.update(merged_file=name, merged_keys=sorted(state), merged_bytes=(d / name).stat().st_size)
        return out

    def close(self) -> None:
        if self.world_ready:
            if dist.is_initialized():  # an offloaded stage's replica group
                dist.destroy_process_group()
            self.link_groups, self.ends_group, self.replica_group, self.world = {}, None, None, None
            self.store = None
            self.world_ready = False
