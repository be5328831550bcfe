"""Partitioners: which devices run which contiguous layer ranges, in which order.

All partitioners share one cost model and one objective, so their plans compare fairly:

- a stage's cost per micro-batch is its forward and backward time on its device, plus its
  optimizer step spread over the step's micro-batches;
- a cut between two devices costs, per micro-batch, one activation transfer forward and
  one gradient transfer back (latency + bytes / bandwidth, each direction its own link);
- the predicted step time of a pipelined schedule (GPipe, 1F1B) is the fill and drain of
  one micro-batch through every stage and link, plus ``M - 1`` times the slowest resource
  (a device, counting every stage it runs, or one direction of a link);
  the sequential schedule runs the M micro-batches one after another.

Constraints, checked for every plan of every partitioner:

- the first stage (the embedding, on raw inputs) runs on a data-owning device; with
  ``label_privacy`` the last stage (head and loss, on the labels) runs there too, making a
  U-shaped pipeline in which that device runs two stages;
- each stage's memory (weights, gradients, optimizer state, activations in flight for the
  schedule, buffers: :func:`partitioners.costmodel.stage_memory`) fits its device; a device
  running two stages must fit both.

Fine-tuning methods: each stage trains with a :class:`~partitioners.costmodel.StageMethod`
(full, frozen or LoRA; activation recompute; compact frozen weights), configured by a
:class:`~partitioners.costmodel.FinetunePolicy` (default, by device tier, by stage). With
``allow`` (``plan.allow``), a stage on an *edge* device may also take the listed options
(``lora``, ``frozen``, ``recompute``, ``bf16``, ``fp16``, ``int8``): every partitioner picks,
for each stage, the fastest option that fits (the configured one on ties), so an option is
used where it makes the plan fit or faster. Stages on different devices choose
independently; the U-shaped pipeline's two stages on the data owner choose together.

ZeRO offload: a stage on a ``cuda`` device may also move its optimizer state (``optimizer``)
or its weights too (``params``) to host memory, with no ``allow`` needed; the configured
offload comes first. The stages on a device must then fit its host budget
(``host_memory_gb``) as well, and an offloaded stage pays for its optimizer step on the
host CPU and the host-link transfers (:func:`partitioners.costmodel.stage_time`), so the
planner takes offload only where it makes a plan fit or faster.

Replicas: a stage may run on several identical devices (:func:`identical`) as
data-parallel replicas: replica ``r`` of an ``R``-replica stage handles micro-batches
``m % R == r`` and the replicas all-reduce their gradients before the optimizer step (ring
all-reduce over the link between the first two). Each replica holds the whole stage's
memory; its device is busy ``1/R`` of the stage's forward and backward work plus the whole
optimizer step and all-reduce. ``uniform``, ``balanced`` and ``manual`` take replicas from
``plan.devices`` entries like ``cloud-c+cloud-d``; ``optimal`` adds them as a post-pass
(:func:`add_replicas`) on the best plan without replicas, so ``exhaustive`` remains the
reference for plans without replicas.

Partitioners: ``uniform`` (equal layer counts, devices in the order given), ``balanced``
(the cuts that minimise the largest stage cost, devices in the order given; ties broken by
the sum), ``manual`` (cuts and devices from the config), ``exhaustive`` (every device
sequence and every cut: the reference for tests), and ``optimal`` (the best plan over
device choice, order and cuts: exact — every device sequence, a Pareto dynamic programme
over cuts — when the topology has at most ``EXACT_MAX_DEVICES`` devices; otherwise a
dynamic programme over prefixes of devices ranked by link and speed, exact in the cuts for
each).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from cluster.errors import UserError
from cluster.topology import Device, Topology
from partitioners.choices import ALLOW_OPTIONS, OFFLOAD_PRECISIONS
from partitioners.costmodel import (
    PRECISIONS,
    FinetunePolicy,
    StageMethod,
    effective_layer,
    micro_batches_in_flight,
    ring_allreduce_ms,
    stage_memory,
    stage_options,
    stage_time,
    step_temporaries,
    weight_bytes,
    with_offload,
)
from partitioners.plan import Plan, Stage
from partitioners.profile import LayerProfile
from partitioners.schedule import replica_pairs

EXACT_MAX_DEVICES = 7
GB = 1e9


class PlanError(UserError):
    """No valid plan for this model on this topology."""


CODEC_BYTES = {"none": 1.0, "fp16": 0.5, "bf16": 0.5, "int8": 0.25}  # of fp32 activation bytes


@dataclass
class PlanRequest:
    layers: list[LayerProfile]
    topology: Topology
    num_micro_batches: int = 1
    schedule: str = "sequential"
    devices: list[str] | None = None  # the order (uniform, balanced, manual) or the candidates
    cuts: list[int] | None = None  # manual only
    label_privacy: bool = False
    precision: str = "fp32"
    calibrated_tflops: float | None = None
    codec: str = "none"
    finetune: FinetunePolicy | None = None  # None: every stage full
    allow: tuple[str, ...] = ()  # options the planner may pick for edge stages
    replicate: bool = True  # optimal may replicate its bottleneck stage on free identical devices

    @property
    def n(self) -> int:
        return len(self.layers)

    @property
    def pool(self) -> list[str]:
        """The candidate devices: ``devices`` (groups ``a+b`` taken apart) or the topology's."""
        return [d for entry in (self.devices or self.topology.device_names) for d in entry.split(REPLICA_SEP)]

    def __post_init__(self) -> None:
        bad = [a for a in self.allow if a not in ALLOW_OPTIONS]
        if bad:
            raise PlanError(f"plan.allow: '{bad[0]}' is not one of {', '.join(ALLOW_OPTIONS)}")
        self.allow = tuple(self.allow)

    def options(self, stage: int, device: str) -> list[StageMethod]:
        """The methods stage ``stage`` may use on ``device``: the configured one first, then
        ``allow``'s variants (edge devices), then each with every offload mode (cuda devices)
        unless the config sets the stage's offload itself (a configured offload is kept) or the
        precision keeps bf16 weights, which offload does not run with."""
        dev = self.topology.device(device)
        base = (self.finetune or FinetunePolicy()).for_stage(stage, dev.tier)
        opts = stage_options(base, self.allow) if dev.tier == "edge" else [base]
        offer = dev.accelerator == "cuda" and base.offload == "none" and self.precision in OFFLOAD_PRECISIONS
        return with_offload(opts) if offer else opts


