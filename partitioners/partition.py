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

import itertools
import math
from dataclasses import dataclass

import numpy as np

from cluster.errors import UserError
from cluster.topology import Topology
from partitioners.costmodel import (
    ALLOW_OPTIONS,
    PRECISIONS,
    FinetunePolicy,
    StageMethod,
    effective_layer,
    micro_batches_in_flight,
    stage_memory,
    stage_options,
    stage_time,
    weight_bytes,
)
from partitioners.plan import Plan, Stage
from partitioners.profile import LayerProfile

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

    @property
    def n(self) -> int:
        return len(self.layers)

    def __post_init__(self) -> None:
        bad = [a for a in self.allow if a not in ALLOW_OPTIONS]
        if bad:
            raise PlanError(f"plan.allow: '{bad[0]}' is not one of {', '.join(ALLOW_OPTIONS)}")
        self.allow = tuple(self.allow)

    def options(self, stage: int, device: str) -> list[StageMethod]:
        """The methods stage ``stage`` may use on ``device``: the configured one first."""
        tier = self.topology.device(device).tier
        base = (self.finetune or FinetunePolicy()).for_stage(stage, tier)
        return stage_options(base, self.allow) if tier == "edge" else [base]


@dataclass
class Evaluation:
    step_ms: float
    bottleneck: str
    busy_ms: float  # total compute of all stages, for the bubble fraction
    stage_ms: list[float]  # per stage, per micro-batch
    link_ms: list[tuple[float, float]]  # per cut: (activation, gradient) per micro-batch


