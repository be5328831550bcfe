"""Cost tables: per device and fine-tuning method, prefix sums and memory tables so that any
stage (a layer range on a device) and any cut costs O(1)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from cluster.topology import Link
from partitioners.costmodel import (
    PRECISIONS,
    StageMethod,
    effective_layer,
    micro_batches_in_flight,
    ring_allreduce_ms,
    stage_time,
    step_temporaries,
    weight_bytes,
)
from partitioners.planner.request import CODEC_BYTES, GB, PlanRequest


def running_max(x: np.ndarray) -> np.ndarray:
    """``[a, b]`` -> the largest of ``x[a..b-1]`` (0 where ``b <= a``), every range at once."""
    n = len(x)
    upper = np.arange(n)[None, :] >= np.arange(n + 1)[:, None]  # [a, j]: layer j is at or after a
    acc = np.maximum.accumulate(np.where(upper, x[None, :], -np.inf), axis=1)
    out = np.zeros((n + 1, n + 1))
    out[:, 1:] = np.where(upper, acc, 0.0)
    return out


class CostTables:
    """Per-device (and per fine-tuning method) prefix sums so that any stage and any cut
    costs O(1)."""

    def __init__(self, req: PlanRequest):
        self.req = req
        L = req.layers
        topo = req.topology
        self.M = req.num_micro_batches
        self.dev = {d.name: d for d in topo.devices}
        self._cum: dict[tuple[tuple, StageMethod], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        ratio = CODEC_BYTES[req.codec]
        self.cut_bytes = [layer.out_bytes * ratio for layer in L]  # after layer i
        self._mem: dict[tuple[int, float, int, StageMethod], np.ndarray] = {}
        self._dev_mem: dict[tuple, np.ndarray] = {}
        self._parts: dict[tuple, dict[str, np.ndarray]] = {}
        self._host: dict[StageMethod, tuple[np.ndarray, np.ndarray]] = {}
        self._link: dict[tuple, tuple[float, float]] = {}
        self._pair: dict[tuple[str, str], Link] = {}
        self._link_tables: dict[tuple, np.ndarray] = {}
        self._opts: dict[tuple[int, str], list[StageMethod]] = {}
        self._kinds: dict[str, tuple] = {}

    def options(self, s: int, dev: str) -> list[StageMethod]:
        key = (s, dev)
        if key not in self._opts:
            self._opts[key] = self.req.options(s, dev)
        return self._opts[key]

    def _times(self, dev: str, opt: StageMethod | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Prefix sums over the layers on ``dev`` under ``opt``: per micro-batch compute (the
        step spread over the micro-batches), forward, backward, and the optimizer step."""
        key = (self.kind(dev), opt or StageMethod())
        if key not in self._cum:
            d = self.dev[dev]
            per = [
                stage_time([layer], d, self.req.calibrated_for(dev), method=key[1], precision=self.req.precision)
                for layer in self.req.layers_on(dev)
            ]

            def prefix(values: list[float]) -> np.ndarray:
                return np.concatenate([[0.0], np.cumsum(np.array(values, float))])

            self._cum[key] = (
                prefix([t.fwd_ms + t.bwd_ms + t.opt_ms / self.M for t in per]),
                prefix([t.fwd_ms for t in per]),
                prefix([t.bwd_ms for t in per]),
                prefix([t.opt_ms for t in per]),
            )
        return self._cum[key]

    def kind(self, dev: str) -> tuple:
        """What a layer's time on ``dev`` depends on: every figure of the device but its
        name, zone and data, the FLOP/s its layers were measured at and which layers it
        runs. Devices of one kind share their prefix sums (a large pool has few kinds)."""
        if dev not in self._kinds:
            d = self.dev[dev]
            figures = tuple(
                getattr(d, f.name) for f in dataclasses.fields(d) if f.name not in ("name", "zone", "owns_data")
            )
            self._kinds[dev] = (figures, self.req.calibrated_for(dev), id(self.req.layers_on(dev)))
        return self._kinds[dev]

    def cum(self, dev: str, opt: StageMethod | None = None) -> np.ndarray:
        """Prefix sums of each layer's per-micro-batch compute on ``dev`` under ``opt``
        (its optimizer step spread over the step's micro-batches)."""
        return self._times(dev, opt)[0]

    def parts(self, dev: str, opt: StageMethod | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prefix sums of each layer's forward, backward (one micro-batch) and optimizer step."""
        t = self._times(dev, opt)
        return t[1], t[2], t[3]

    def fbo(self, dev: str, a: int, b: int, opt: StageMethod | None = None) -> tuple[float, float, float]:
        """Forward and backward of one micro-batch and the optimizer step of layers ``a..b-1``."""
        f, bw, o = self.parts(dev, opt)
        return float(f[b] - f[a]), float(bw[b] - bw[a]), float(o[b] - o[a])

    def stage_ms(self, dev: str, a: int, b: int, opt: StageMethod | None = None) -> float:
        c = self.cum(dev, opt)
        return float(c[b] - c[a])

    def opt_ms(self, dev: str, a: int, b: int, opt: StageMethod | None = None) -> float:
        """The optimizer step of layers ``a..b-1`` on ``dev`` (once per step)."""
        c = self._times(dev, opt)[3]
        return float(c[b] - c[a])

    def _host_cums(self, opt: StageMethod) -> tuple[np.ndarray, np.ndarray]:
        """Prefix sums of (host bytes under ``opt``, trainable parameters under ``opt``)."""
        if opt not in self._host:
            w, _, master, moments = PRECISIONS[self.req.precision]
            host, trainable = [], []
            for layer in self.req.layers:
                e = effective_layer(layer, opt)
                h = 0.0
                if opt.offload != "none":  # optimizer state and the fp32 gradient copy
                    h = e.trainable * (master + moments) + e.trainable * 4
                if opt.offload == "params":
                    h += weight_bytes(layer, e, opt, w)
                host.append(h)
                trainable.append(e.trainable)
            self._host[opt] = (
                np.concatenate([[0.0], np.cumsum(host)]),
                np.concatenate([[0.0], np.cumsum(np.array(trainable, float))]),
            )
        return self._host[opt]

    def trainable(self, a: int, b: int, opt: StageMethod | None = None) -> float:
        c = self._host_cums(opt or StageMethod())[1]
        return float(c[b] - c[a])

    def allreduce_ms(self, group: tuple[str, ...], a: int, b: int, opt: StageMethod | None = None) -> float:
        """The replicas' gradient all-reduce before each step (gradients at the precision's width)."""
        if len(group) < 2:
            return 0.0
        return ring_allreduce_ms(
            self.req.topology, group, self.trainable(a, b, opt) * PRECISIONS[self.req.precision][1]
        )

    def mem_table(self, inflight: int, opt: StageMethod | None = None, dev: str | None = None) -> np.ndarray:
        """``[a, b]`` -> device bytes of a stage of layers ``a..b-1`` with ``inflight``
        micro-batches in flight: :func:`costmodel.stage_memory`, for every range at once
        (``dev``: the layers as that device runs them, and its runtime bytes)."""
        opt = opt or StageMethod()
        base = self.req.layers_on(dev) if dev else self.req.layers
        runtime = self.req.runtime_bytes(dev) if dev else 0.0
        key = (id(base), runtime, inflight, opt)
        if key not in self._mem:
            n = len(base)
            parts = self._mem_parts(base, opt)
            a = np.arange(n + 1)[:, None]
            b = np.arange(n + 1)[None, :]
            out_last, in_first = parts["out_last"], parts["in_first"]
            if opt.recompute:  # inputs held; one layer's saved activations while it is recomputed
                cum_held = parts["cum_held"]
                acts = inflight * (cum_held[b] - cum_held[a] + out_last) + parts["saved"]
            else:
                cum_saved = parts["cum_saved"]
                acts = inflight * (cum_saved[b] - cum_saved[a] + out_last)
            act_phase = acts + in_first + out_last + parts["trans"]
            if self.M > 1:  # a later micro-batch's gradient of a tensor, before it is added in
                act_phase = act_phase + parts["grad"]
            if "weights" in parts:  # the largest layer's weights, fetched while it runs
                act_phase = act_phase + parts["weights"]
            if (
                "step" in parts
            ):  # AdamW's temporaries over the largest trainable tensor, after the activations are freed
                act_phase = np.maximum(act_phase, parts["step"])
            cum_static = parts["cum_static"]
            table = (cum_static[b] - cum_static[a]) + act_phase + runtime
            table[b <= a] = np.inf
            self._mem[key] = table
        return self._mem[key]

    def _mem_parts(self, base: list, opt: StageMethod) -> dict[str, np.ndarray]:
        """What :meth:`mem_table` adds up that does not depend on the micro-batches in
        flight, once per set of layers and method: prefix sums, and per range ``[a, b]`` the
        largest of a per-layer figure over layers ``a..b-1``."""
        key = (id(base), opt)
        if key not in self._parts:
            n = len(base)
            L = [effective_layer(layer, opt) for layer in base]
            w, g, master, moments = PRECISIONS[self.req.precision]
            keep_opt = opt.offload == "none"  # offload moves the optimizer state to the host
            keep_weights = opt.offload != "params"  # params offload: the weights too
            static = np.array(
                [
                    (weight_bytes(b, e, opt, w) if keep_weights else 0.0)
                    + e.trainable * (g + (master + moments if keep_opt else 0))
                    for b, e in zip(base, L, strict=True)
                ],
                float,
            )
            saved = np.array([layer.saved_bytes for layer in L], float)
            a = np.arange(n + 1)[:, None]
            b = np.arange(n + 1)[None, :]
            parts = {
                "cum_static": np.concatenate([[0.0], np.cumsum(static)]),
                "out_last": np.array([0.0, *[layer.out_bytes for layer in L]])[b],  # out of layer b-1
                "in_first": np.array([*[layer.in_bytes for layer in L], 0.0])[a],
                "trans": running_max(np.array([layer.bwd_transient_bytes for layer in L], float)),
            }
            if opt.recompute:
                held = np.array([layer.in_bytes for layer in L], float)
                parts["cum_held"] = np.concatenate([[0.0], np.cumsum(held)])
                parts["saved"] = running_max(saved)
            else:
                parts["cum_saved"] = np.concatenate([[0.0], np.cumsum(saved)])
            parts["grad"] = g * running_max(np.array([layer.max_trainable_params for layer in L], float))
            if not keep_weights:
                parts["weights"] = running_max(np.array([layer.params * w for layer in L], float))
            if keep_opt:
                parts["step"] = running_max(
                    np.array([step_temporaries([layer], self.req.precision) for layer in L], float)
                )
            self._parts[key] = parts
        return self._parts[key]

    def inflight(self, s: int, S: int) -> int:
        return micro_batches_in_flight(self.req.schedule, s, S, self.M)

    def stage_mem(self, a: int, b: int, s: int, S: int, opt: StageMethod | None = None) -> float:
        """Accelerator bytes of a stage (without what offload moves to the host)."""
        return float(self.mem_table(self.inflight(s, S), opt)[a, b])

    def dev_table(self, dev: str, inflight: int, opt: StageMethod | None = None) -> np.ndarray:
        """:meth:`mem_table` as it counts against ``dev``'s ``memory_gb``: on a cpu device
        the host is the same RAM, so the offloaded bytes count there too."""
        opt = opt or StageMethod()
        key = (dev, inflight, opt)
        if key not in self._dev_mem:
            table = self.mem_table(inflight, opt, dev)
            if self.dev[dev].accelerator == "cpu" and opt.offload != "none":
                h = self._host_cums(opt)[0]
                table = table + (h[None, :] - h[:, None])
            self._dev_mem[key] = table
        return self._dev_mem[key]

    def reach(self, dev: str, inflight: int, opt: StageMethod) -> np.ndarray:
        """``[a]`` -> the last end ``b`` of a stage from layer ``a`` that fits ``dev`` (device
        memory and host budget; ``a`` where none does): the searches try the ends up to it
        only (memory need not grow with every layer, so each end is still checked)."""
        key = ("reach", self.kind(dev), inflight, opt)  # its figures hold its memory
        if key not in self._dev_mem:
            host = self.host_cum(dev, opt)
            fits = (self.dev_table(dev, inflight, opt) <= self.capacity(dev)) & (
                host[None, :] - host[:, None] <= self.host_capacity(dev)
            )
            n = self.req.n
            last = n - np.argmax(fits[:, ::-1], axis=1)
            self._dev_mem[key] = np.where(fits.any(axis=1), last, np.arange(n + 1))
        return self._dev_mem[key]

    def host_cum(self, dev: str, opt: StageMethod | None = None) -> np.ndarray:
        """Prefix sums of the host bytes that count against ``dev``'s host budget (none on
        a cpu device: :meth:`dev_table` counts them)."""
        opt = opt or StageMethod()
        if self.dev[dev].accelerator == "cpu" or opt.offload == "none":
            return np.zeros(self.req.n + 1)
        return self._host_cums(opt)[0]

    def dev_mem(self, dev: str, a: int, b: int, s: int, S: int, opt: StageMethod | None = None) -> float:
        return float(self.dev_table(dev, self.inflight(s, S), opt)[a, b])

    def host_mem(self, dev: str, a: int, b: int, opt: StageMethod | None = None) -> float:
        h = self.host_cum(dev, opt)
        return float(h[b] - h[a])

    def fits(self, dev: str, a: int, b: int, s: int, S: int, opt: StageMethod) -> bool:
        """Whether a stage fits ``dev`` alone: device memory and host budget."""
        return self.dev_mem(dev, a, b, s, S, opt) <= self.capacity(dev) and self.host_mem(
            dev, a, b, opt
        ) <= self.host_capacity(dev)

    def link(self, src: str, dst: str, cut: int) -> tuple[float, float]:
        """(activation ms forward, gradient ms back) for a cut after chain index ``cut - 1``."""
        key = (src, dst, cut)
        if key not in self._link:
            nbytes = self.cut_bytes[cut - 1]
            self._link[key] = (self.transfer_ms(src, dst, nbytes), self.transfer_ms(dst, src, nbytes))
        return self._link[key]

    def link_table(self, src: str, dst: str) -> np.ndarray:
        """``[cut]`` -> (activation ms, gradient ms) of :meth:`link`, for every cut (0 at 0)."""
        key = ("table", src, dst)
        if key not in self._link_tables:
            nbytes = np.array([0.0, *self.cut_bytes[: self.req.n]])
            table = np.stack([self.transfer_ms(src, dst, nbytes), self.transfer_ms(dst, src, nbytes)], axis=1)
            table[0] = 0.0
            self._link_tables[key] = table
        return self._link_tables[key]

    def transfer_ms(self, src: str, dst: str, num_bytes):
        """:meth:`cluster.topology.Topology.transfer_ms`, its link looked up once per pair
        (``num_bytes`` a number or an array)."""
        pair = (src, dst)
        if pair not in self._pair:
            self._pair[pair] = self.req.topology.link(src, dst)
        link = self._pair[pair]
        if math.isinf(link.bandwidth_mbps):
            return 0.0 * num_bytes
        return link.latency_ms + num_bytes * 8 / (link.bandwidth_mbps * 1e6) * 1e3

    def capacity(self, dev: str) -> float:
        return self.dev[dev].memory_gb * GB

    def host_capacity(self, dev: str) -> float:
        d = self.dev[dev]
        return math.inf if d.accelerator == "cpu" else d.host_budget_gb * GB