REPLICA_SEP = "+"  # a plan.devices entry "cloud-c+cloud-d": one stage replicated on both
IDENTICAL_FIELDS = ("accelerator", "memory_gb", "host_budget_gb", "tflops", "cpu_threads", "tier")


def identical(a: Device, b: Device) -> bool:
    """Whether ``a`` and ``b`` may hold replicas of one stage: the same kind, memory, host
    memory, speed and threads (their zones and links may differ)."""
    return all(getattr(a, f) == getattr(b, f) for f in IDENTICAL_FIELDS)


def _difference(a: Device, b: Device) -> str:
    f = next(f for f in IDENTICAL_FIELDS if getattr(a, f) != getattr(b, f))
    return f"{f} {getattr(a, f)} vs {getattr(b, f)}"


@dataclass
class Evaluation:
    step_ms: float
    bottleneck: str
    busy_ms: float  # total compute of all stages, for the bubble fraction
    stage_ms: list[float]  # per stage, per micro-batch (its step's optimizer and all-reduce spread over M)
    link_ms: list[tuple[float, float]]  # per cut: (activation, gradient) per micro-batch
    allreduce_ms: list[float] = field(default_factory=list)  # per stage, once per step (replicas only)


class CostTables:
    """Per-device (and per fine-tuning method) prefix sums so that any stage and any cut
    costs O(1)."""

    def __init__(self, req: PlanRequest):
        self.req = req
        L = req.layers
        topo = req.topology
        self.M = req.num_micro_batches
        self.dev = {d.name: d for d in topo.devices}
        self._cum: dict[tuple[str, StageMethod], tuple[np.ndarray, np.ndarray]] = {}
        ratio = CODEC_BYTES[req.codec]
        self.cut_bytes = [layer.out_bytes * ratio for layer in L]  # after layer i
        self._mem: dict[tuple[int, StageMethod], np.ndarray] = {}
        self._dev_mem: dict[tuple[bool, int, StageMethod], np.ndarray] = {}
        self._host: dict[StageMethod, tuple[np.ndarray, np.ndarray]] = {}
        self._link: dict[tuple, tuple[float, float]] = {}
        self._opts: dict[tuple[int, str], list[StageMethod]] = {}

    def options(self, s: int, dev: str) -> list[StageMethod]:
        key = (s, dev)
        if key not in self._opts:
            self._opts[key] = self.req.options(s, dev)
        return self._opts[key]

    def _times(self, dev: str, opt: StageMethod | None) -> tuple[np.ndarray, np.ndarray]:
        key = (dev, opt or StageMethod())
        if key not in self._cum:
            d = self.dev[dev]
            per = [
                stage_time([layer], d, self.req.calibrated_tflops, method=key[1], precision=self.req.precision)
                for layer in self.req.layers
            ]
            costs = np.array([t.fwd_ms + t.bwd_ms + t.opt_ms / self.M for t in per])
            opt_ms = np.array([t.opt_ms for t in per])
            self._cum[key] = (np.concatenate([[0.0], np.cumsum(costs)]), np.concatenate([[0.0], np.cumsum(opt_ms)]))
        return self._cum[key]

    def cum(self, dev: str, opt: StageMethod | None = None) -> np.ndarray:
        """Prefix sums of each layer's per-micro-batch compute on ``dev`` under ``opt``
        (its optimizer step spread over the step's micro-batches)."""
        return self._times(dev, opt)[0]

    def stage_ms(self, dev: str, a: int, b: int, opt: StageMethod | None = None) -> float:
        c = self.cum(dev, opt)
        return float(c[b] - c[a])

    def opt_ms(self, dev: str, a: int, b: int, opt: StageMethod | None = None) -> float:
        """The optimizer step of layers ``a..b-1`` on ``dev`` (once per step)."""
        c = self._times(dev, opt)[1]
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

    def mem_table(self, inflight: int, opt: StageMethod | None = None) -> np.ndarray:
        """``[a, b]`` -> device bytes of a stage of layers ``a..b-1`` with ``inflight``
        micro-batches in flight: :func:`costmodel.stage_memory`, for every range at once."""
        opt = opt or StageMethod()
        if (inflight, opt) not in self._mem:
            base, n = self.req.layers, len(self.req.layers)
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
            cum_static = np.concatenate([[0.0], np.cumsum(static)])
            a = np.arange(n + 1)[:, None]
            b = np.arange(n + 1)[None, :]
            out_last = np.array([0.0, *[layer.out_bytes for layer in L]])[b]  # out of layer b-1
            in_first = np.array([*[layer.in_bytes for layer in L], 0.0])[a]

            def running_max(x: np.ndarray) -> np.ndarray:  # [a, b] -> max of x[a..b-1]
                out = np.zeros((n + 1, n + 1))
                for i in range(n):
                    out[i, i + 1 :] = np.maximum.accumulate(x[i:])
                return out

            trans = running_max(np.array([layer.bwd_transient_bytes for layer in L], float))
            if opt.recompute:  # inputs held; one layer's saved activations while it is recomputed
                held = np.array([layer.in_bytes for layer in L], float)
                cum_held = np.concatenate([[0.0], np.cumsum(held)])
                acts = inflight * (cum_held[b] - cum_held[a] + out_last) + running_max(saved)
            else:
                cum_saved = np.concatenate([[0.0], np.cumsum(saved)])
                acts = inflight * (cum_saved[b] - cum_saved[a] + out_last)
            act_phase = acts + in_first + out_last + trans
            if self.M > 1:  # a later micro-batch's gradient of a tensor, before it is added in
                act_phase = act_phase + g * running_max(np.array([layer.max_trainable_params for layer in L], float))
            if not keep_weights:  # the largest layer's weights, fetched while it runs
                act_phase = act_phase + running_max(np.array([layer.params * w for layer in L], float))
            if keep_opt:  # AdamW's temporaries over the largest trainable tensor, after the activations are freed
                step_tmp = running_max(np.array([step_temporaries([layer], self.req.precision) for layer in L], float))
                act_phase = np.maximum(act_phase, step_tmp)
            table = (cum_static[b] - cum_static[a]) + act_phase
            table[b <= a] = np.inf
            self._mem[(inflight, opt)] = table
        return self._mem[(inflight, opt)]

    def inflight(self, s: int, S: int) -> int:
        return micro_batches_in_flight(self.req.schedule, s, S, self.M)

    def stage_mem(self, a: int, b: int, s: int, S: int, opt: StageMethod | None = None) -> float:
        """Accelerator bytes of a stage (without what offload moves to the host)."""
        return float(self.mem_table(self.inflight(s, S), opt)[a, b])

    def dev_table(self, dev: str, inflight: int, opt: StageMethod | None = None) -> np.ndarray:
        """:meth:`mem_table` as it counts against ``dev``'s ``memory_gb``: on a cpu device
        the host is the same RAM, so the offloaded bytes count there too."""
        opt = opt or StageMethod()
        cpu = self.dev[dev].accelerator == "cpu" and opt.offload != "none"
        key = (cpu, inflight, opt)
        if key not in self._dev_mem:
            table = self.mem_table(inflight, opt)
            if cpu:
                h = self._host_cums(opt)[0]
                table = table + (h[None, :] - h[:, None])
            self._dev_mem[key] = table
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
            topo = self.req.topology
            self._link[key] = (topo.transfer_ms(src, dst, nbytes), topo.transfer_ms(dst, src, nbytes))
        return self._link[key]

    def capacity(self, dev: str) -> float:
        return self.dev[dev].memory_gb * GB

    def host_capacity(self, dev: str) -> float:
        d = self.dev[dev]
        return math.inf if d.accelerator == "cpu" else d.host_budget_gb * GB

    def objective(self, total: float, worst: float) -> float:
        if self.req.schedule == "sequential":
            return self.M * total
        return total + (self.M - 1) * worst