class CostTables:
    """Per-device (and per fine-tuning method) prefix sums so that any stage and any cut
    costs O(1)."""

    def __init__(self, req: PlanRequest):
        self.req = req
        L = req.layers
        topo = req.topology
        self.M = req.num_micro_batches
        self.dev = {d.name: d for d in topo.devices}
        self._cum: dict[tuple[str, StageMethod], np.ndarray] = {}
        ratio = CODEC_BYTES[req.codec]
        self.cut_bytes = [layer.out_bytes * ratio for layer in L]  # after layer i
        self._mem: dict[tuple[int, StageMethod], np.ndarray] = {}
        self._link: dict[tuple, tuple[float, float]] = {}
        self._opts: dict[tuple[int, str], list[StageMethod]] = {}

    def options(self, s: int, dev: str) -> list[StageMethod]:
        key = (s, dev)
        if key not in self._opts:
            self._opts[key] = self.req.options(s, dev)
        return self._opts[key]

    def cum(self, dev: str, opt: StageMethod | None = None) -> np.ndarray:
        """Prefix sums of each layer's per-micro-batch compute on ``dev`` under ``opt``
        (its optimizer step spread over the step's micro-batches)."""
        key = (dev, opt or StageMethod())
        if key not in self._cum:
            d = self.dev[dev]
            per = [stage_time([layer], d, self.req.calibrated_tflops, method=key[1]) for layer in self.req.layers]
            costs = np.array([t.fwd_ms + t.bwd_ms + t.opt_ms / self.M for t in per])
            self._cum[key] = np.concatenate([[0.0], np.cumsum(costs)])
        return self._cum[key]

    def stage_ms(self, dev: str, a: int, b: int, opt: StageMethod | None = None) -> float:
        c = self.cum(dev, opt)
        return float(c[b] - c[a])

    def mem_table(self, inflight: int, opt: StageMethod | None = None) -> np.ndarray:
        """``[a, b]`` -> device bytes of a stage of layers ``a..b-1`` with ``inflight``
        micro-batches in flight: :func:`costmodel.stage_memory`, for every range at once."""
        opt = opt or StageMethod()
        if (inflight, opt) not in self._mem:
            base, n = self.req.layers, len(self.req.layers)
            L = [effective_layer(layer, opt) for layer in base]
            w, g, master, moments = PRECISIONS[self.req.precision]
            static = np.array(
                [
                    weight_bytes(b, e, opt, w) + e.trainable * (g + master + moments)
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
            trans = np.zeros((n + 1, n + 1))
            tb = np.array([layer.bwd_transient_bytes for layer in L], float)
            for i in range(n):  # running max of transient bytes over layers i..b-1
                trans[i, i + 1 :] = np.maximum.accumulate(tb[i:])
            if opt.recompute:  # inputs held; one layer's saved activations while it is recomputed
                held = np.array([layer.in_bytes for layer in L], float)
                cum_held = np.concatenate([[0.0], np.cumsum(held)])
                peak_saved = np.zeros((n + 1, n + 1))
                for i in range(n):
                    peak_saved[i, i + 1 :] = np.maximum.accumulate(saved[i:])
                acts = inflight * (cum_held[b] - cum_held[a] + out_last) + peak_saved
            else:
                cum_saved = np.concatenate([[0.0], np.cumsum(saved)])
                acts = inflight * (cum_saved[b] - cum_saved[a] + out_last)
            table = (cum_static[b] - cum_static[a]) + acts + in_first + out_last + trans
            table[b <= a] = np.inf
            self._mem[(inflight, opt)] = table
        return self._mem[(inflight, opt)]

    def inflight(self, s: int, S: int) -> int:
        return micro_batches_in_flight(self.req.schedule, s, S, self.M)

    def stage_mem(self, a: int, b: int, s: int, S: int, opt: StageMethod | None = None) -> float:
        return float(self.mem_table(self.inflight(s, S), opt)[a, b])

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

    def objective(self, total: float, worst: float) -> float:
        if self.req.schedule == "sequential":
            return self.M * total
        return total + (self.M - 1) * worst


def base_options(tables: CostTables, seq: list[str]) -> list[StageMethod]:
    """The configured method of each stage (no planner choice)."""
    return [tables.options(s, dev)[0] for s, dev in enumerate(seq)]


def check_plan(
    req: PlanRequest,
    tables: CostTables,
    seq: list[str],
    bounds: list[int],
    opts: list[StageMethod] | None = None,
) -> str | None:
    """Why this device sequence, these cuts and these stage methods (default: the
    configured ones) break a constraint, or None."""
    S = len(seq)
    opts = opts or base_options(tables, seq)
    topo = req.topology
    if not topo.device(seq[0]).owns_data:
        return f"the first stage (embedding, raw inputs) must run on a data-owning device, not '{seq[0]}'"
    if req.label_privacy and seq[-1] != seq[0]:
        return f"label_privacy: the last stage (head, labels) must run on '{seq[0]}', not '{seq[-1]}'"
    used: dict[str, float] = {}
    stages_on: dict[str, list[str]] = {}
    for s in range(S):
        a, b = bounds[s], bounds[s + 1]
        if not a < b:
            return f"stage {s} would be empty (cuts {bounds[1:-1]})"
        used[seq[s]] = used.get(seq[s], 0.0) + tables.stage_mem(a, b, s, S, opts[s])
        what = f"stage {s} ({req.layers[a].name}..{req.layers[b - 1].name}"
        what += f", {opts[s].label})" if opts[s] != StageMethod() else ")"
        stages_on.setdefault(seq[s], []).append(what)
    for dev, need in used.items():
        cap = tables.capacity(dev)
        if need > cap:
            return (
                f"{' and '.join(stages_on[dev])} on device '{dev}' needs {need / GB:.3g} GB but the device has "
                f"memory_gb={cap / GB:g} ({(need - cap) / GB:.3g} GB short)"
            )
    return None


def evaluate(
    tables: CostTables, seq: list[str], bounds: list[int], opts: list[StageMethod] | None = None
) -> Evaluation:
    opts = opts or base_options(tables, seq)
    stage_ms = [tables.stage_ms(seq[s], bounds[s], bounds[s + 1], opts[s]) for s in range(len(seq))]
    links = [tables.link(seq[s], seq[s + 1], bounds[s + 1]) for s in range(len(seq) - 1)]
    load: dict[str, float] = {}
    for dev, ms in zip(seq, stage_ms, strict=True):
        load[dev] = load.get(dev, 0.0) + ms
    total = sum(stage_ms) + sum(a + g for a, g in links)
    worst_dev = max(load, key=lambda d: load[d])
    worst, bottleneck = load[worst_dev], f"device {worst_dev}"
    for s, (a, g) in enumerate(links):
        if max(a, g) > worst:
            worst, bottleneck = max(a, g), f"link {seq[s]}->{seq[s + 1]}" if a >= g else f"link {seq[s + 1]}->{seq[s]}"
    return Evaluation(tables.objective(total, worst), bottleneck, sum(stage_ms), stage_ms, links)


def choose_options(req: PlanRequest, tables: CostTables, seq: list[str], bounds: list[int]) -> list[StageMethod] | None:
    """The fastest stage methods that fit, for fixed devices and cuts (None: none fit).

    A stage alone on its device takes its fastest option that fits (the configured one on
    ties): the objective grows with every stage's time, and its memory concerns no one
    else. Stages sharing a device (the U-shape's two stages on the data owner) try every
    combination of their options together."""
    S = len(seq)
    chosen: list[StageMethod | None] = [None] * S
    by_dev: dict[str, list[int]] = {}
    for s, dev in enumerate(seq):
        by_dev.setdefault(dev, []).append(s)
    shared = []
    for dev, stages in by_dev.items():
        if len(stages) > 1:
            shared.append((dev, stages))
            continue
        s = stages[0]
        a, b = bounds[s], bounds[s + 1]
        fits = [o for o in tables.options(s, dev) if tables.stage_mem(a, b, s, S, o) <= tables.capacity(dev)]
        if not fits:
            return None
        chosen[s] = min(fits, key=lambda o, a=a, b=b, dev=dev: tables.stage_ms(dev, a, b, o))
    for dev, stages in shared:
        best = None
        for combo in itertools.product(*[tables.options(s, dev) for s in stages]):
            need = sum(tables.stage_mem(bounds[s], bounds[s + 1], s, S, o) for s, o in zip(stages, combo, strict=True))
            if need > tables.capacity(dev):
                continue
            trial = list(chosen)
            for s, o in zip(stages, combo, strict=True):
                trial[s] = o
            # the other shared groups (none today) at their configured option meanwhile
            full = [o if o is not None else tables.options(i, seq[i])[0] for i, o in enumerate(trial)]
            t = evaluate(tables, seq, bounds, full).step_ms
            if best is None or t < best[0] - 1e-12:
                best = (t, combo)
        if best is None:
            return None
        for s, o in zip(stages, best[1], strict=True):
            chosen[s] = o
    return [o for o in chosen if o is not None]


# -- plan assembly ------------------------------------------------------------------------


def build_plan(
    req: PlanRequest,
    tables: CostTables,
    seq: list[str],
    bounds: list[int],
    name: str,
    opts: list[StageMethod] | None = None,
) -> Plan:
    if opts is None:
        opts = choose_options(req, tables, seq, bounds)
    why = check_plan(req, tables, seq, bounds, opts)
    if why:
        raise PlanError(why + _allow_hint(req, seq))
    assert opts is not None
    ev = evaluate(tables, seq, bounds, opts)
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
        t = stage_time(seg, req.topology.device(seq[s]), req.calibrated_tflops, method=opts[s])
        link = ev.link_ms[s] if s < S - 1 else (0.0, 0.0)
        stages.append(
            Stage(
                index=s,
                start=a,
                stop=b,
                devices=[seq[s]],
                layer_names=[layer.name for layer in seg],
                codec=req.codec,
                params=sum(layer.params for layer in seg),
                memory_gb=round(mem.device_total / GB, 6),
                fwd_ms=round(t.fwd_ms, 4),
                bwd_ms=round(t.bwd_ms, 4),
                opt_ms=round(t.opt_ms, 4),
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
    bubble = 1.0 - ev.busy_ms * req.num_micro_batches / (len(set(seq)) * ev.step_ms) if ev.step_ms > 0 else 0.0
    return Plan(
        stages=stages,
        partitioner=name,
        schedule=req.schedule,
        num_micro_batches=req.num_micro_batches,
        label_privacy=req.label_privacy,
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


def _ordered_devices(req: PlanRequest) -> list[str]:
    devices = list(req.devices or default_device_order(req.topology))
    for d in devices:
        req.topology.device(d)
    if len(set(devices)) != len(devices):
        raise PlanError(f"plan.devices: a device is listed twice: {devices}")
    return devices


def uniform(req: PlanRequest) -> Plan:
    tables = CostTables(req)
    seq = _sequence(req, _ordered_devices(req))
    if len(seq) > req.n:
        raise PlanError(
            f"plan.devices: {len(seq)} stages but the model has only {req.n} layers to share; "
            "list fewer devices in plan.devices"
        )
    return build_plan(req, tables, seq, [0, *uniform_cuts(req.n, len(seq)), req.n], "uniform")


def manual(req: PlanRequest) -> Plan:
    tables = CostTables(req)
    seq = _sequence(req, _ordered_devices(req))
    cuts = list(req.cuts or [])
    if len(cuts) != len(seq) - 1:
        raise PlanError(f"plan.cuts: {len(seq)} stages need {len(seq) - 1} cuts, got {len(cuts)}")
    bounds = [0, *cuts, req.n]
    if any(not bounds[i] < bounds[i + 1] for i in range(len(bounds) - 1)):
        raise PlanError(
            f"plan.cuts: {cuts} must be strictly increasing within 1..{req.n - 1} "
            f"(the chain has {req.n} layers: embed=0, blocks 1..{req.n - 2}, head={req.n - 1})"
        )
    return build_plan(req, tables, seq, bounds, "manual")


def balanced(req: PlanRequest) -> Plan:
    """The cuts over the devices in the order given that minimise the largest stage cost
    (per micro-batch, on its own device), then the sum; memory respected."""
    tables = CostTables(req)
    seq = _sequence(req, _ordered_devices(req))
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
                fits = [
                    o for o in tables.options(s, seq[s]) if tables.stage_mem(a, b, s, S, o) <= tables.capacity(seq[s])
                ]
                if not fits:
                    continue
                c = min(tables.stage_ms(seq[s], a, b, o) for o in fits)
                cand = (max(best[s][a][0], c), best[s][a][1] + c)
                if cand < best[s + 1][b]:
                    best[s + 1][b], back[s + 1][b] = cand, a
    if best[S][n] == INF:
        raise PlanError(_infeasible_reason(req, tables, [seq]))
    bounds, b = [n], n
    for s in range(S, 0, -1):
        b = back[s][b]
        bounds.append(b)
    return build_plan(req, tables, seq, bounds[::-1], "balanced")


# -- exhaustive and optimal -----------------------------------------------------------------


def device_sequences(req: PlanRequest) -> list[list[str]]:
    """Every ordered choice of devices that starts on a data owner (and, with label
    privacy, ends on it too)."""
    topo = req.topology
    pool = list(req.devices or topo.device_names)
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
        choices = list(itertools.product(*[tables.options(s, dev) for s, dev in enumerate(seq)]))
        for cuts in itertools.combinations(range(1, n), S - 1):
            bounds = [0, *cuts, n]
            for combo in choices:
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
# ms and bytes (U-shape only), back-pointer (stage, start, previous label)). Plain tuples:
# millions are made for large topologies.
_W, _T, _FMS, _FMEM, _PREV = range(5)


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

    frontier: dict[int, list[tuple]] = {0: [(0.0, 0.0, 0.0, 0.0, None)]}
    for s in range(S):
        nxt: dict[int, list[tuple]] = {}
        dev = seq[s]
        cap = tables.capacity(dev)
        last = s == S - 1
        opts = tables.options(s, dev)
        cums = [tables.cum(dev, o) for o in opts]
        memtabs = [tables.mem_table(tables.inflight(s, S), o) for o in opts]
        hi = n if last else n - (S - s - 1)
        for a, labels in frontier.items():
            lo = n if last else a + 1
            if lo > hi:
                continue
            bs = np.arange(lo, hi + 1)
            cs = np.stack([cum[bs] - cum[a] for cum in cums])  # (options, ends)
            mems = np.stack([memtab[a, bs] for memtab in memtabs])
            la, lg = tables.link(seq[s - 1], dev, a) if s > 0 else (0.0, 0.0)
            first = ushape and s == 0
            for lab in labels:
                w0, t0, fms, fmem = lab[_W], lab[_T], lab[_FMS], lab[_FMEM]
                if first:  # one candidate per option: their memory matters to the last stage
                    variants = [(np.full(len(bs), k), cs[k], mems[k], mems[k] <= cap) for k in range(len(opts))]
                else:
                    fits = (fmem + mems <= cap) if (ushape and last) else (mems <= cap)
                    masked = np.where(fits, cs, np.inf)
                    k_best = np.argmin(masked, axis=0)  # the first (configured) option on ties
                    cols = np.arange(len(bs))
                    variants = [(k_best, cs[k_best, cols], mems[k_best, cols], fits[k_best, cols])]
                for ks, c, mem, ok in variants:
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
                    for wk, tk, ck, mk, b, k in zip(
                        worst[keep].tolist(),
                        total[keep].tolist(),
                        c[keep].tolist(),
                        mem[keep].tolist(),
                        bs[keep].tolist(),
                        ks[keep].tolist(),
                        strict=True,
                    ):
                        prev = (s, a, lab, k)
                        lab_new = (wk, tk, ck, mk, prev) if first else (wk, tk, fms, fmem, prev)
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
        labels.sort(key=lambda x: (x[_W], x[_T], x[_FMS], x[_FMEM]))
        out: list[tuple] = []
        for lab in labels:
            if not any(
                o[_W] <= lab[_W] and o[_T] <= lab[_T] and o[_FMS] <= lab[_FMS] and o[_FMEM] <= lab[_FMEM] for o in out
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
    pool = list(req.devices or topo.device_names)
    owner = next(d for d in pool if topo.device(d).owns_data)
    rest = [d for d in pool if d != owner]
    rest.sort(key=lambda d: (-topo.link(owner, d).bandwidth_mbps, -topo.device(d).tflops, -topo.device(d).memory_gb, d))
    return [owner, *rest]


def optimal(req: PlanRequest) -> Plan:
    tables = CostTables(req)
    pool = list(req.devices or req.topology.device_names)
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
    return build_plan(req, tables, best[1], best[2], "optimal", best[3])


def _allow_hint(req: PlanRequest, seq: list[str]) -> str:
    """A pointer to ``plan.allow`` when edge stages could shrink but may not."""
    if req.allow or not any(req.topology.device(d).tier == "edge" for d in seq):
        return ""
    return "; plan.allow: [lora, recompute, int8] lets edge stages train with less memory"


def _infeasible_reason(req: PlanRequest, tables: CostTables, seqs: list[list[str]]) -> str:
    """One line: which constraint fails, and by how much, for the most promising attempt."""
    topo = req.topology
    owner = topo.data_owner
    pool = list(req.devices or topo.device_names)
    hint = _allow_hint(req, pool)
    if req.finetune is None and not req.allow:  # every stage full: the whole model's need is known
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
    why = check_plan(req, tables, seq[: len(bounds) - 1], bounds)
    return f"no feasible plan: memory does not fit on any device sequence (e.g. {why}){hint}"


def simulate_plan(plan: Plan, labels_ms: float = 0.0):
    """Run the simulator on a plan's predicted costs with the schedule the workers run."""
    from partitioners import schedule as S
    from partitioners.simulator import LinkCosts, StageCosts, simulate

    sched = S.build(plan.schedule, plan.num_stages, plan.num_micro_batches)
    stages = [StageCosts(s.fwd_ms, s.bwd_ms, s.opt_ms) for s in plan.stages]
    links = [LinkCosts(s.link_act_ms, s.link_grad_ms) for s in plan.stages[:-1]]
    return simulate(sched, stages, links, labels_ms=labels_ms)


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