Groups = list[tuple[str, ...]]  # per stage: its device, or its replicas' devices


def _groups(seq: list[str], groups: Groups | None) -> Groups:
    return list(groups) if groups else [(d,) for d in seq]


def _group_name(group: tuple[str, ...]) -> str:
    return REPLICA_SEP.join(group)


def base_options(tables: CostTables, seq: list[str]) -> list[StageMethod]:
    """The configured method of each stage (no planner choice)."""
    return [tables.options(s, dev)[0] for s, dev in enumerate(seq)]


def check_replicas(req: PlanRequest, groups: Groups, where: str = "plan.devices") -> str | None:
    """Why these replica groups are not allowed, or None."""
    topo, M = req.topology, req.num_micro_batches
    for s, group in enumerate(groups):
        if len(group) < 2:
            continue
        name = f"{where}: '{_group_name(group)}'"
        if s == 0:
            return f"{name}: the first stage (embedding, raw inputs) runs on the data owner and cannot be replicated"
        if req.label_privacy and s == len(groups) - 1:
            return (
                f"{name}: label_privacy: the last stage (head, labels) runs on the data owner and cannot be replicated"
            )
        first = topo.device(group[0])
        for d in group[1:]:
            if not identical(first, topo.device(d)):
                return (
                    f"{name}: replicas need identical devices, but '{group[0]}' and '{d}' differ in "
                    f"{_difference(first, topo.device(d))}"
                )
        if M % len(group):
            return (
                f"{name}: stage {s} on {len(group)} replicas needs train.micro_batches to be a multiple of "
                f"{len(group)} (each replica takes every {len(group)}th micro-batch), got {M}"
            )
    return None


def closest_options(tables: CostTables, seq: list[str], bounds: list[int]) -> list[StageMethod]:
    """For an error message when nothing fits: each stage's option closest to fitting (the
    smallest overflow of device memory or host budget, relative to it; the configured one
    on ties), so that the message names the tightest constraint."""
    S = len(seq)

    def over(s: int, o: StageMethod) -> float:
        dev, a, b = seq[s], bounds[s], bounds[s + 1]
        if not a < b:
            return 0.0
        return max(
            tables.dev_mem(dev, a, b, s, S, o) / tables.capacity(dev),
            tables.host_mem(dev, a, b, o) / tables.host_capacity(dev),
        )

    return [min(tables.options(s, dev), key=functools.partial(over, s)) for s, dev in enumerate(seq)]


def check_plan(
    req: PlanRequest,
    tables: CostTables,
    seq: list[str],
    bounds: list[int],
    opts: list[StageMethod] | None = None,
    groups: Groups | None = None,
) -> str | None:
    """Why this device sequence, these cuts and these stage methods (default: the
    configured ones) break a constraint, or None. ``groups``: each stage's replicas
    (default: ``seq``, no replicas)."""
    S = len(seq)
    opts = opts or base_options(tables, seq)
    groups = _groups(seq, groups)
    topo = req.topology
    if not topo.device(seq[0]).owns_data:
        return f"the first stage (embedding, raw inputs) must run on a data-owning device, not '{seq[0]}'"
    if req.label_privacy and seq[-1] != seq[0]:
        return f"label_privacy: the last stage (head, labels) must run on '{seq[0]}', not '{seq[-1]}'"
    why = check_replicas(req, groups)
    if why:
        return why
    used: dict[str, float] = {}
    host: dict[str, float] = {}
    stages_on: dict[str, list[str]] = {}
    for s in range(S):
        a, b = bounds[s], bounds[s + 1]
        if not a < b:
            return f"stage {s} would be empty (cuts {bounds[1:-1]})"
        what = f"stage {s} ({req.layers[a].name}..{req.layers[b - 1].name}"
        what += f", {opts[s].label})" if opts[s] != StageMethod() else ")"
        for dev in groups[s]:  # each replica holds the whole stage
            used[dev] = used.get(dev, 0.0) + tables.dev_mem(dev, a, b, s, S, opts[s])
            host[dev] = host.get(dev, 0.0) + tables.host_mem(dev, a, b, opts[s])
            stages_on.setdefault(dev, []).append(what)
    for dev, need in used.items():
        cap = tables.capacity(dev)
        if need > cap:
            return (
                f"{' and '.join(stages_on[dev])} on device '{dev}' needs {need / GB:.3g} GB but the device has "
                f"memory_gb={cap / GB:g} ({(need - cap) / GB:.3g} GB short)"
            )
        cap = tables.host_capacity(dev)
        if host[dev] > cap:
            unset = "" if tables.dev[dev].host_memory_gb else " (host_memory_gb unset: memory_gb)"
            return (
                f"{' and '.join(stages_on[dev])} on device '{dev}' needs {host[dev] / GB:.3g} GB of host memory "
                f"for offload but the device has host_memory_gb={cap / GB:g}{unset} "
                f"({(host[dev] - cap) / GB:.3g} GB short)"
            )
    return None


def evaluate(
    tables: CostTables,
    seq: list[str],
    bounds: list[int],
    opts: list[StageMethod] | None = None,
    groups: Groups | None = None,
) -> Evaluation:
    """The predicted step of a plan: ``total + (M - 1) * worst`` (pipelined schedules), the
    fill and drain of one micro-batch plus the rest of the bottleneck's work.

    A stage on ``R`` replicas: each replica runs ``M / R`` forwards and backwards, then the
    all-reduce and the optimizer step, so its bottleneck term is ``(M/R - 1) (f + b) +
    (M - 1) / M (opt + allreduce)`` (for ``R = 1`` the usual ``(M - 1)`` times the stage's
    per-micro-batch cost); ``worst`` holds it divided by ``M - 1``, roughly ``1/R`` of the
    stage's per-micro-batch load. Under 1F1B, ``R`` counts at most ``S`` replicas
    (:func:`effective_replicas`). A cut between replicated stages spreads over
    ``lcm(R_s, R_s+1)`` pairs of wires, each carrying ``M / lcm`` transfers at its slowest
    pair's figures."""
    S, M = len(seq), tables.M
    opts = opts or base_options(tables, seq)
    groups = _groups(seq, groups)
    stage_ms, allreduce = [], []
    load: dict[str, float] = {}
    busy = 0.0
    for s in range(S):
        a, b, R = bounds[s], bounds[s + 1], len(groups[s])
        ms = tables.stage_ms(seq[s], a, b, opts[s])
        if R == 1:
            per_dev, ar = ms, 0.0
            busy += ms
        else:
            opt = tables.opt_ms(seq[s], a, b, opts[s])
            ar = tables.allreduce_ms(groups[s], a, b, opts[s])
            fb = ms - opt / M
            per_dev = _replica_load(fb, opt + ar, effective_replicas(tables.req.schedule, R, S), M)
            ms = fb + (opt + ar) / M
            busy += fb + R * (opt + ar) / M
        stage_ms.append(ms)
        allreduce.append(ar)
        for dev in groups[s]:
            load[dev] = load.get(dev, 0.0) + per_dev
    links: list[tuple[float, float]] = []
    wire_load: list[float] = []
    for s in range(S - 1):
        src, dst = groups[s], groups[s + 1]
        pairs = replica_pairs(len(src), len(dst), M)
        figs = [tables.link(src[r], dst[q], bounds[s + 1]) for r, q in pairs]
        act, grad = max(f[0] for f in figs), max(f[1] for f in figs)
        links.append((act, grad))
        k = math.lcm(len(src), len(dst))
        wire_load.append(max(act, grad) if k == 1 else (M // k - 1) * max(act, grad) / (M - 1))
    total = sum(stage_ms) + sum(a + g for a, g in links)
    worst_dev = max(load, key=lambda d: load[d])
    worst: float = load[worst_dev]
    bottleneck = f"device {worst_dev}"
    for s, (act_ms, grad_ms) in enumerate(links):
        if wire_load[s] > worst:
            src_name, dst_name = _group_name(groups[s]), _group_name(groups[s + 1])
            worst = wire_load[s]
            bottleneck = f"link {src_name}->{dst_name}" if act_ms >= grad_ms else f"link {dst_name}->{src_name}"
    return Evaluation(tables.objective(total, worst), bottleneck, busy, stage_ms, links, allreduce)


def choose_options(
    req: PlanRequest, tables: CostTables, seq: list[str], bounds: list[int], groups: Groups | None = None
) -> list[StageMethod] | None:
    """The fastest stage methods that fit, for fixed devices and cuts (None: none fit).

    A stage alone on its device takes its fastest option that fits (the configured one on
    ties): the objective grows with every stage's time, and its memory concerns no one
    else. Stages sharing a device (the U-shape's two stages on the data owner) try every
    combination of their options together. A replicated stage (identical devices: the
    same options fit) takes the option with the best predicted step, the others fixed."""
    S = len(seq)
    groups = _groups(seq, groups)
    chosen: list[StageMethod | None] = [None] * S
    by_dev: dict[str, list[int]] = {}
    for s, dev in enumerate(seq):
        by_dev.setdefault(dev, []).append(s)
    shared, replicated = [], []
    for dev, stages in by_dev.items():
        if len(stages) > 1:
            shared.append((dev, stages))
            continue
        s = stages[0]
        a, b = bounds[s], bounds[s + 1]
        fits = [o for o in tables.options(s, dev) if tables.fits(dev, a, b, s, S, o)]
        if not fits:
            return None
        chosen[s] = min(fits, key=functools.partial(tables.stage_ms, dev, a, b))
        if len(groups[s]) > 1:
            replicated.append((s, fits))

    def trial_step(trial: list[StageMethod | None]) -> float:
        # the groups not chosen yet at their configured option meanwhile
        full = [o if o is not None else tables.options(i, seq[i])[0] for i, o in enumerate(trial)]
        return evaluate(tables, seq, bounds, full, groups).step_ms

    for dev, stages in shared:
        best = None
        for combo in itertools.product(*[tables.options(s, dev) for s in stages]):
            need = sum(
                tables.dev_mem(dev, bounds[s], bounds[s + 1], s, S, o) for s, o in zip(stages, combo, strict=True)
            )
            host = sum(tables.host_mem(dev, bounds[s], bounds[s + 1], o) for s, o in zip(stages, combo, strict=True))
            if need > tables.capacity(dev) or host > tables.host_capacity(dev):
                continue
            trial = list(chosen)
            for s, o in zip(stages, combo, strict=True):
                trial[s] = o
            t = trial_step(trial)
            if best is None or t < best[0] - 1e-12:
                best = (t, combo)
        if best is None:
            return None
        for s, o in zip(stages, best[1], strict=True):
            chosen[s] = o
    for s, fits in replicated:
        steps = []
        for o in fits:
            trial = list(chosen)
            trial[s] = o
            steps.append(trial_step(trial))
        chosen[s] = fits[int(np.argmin(steps))]
    return [o for o in chosen if o is not None]


# -- plan assembly ------------------------------------------------------------------------


def build_plan(
    req: PlanRequest,
    tables: CostTables,
    seq: list[str],
    bounds: list[int],
    name: str,
    opts: list[StageMethod] | None = None,
    groups: Groups | None = None,
) -> Plan:
    groups = _groups(seq, groups)
    if opts is None:
        opts = choose_options(req, tables, seq, bounds, groups)
    why = check_plan(req, tables, seq, bounds, opts or closest_options(tables, seq, bounds), groups)
    if why:
        raise PlanError(why + _allow_hint(req, seq))
    assert opts is not None
    ev = evaluate(tables, seq, bounds, opts, groups)
    S = len(seq)
    stages = []
    for s in range(S):
        a, b = bounds[s], bounds[s + 1]
        seg = req.layers[a:b]
        mem = stage_memory(
            seg,
            stage=s,
            num_stages=S,
            schedule=req.schedule,
            num_micro_batches=req.num_micro_batches,
            precision=req.precision,
            method=opts[s],
        )
        t = stage_time(seg, req.topology.device(seq[s]), req.calibrated_tflops, method=opts[s], precision=req.precision)
        link = ev.link_ms[s] if s < S - 1 else (0.0, 0.0)
        stages.append(
            Stage(
                index=s,
                start=a,
                stop=b,
                devices=list(groups[s]),
                layer_names=[layer.name for layer in seg],
                offload=opts[s].offload,
                codec=req.codec,
                params=sum(layer.params for layer in seg),
                memory_gb=round(mem.device_total / GB, 6),
                host_memory_gb=round(mem.host / GB, 6),
                fwd_ms=round(t.fwd_ms, 4),
                bwd_ms=round(t.bwd_ms, 4),
                opt_ms=round(t.opt_ms, 4),
                allreduce_ms=round(ev.allreduce_ms[s], 4),
                memory={k: round(v, 6) for k, v in mem.as_gb().items()},
                link_act_ms=round(link[0], 4),
                link_grad_ms=round(link[1], 4),
                cut_bytes=int(tables.cut_bytes[b - 1]) if s < S - 1 else 0,
                method=opts[s].method,
                recompute=opts[s].recompute,
                frozen_dtype=opts[s].frozen_dtype,
                trainable_params=sum(effective_layer(layer, opts[s]).trainable for layer in seg),
            )
        )
    num_devices = len({d for g in groups for d in g})
    bubble = 1.0 - ev.busy_ms * req.num_micro_batches / (num_devices * ev.step_ms) if ev.step_ms > 0 else 0.0
    return Plan(
        stages=stages,
        partitioner=name,
        schedule=req.schedule,
        num_micro_batches=req.num_micro_batches,
        label_privacy=req.label_privacy,
        precision=req.precision,
        predicted={"step_ms": round(ev.step_ms, 4), "bottleneck": ev.bottleneck, "bubble_fraction": round(bubble, 4)},
    )


def default_device_order(topology: Topology) -> list[str]:
    """The data owner first, then the other devices as the topology lists them."""
    owner = topology.data_owner.name
    return [owner] + [n for n in topology.device_names if n != owner]


def _sequence(req: PlanRequest, devices: list[str]) -> list[str]:
    return [*devices, devices[0]] if req.label_privacy else list(devices)


def uniform_cuts(num_layers: int, num_stages: int) -> list[int]:
    """Start index of stages 1..k-1 so that layer counts differ by at most one (earlier
    stages take the extra layers)."""
    base, extra = divmod(num_layers, num_stages)
    cuts, pos = [], 0
    for s in range(num_stages - 1):
        pos += base + (1 if s < extra else 0)
        cuts.append(pos)
    return cuts


def ordered_groups(req: PlanRequest) -> tuple[list[str], Groups]:
    """The stages' devices in the order given (``plan.devices``, else the data owner first):
    the device sequence (each stage's first replica) and each stage's replicas. An entry
    ``a+b`` is one stage replicated on ``a`` and ``b``."""
    entries = list(req.devices or default_device_order(req.topology))
    groups = [tuple(e.split(REPLICA_SEP)) for e in entries]
    names = [d for g in groups for d in g]
    for d in names:
        req.topology.device(d)
    if len(set(names)) != len(names):
        raise PlanError(f"plan.devices: a device is listed twice: {entries}")
    if req.label_privacy:
        groups.append(groups[0])
    why = check_replicas(req, groups)
    if why:
        raise PlanError(why)
    return [g[0] for g in groups], groups


def uniform(req: PlanRequest) -> Plan:
    tables = CostTables(req)
    seq, groups = ordered_groups(req)
    if len(seq) > req.n:
        raise PlanError(
            f"plan.devices: {len(seq)} stages but the model has only {req.n} layers to share; "
            "list fewer devices in plan.devices"
        )
    return build_plan(req, tables, seq, [0, *uniform_cuts(req.n, len(seq)), req.n], "uniform", groups=groups)


def manual(req: PlanRequest) -> Plan:
    tables = CostTables(req)
    seq, groups = ordered_groups(req)
    cuts = list(req.cuts or [])
    if len(cuts) != len(seq) - 1:
        raise PlanError(f"plan.cuts: {len(seq)} stages need {len(seq) - 1} cuts, got {len(cuts)}")
    bounds = [0, *cuts, req.n]
    if any(not bounds[i] < bounds[i + 1] for i in range(len(bounds) - 1)):
        raise PlanError(
            f"plan.cuts: {cuts} must be strictly increasing within 1..{req.n - 1} "
            f"(the chain has {req.n} layers: embed=0, blocks 1..{req.n - 2}, head={req.n - 1})"
        )
    return build_plan(req, tables, seq, bounds, "manual", groups=groups)


def effective_replicas(schedule: str, num_replicas: int, num_stages: int) -> int:
    """How many replicas of a stage can be busy at once: 1F1B lets the data owner's stage
    run at most ``S`` micro-batches ahead of its backwards (its warmup), so no more than
    ``S`` replicas find work at a time; GPipe forwards every micro-batch first."""
    return min(num_replicas, num_stages) if schedule == "1f1b" else num_replicas


def _replica_load(fwd_bwd_ms: float, step_ms: float, busy_replicas: int, num_micro_batches: int) -> float:
    """A replicated stage's bottleneck term per micro-batch (see :func:`evaluate`): ``M / R``
    forwards and backwards one after another (``R`` replicas busy at once) and one optimizer
    step with the all-reduce, over ``M - 1``."""
    M, R = num_micro_batches, busy_replicas
    return ((M / R - 1) * fwd_bwd_ms + (M - 1) / M * step_ms) / (M - 1)


def _load(tables: CostTables, group: tuple[str, ...], a: int, b: int, opt: StageMethod, S: int) -> float:
    """Per micro-batch, what a stage keeps each of its devices busy (see :func:`evaluate`)."""
    ms = tables.stage_ms(group[0], a, b, opt)
    if len(group) == 1:
        return ms
    o = tables.opt_ms(group[0], a, b, opt)
    busy = effective_replicas(tables.req.schedule, len(group), S)
    return _replica_load(ms - o / tables.M, o + tables.allreduce_ms(group, a, b, opt), busy, tables.M)


def balanced(req: PlanRequest) -> Plan:
    """The cuts over the devices in the order given that minimise the largest stage cost
    (per micro-batch, on its own device; a replicated stage's shared by its replicas), then
    the sum; memory respected."""
    tables = CostTables(req)
    seq, groups = ordered_groups(req)
    S, n = len(seq), req.n
    if S > n:
        raise PlanError(f"plan.devices: {S} stages but the model has only {n} layers")
    INF = (math.inf, math.inf)
    best: list[list[tuple[float, float]]] = [[INF] * (n + 1) for _ in range(S + 1)]
    back = [[-1] * (n + 1) for _ in range(S + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(S):
        for a in range(s, n):
            if best[s][a] == INF:
                continue
            for b in range(a + 1, n - (S - s - 1) + 1):
                fits = [o for o in tables.options(s, seq[s]) if tables.fits(seq[s], a, b, s, S, o)]
                if not fits:
                    continue
                c = min(_load(tables, groups[s], a, b, o, S) for o in fits)
                cand = (max(best[s][a][0], c), best[s][a][1] + c)
                if cand < best[s + 1][b]:
                    best[s + 1][b], back[s + 1][b] = cand, a
    if best[S][n] == INF:
        raise PlanError(_infeasible_reason(req, tables, [seq]))
    bounds, b = [n], n
    for s in range(S, 0, -1):
        b = back[s][b]
        bounds.append(b)
    return build_plan(req, tables, seq, bounds[::-1], "balanced", groups=groups)


def add_replicas(
    req: PlanRequest, tables: CostTables, seq: list[str], bounds: list[int], opts: list[StageMethod]
) -> Groups:
    """Replicas for a plan's bottleneck, greedily: while the bottleneck is a device running
    one stage (not the data owner's) and free devices (in the pool, used by no stage) are
    identical to it, give that stage the replica count (a divisor of the micro-batches, up
    to what the free devices allow) with the lowest predicted step, as long as the step
    drops. The cuts and methods stay; a post-pass, not part of the exact search."""
    topo, M = req.topology, req.num_micro_batches
    groups = _groups(seq, None)
    if req.schedule == "sequential" or M < 2:
        return groups  # one micro-batch at a time: replicas only add an all-reduce
    step = evaluate(tables, seq, bounds, opts, groups)
    while step.bottleneck.startswith("device "):
        dev = step.bottleneck.removeprefix("device ")
        on = [s for s, g in enumerate(groups) if dev in g]
        if len(on) != 1 or on[0] == 0 or (req.label_privacy and on[0] == len(seq) - 1):
            break
        s = on[0]
        used = {d for g in groups for d in g}
        first = topo.device(groups[s][0])
        twins = [d for d in req.pool if d not in used and identical(first, topo.device(d))]
        twins.sort(key=lambda d: (-topo.link(first.name, d).bandwidth_mbps, topo.link(first.name, d).latency_ms))
        best = None
        R = len(groups[s])
        for extra in range(1, len(twins) + 1):
            if M % (R + extra):
                continue
            trial = [*groups[:s], (*groups[s], *twins[:extra]), *groups[s + 1 :]]
            if check_plan(req, tables, seq, bounds, opts, trial) is not None:
                continue
            ev = evaluate(tables, seq, bounds, opts, trial)
            if best is None or ev.step_ms < best[0].step_ms - 1e-12:
                best = (ev, trial)
        if best is None or best[0].step_ms >= step.step_ms - 1e-12:
            break
        step, groups = best
    return groups


# -- exhaustive and optimal -----------------------------------------------------------------


def device_sequences(req: PlanRequest) -> list[list[str]]:
    """Every ordered choice of devices that starts on a data owner (and, with label
    privacy, ends on it too)."""
    topo = req.topology
    pool = req.pool
    owners = [d for d in pool if topo.device(d).owns_data]
    out = []
    for first in owners:
        rest = [d for d in pool if d != first]
        for k in range(0, len(rest) + 1):
            for mid in itertools.permutations(rest, k):
                seq = [first, *mid]
                out.append(_sequence(req, seq))
    return [s for s in out if len(s) <= req.n]


def exhaustive(req: PlanRequest) -> Plan:
    """Every device sequence and every cut: for small cases and as the tests' reference."""
    tables = CostTables(req)
    best: tuple[float, list[str], list[int]] | None = None
    n = req.n
    best_opts: list[StageMethod] = []
    for seq in device_sequences(req):
        S = len(seq)
        for cuts in itertools.combinations(range(1, n), S - 1):
            bounds = [0, *cuts, n]
            # every combination of the options that fit alone (memory only adds up)
            fits = [
                [o for o in tables.options(s, dev) if tables.fits(dev, bounds[s], bounds[s + 1], s, S, o)]
                for s, dev in enumerate(seq)
            ]
            for combo in itertools.product(*fits):
                opts = list(combo)
                if check_plan(req, tables, seq, bounds, opts):
                    continue
                t = evaluate(tables, seq, bounds, opts).step_ms
                if best is None or t < best[0] - 1e-12:
                    best, best_opts = (t, seq, bounds), opts
    if best is None:
        raise PlanError(_infeasible_reason(req, tables, device_sequences(req)))
    return build_plan(req, tables, best[1], best[2], "exhaustive", best_opts)


# A label of the cut search: (worst resource so far, total so far, the owner's first-stage
# ms, device bytes and host bytes (U-shape only), back-pointer (stage, start, previous
# label)). Plain tuples: millions are made for large topologies.
_W, _T, _FMS, _FMEM, _FHOST, _PREV = range(6)


def _pareto_cuts(
    req: PlanRequest, tables: CostTables, seq: list[str], bound: float
) -> tuple[float, list[int], list[StageMethod]] | None:
    """The best cuts (and stage methods) for a fixed device sequence: a dynamic programme
    over (stage, cut) keeping every label (worst resource so far, total so far) that no
    other label beats in both — exact for the objective total + (M-1) * worst. Labels whose
    lower bound is not below ``bound`` are dropped.

    A stage with several method options takes, for each of its layer ranges, the fastest
    one that fits: its memory concerns only its own device. The U-shape's first stage is
    the exception (its memory counts against the owner's last stage): it keeps one label per
    option, and the last stage checks each label's memory."""
    S, n, M = len(seq), req.n, req.num_micro_batches
    ushape = req.label_privacy and S > 1
    sequential = req.schedule == "sequential"

    def lower(lab: tuple) -> float:
        return M * lab[_T] if sequential else lab[_T] + (M - 1) * lab[_W]

    frontier: dict[int, list[tuple]] = {0: [(0.0, 0.0, 0.0, 0.0, 0.0, None)]}
    for s in range(S):
        nxt: dict[int, list[tuple]] = {}
        dev = seq[s]
        cap, hcap = tables.capacity(dev), tables.host_capacity(dev)
        last = s == S - 1
        opts = tables.options(s, dev)
        cums = [tables.cum(dev, o) for o in opts]
        memtabs = [tables.dev_table(dev, tables.inflight(s, S), o) for o in opts]
        hostcums = [tables.host_cum(dev, o) for o in opts]
        hi = n if last else n - (S - s - 1)
        for a, labels in frontier.items():
            lo = n if last else a + 1
            if lo > hi:
                continue
            bs = np.arange(lo, hi + 1)
            cs = np.stack([cum[bs] - cum[a] for cum in cums])  # (options, ends)
            mems = np.stack([memtab[a, bs] for memtab in memtabs])
            hosts = np.stack([hc[bs] - hc[a] for hc in hostcums])
            la, lg = tables.link(seq[s - 1], dev, a) if s > 0 else (0.0, 0.0)
            first = ushape and s == 0
            for lab in labels:
                w0, t0, fms, fmem, fhost = lab[_W], lab[_T], lab[_FMS], lab[_FMEM], lab[_FHOST]
                if first:  # one candidate per option: their memory matters to the last stage
                    variants = [
                        (np.full(len(bs), k), cs[k], mems[k], hosts[k], (mems[k] <= cap) & (hosts[k] <= hcap))
                        for k in range(len(opts))
                    ]
                else:
                    if ushape and last:
                        fits = (fmem + mems <= cap) & (fhost + hosts <= hcap)
                    else:
                        fits = (mems <= cap) & (hosts <= hcap)
                    masked = np.where(fits, cs, np.inf)
                    k_best = np.argmin(masked, axis=0)  # the first (configured) option on ties
                    cols = np.arange(len(bs))
                    variants = [(k_best, cs[k_best, cols], mems[k_best, cols], hosts[k_best, cols], fits[k_best, cols])]
                for ks, c, mem, host, ok in variants:
                    if ushape and last:
                        worst = np.maximum(max(w0, la, lg), fms + c)
                    elif first:
                        worst = np.full(len(bs), max(w0, la, lg))  # the owner's load is known at the end
                    else:
                        worst = np.maximum(max(w0, la, lg), c)
                    total = t0 + c + la + lg
                    low = M * total if sequential else total + (M - 1) * worst
                    keep = np.nonzero(ok & (low < bound))[0]
                    if not len(keep):
                        continue
                    for wk, tk, ck, mk, hk, b, k in zip(
                        worst[keep].tolist(),
                        total[keep].tolist(),
                        c[keep].tolist(),
                        mem[keep].tolist(),
                        host[keep].tolist(),
                        bs[keep].tolist(),
                        ks[keep].tolist(),
                        strict=True,
                    ):
                        prev = (s, a, lab, k)
                        lab_new = (wk, tk, ck, mk, hk, prev) if first else (wk, tk, fms, fmem, fhost, prev)
                        nxt.setdefault(b, []).append(lab_new)
        for b, labs in nxt.items():
            nxt[b] = _prune(labs, ushape and s < S - 1)
        frontier = nxt
        if not frontier:
            return None
    labels = frontier.get(n, [])
    if not labels:
        return None
    best = min(labels, key=lower)
    cuts, chosen, lab = [], [], best
    while lab[_PREV] is not None:
        s, a, lab, k = lab[_PREV]
        cuts.append(a)
        chosen.append(tables.options(s, seq[s])[k])
    bounds = sorted(set([*cuts, n]))
    return lower(best), bounds, chosen[::-1]


def _prune(labels: list[tuple], keep_first: bool) -> list[tuple]:
    """Drop labels another label beats in every kept dimension."""
    if keep_first:  # U-shape before its last stage: the owner's first stage still matters
        labels.sort(key=lambda x: (x[_W], x[_T], x[_FMS], x[_FMEM], x[_FHOST]))
        out: list[tuple] = []
        for lab in labels:
            if not any(
                o[_W] <= lab[_W]
                and o[_T] <= lab[_T]
                and o[_FMS] <= lab[_FMS]
                and o[_FMEM] <= lab[_FMEM]
                and o[_FHOST] <= lab[_FHOST]
                for o in out
            ):
                out.append(lab)
        return out
    labels.sort(key=lambda x: (x[_W], x[_T]))
    out, best_total = [], math.inf
    for lab in labels:  # sorted by worst: keep those with a strictly smaller total
        if lab[_T] < best_total:
            out.append(lab)
            best_total = lab[_T]
    return out


def ranked_devices(req: PlanRequest) -> list[str]:
    """The data owner, then the others ranked for the large-topology search: devices whose
    link from the owner is faster first, then faster devices, then more memory."""
    topo = req.topology
    pool = req.pool
    owner = next(d for d in pool if topo.device(d).owns_data)
    rest = [d for d in pool if d != owner]
    rest.sort(key=lambda d: (-topo.link(owner, d).bandwidth_mbps, -topo.device(d).tflops, -topo.device(d).memory_gb, d))
    return [owner, *rest]


def optimal(req: PlanRequest) -> Plan:
    tables = CostTables(req)
    pool = req.pool
    if len(pool) <= EXACT_MAX_DEVICES:
        candidates = device_sequences(req)
    else:
        ranked = ranked_devices(req)
        by_speed = [ranked[0], *sorted(ranked[1:], key=lambda d: (-req.topology.device(d).tflops, d))]
        longer = [k for k in (16, 24, 32, 48, 64, 96, 128) if k <= len(ranked)]
        lengths = sorted({*range(1, min(len(ranked), 12) + 1), *longer})
        seen: set[tuple[str, ...]] = set()
        candidates = []
        for order in (ranked, by_speed):
            for k in lengths:
                seq = _sequence(req, order[:k])
                if len(seq) <= req.n and tuple(seq) not in seen:
                    seen.add(tuple(seq))
                    candidates.append(seq)
    best: tuple[float, list[str], list[int], list[StageMethod]] | None = None
    for seq in sorted(candidates, key=len):
        got = _pareto_cuts(req, tables, seq, best[0] if best else math.inf)
        if got is not None and (best is None or got[0] < best[0] - 1e-12):
            best = (got[0], seq, got[1], got[2])
    if best is None:
        raise PlanError(_infeasible_reason(req, tables, candidates))
    _, seq, bounds, opts = best
    groups = add_replicas(req, tables, seq, bounds, opts) if req.replicate else None
    return build_plan(req, tables, seq, bounds, "optimal", opts, groups)


def _allow_hint(req: PlanRequest, seq: list[str]) -> str:
    """A pointer to ``plan.allow`` when edge stages could shrink but may not."""
    if req.allow or not any(req.topology.device(d).tier == "edge" for d in seq):
        return ""
    return "; plan.allow: [lora, recompute, int8] lets edge stages train with less memory"


def _infeasible_reason(req: PlanRequest, tables: CostTables, seqs: list[list[str]]) -> str:
    """One line: which constraint fails, and by how much, for the most promising attempt."""
    topo = req.topology
    owner = topo.data_owner
    pool = req.pool
    hint = _allow_hint(req, pool)
    cuda = any(topo.device(d).accelerator == "cuda" for d in pool)  # offload could move state off them
    if req.finetune is None and not req.allow and not cuda:  # every stage full: the whole model's need is known
        total_need = stage_memory(
            req.layers, schedule=req.schedule, num_micro_batches=req.num_micro_batches, precision=req.precision
        ).device_total
        total_cap = sum(topo.device(d).memory_gb for d in pool) * GB
        if total_need > total_cap:
            return (
                f"no feasible plan: the model needs {total_need / GB:.2f} GB for training but the devices "
                f"together have {total_cap / GB:.2f} GB ({(total_need - total_cap) / GB:.2f} GB short){hint}"
            )

    def least(layers: list[LayerProfile], s: int, S: int) -> float:
        return min(
            stage_memory(
                layers,
                stage=s,
                num_stages=S,
                schedule=req.schedule,
                num_micro_batches=req.num_micro_batches,
                precision=req.precision,
                method=o,
            ).device_total
            for o in req.options(s, owner.name)
        )

    S = max(len(pool), 1)
    first = least(req.layers[:1], 0, S)
    if req.label_privacy:
        first += least(req.layers[-1:], S, S + 1)
    if first > owner.memory_gb * GB:
        what = "the embedding and the head (label_privacy)" if req.label_privacy else "the embedding"
        return (
            f"no feasible plan: privacy pins {what} to '{owner.name}', which needs {first / GB:.3f} GB "
            f"but has memory_gb={owner.memory_gb:g} ({(first - owner.memory_gb * GB) / GB:.3f} GB short){hint}"
        )
    # report the tightest stage of the first sequence's uniform split
    seq = max(seqs, key=len) if seqs else [owner.name]
    bounds = [0, *uniform_cuts(req.n, min(len(seq), req.n)), req.n]
    seq = seq[: len(bounds) - 1]
    why = check_plan(req, tables, seq, bounds, closest_options(tables, seq, bounds))
    return f"no feasible plan: memory does not fit on any device sequence (e.g. {why}){hint}"


def simulate_plan(
    plan: Plan,
    labels_ms: float = 0.0,
    *,
    step_overhead_ms: float = 0.0,
    send_host=None,
    recv_host=None,
    recv_late_host=None,
    labels_bytes: float = 0.0,
    stage_costs=None,
    free_links: bool = False,
):
    """Run the simulator on a plan's predicted costs with the schedule the workers run:
    a replicated stage's replicas as separate timelines (see :func:`schedule.replica_actions`).

    ``stage_costs`` (one :class:`~partitioners.simulator.StageCosts` per stage) replaces the
    plan's compute, e.g. with what a run's workers measured (a replay); ``free_links`` makes
    every transfer instant (the step the same compute would take on free links).

    The costs outside the plan's stages are zero unless given (see
    :func:`partitioners.simulator.simulate`): ``step_overhead_ms`` per step, and the host CPU
    of each end of a transfer (``send_host`` / ``recv_host`` / ``recv_late_host``,
    :class:`~partitioners.simulator.HostCost`)
    of the plan's ``cut_bytes`` per activation and gradient, ``labels_bytes`` per labels transfer."""
    from partitioners.simulator import LinkCosts, StageCosts, simulate

    sched = plan.actions()
    stages = stage_costs or [StageCosts(s.fwd_ms, s.bwd_ms, s.opt_ms, s.allreduce_ms) for s in plan.stages]
    if len(stages) != plan.num_stages:
        raise ValueError(f"stage_costs has {len(stages)} entries for a plan of {plan.num_stages} stages")
    links = [
        LinkCosts(0.0 if free_links else s.link_act_ms, 0.0 if free_links else s.link_grad_ms, s.cut_bytes, s.cut_bytes)
        for s in plan.stages[:-1]
    ]
    if free_links:
        labels_ms = 0.0
    replicas = [len(s.devices) for s in plan.stages]
    return simulate(
        sched,
        stages,
        links,
        labels_ms=labels_ms,
        replicas=replicas,
        step_overhead_ms=step_overhead_ms,
        send_host=send_host,
        recv_host=recv_host,
        recv_late_host=recv_late_host,
        labels_bytes=labels_bytes,
    )


PARTITIONERS = {
    "uniform": uniform,
    "balanced": balanced,
    "optimal": optimal,
    "manual": manual,
    "exhaustive": exhaustive,
}


def partition(name: str, req: PlanRequest) -> Plan:
    if name not in PARTITIONERS:
        raise PlanError(f"plan.partitioner: '{name}' is not one of {', '.join(PARTITIONERS)}")
    return PARTITIONERS[name](req)
