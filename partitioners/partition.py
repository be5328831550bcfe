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
from partitioners.costmodel import PRECISIONS, micro_batches_in_flight, stage_memory, stage_time
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

    @property
    def n(self) -> int:
        return len(self.layers)


@dataclass
class Evaluation:
    step_ms: float
    bottleneck: str
    busy_ms: float  # total compute of all stages, for the bubble fraction
    stage_ms: list[float]  # per stage, per micro-batch
    link_ms: list[tuple[float, float]]  # per cut: (activation, gradient) per micro-batch


class CostTables:
    """Per-device prefix sums so that any stage and any cut costs O(1)."""

    def __init__(self, req: PlanRequest):
        self.req = req
        L = req.layers
        topo = req.topology
        self.M = req.num_micro_batches
        self.dev = {d.name: d for d in topo.devices}
        # per-micro-batch compute of layer i on each device (opt spread over M micro-batches)
        self._cum: dict[str, np.ndarray] = {}
        for d in topo.devices:
            per = [stage_time([layer], d, req.calibrated_tflops) for layer in L]
            costs = np.array([t.fwd_ms + t.bwd_ms + t.opt_ms / self.M for t in per])
            self._cum[d.name] = np.concatenate([[0.0], np.cumsum(costs)])
        ratio = CODEC_BYTES[req.codec]
        self.cut_bytes = [layer.out_bytes * ratio for layer in L]  # after layer i
        self._mem: dict[int, np.ndarray] = {}
        self._link: dict[tuple, tuple[float, float]] = {}

    def stage_ms(self, dev: str, a: int, b: int) -> float:
        c = self._cum[dev]
        return float(c[b] - c[a])

    def mem_table(self, inflight: int) -> np.ndarray:
        """``[a, b]`` -> device bytes of a stage of layers ``a..b-1`` with ``inflight``
        micro-batches in flight: :func:`costmodel.stage_memory`, for every range at once."""
        if inflight not in self._mem:
            L, n = self.req.layers, len(self.req.layers)
            w, g, master, moments = PRECISIONS[self.req.precision]
            static = np.array([layer.params * w + layer.trainable * (g + master + moments) for layer in L], float)
            saved = np.array([layer.saved_bytes for layer in L], float)
            cum_static = np.concatenate([[0.0], np.cumsum(static)])
            cum_saved = np.concatenate([[0.0], np.cumsum(saved)])
            a = np.arange(n + 1)[:, None]
            b = np.arange(n + 1)[None, :]
            out_last = np.array([0.0, *[layer.out_bytes for layer in L]])[b]  # out of layer b-1
            in_first = np.array([*[layer.in_bytes for layer in L], 0.0])[a]
            trans = np.zeros((n + 1, n + 1))
            tb = np.array([layer.bwd_transient_bytes for layer in L], float)
            for i in range(n):  # running max of transient bytes over layers i..b-1
                trans[i, i + 1 :] = np.maximum.accumulate(tb[i:])
            table = (cum_static[b] - cum_static[a]) + inflight * (cum_saved[b] - cum_saved[a] + out_last)
            table = table + in_first + out_last + trans
            table[b <= a] = np.inf
            self._mem[inflight] = table
        return self._mem[inflight]

    def inflight(self, s: int, S: int) -> int:
        return micro_batches_in_flight(self.req.schedule, s, S, self.M)

    def stage_mem(self, a: int, b: int, s: int, S: int) -> float:
        return float(self.mem_table(self.inflight(s, S))[a, b])

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


def check_plan(req: PlanRequest, tables: CostTables, seq: list[str], bounds: list[int]) -> str | None:
    """Why this device sequence and these cuts break a constraint, or None."""
    S = len(seq)
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
        used[seq[s]] = used.get(seq[s], 0.0) + tables.stage_mem(a, b, s, S)
        stages_on.setdefault(seq[s], []).append(f"stage {s} ({req.layers[a].name}..{req.layers[b - 1].name})")
    for dev, need in used.items():
        cap = tables.capacity(dev)
        if need > cap:
            return (
                f"{' and '.join(stages_on[dev])} on device '{dev}' needs {need / GB:.3g} GB but the device has "
                f"memory_gb={cap / GB:g} ({(need - cap) / GB:.3g} GB short)"
            )
    return None


def evaluate(tables: CostTables, seq: list[str], bounds: list[int]) -> Evaluation:
    stage_ms = [tables.stage_ms(seq[s], bounds[s], bounds[s + 1]) for s in range(len(seq))]
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


# -- plan assembly ------------------------------------------------------------------------


def build_plan(req: PlanRequest, tables: CostTables, seq: list[str], bounds: list[int], name: str) -> Plan:
    why = check_plan(req, tables, seq, bounds)
    if why:
        raise PlanError(why)
    ev = evaluate(tables, seq, bounds)
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
        )
        t = stage_time(seg, req.topology.device(seq[s]), req.calibrated_tflops)
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
                if tables.stage_mem(a, b, s, S) > tables.capacity(seq[s]):
                    continue
                c = tables.stage_ms(seq[s], a, b)
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
    for seq in device_sequences(req):
        S = len(seq)
        for cuts in itertools.combinations(range(1, n), S - 1):
            bounds = [0, *cuts, n]
            if check_plan(req, tables, seq, bounds):
                continue
            t = evaluate(tables, seq, bounds).step_ms
            if best is None or t < best[0] - 1e-12:
                best = (t, seq, bounds)
    if best is None:
        raise PlanError(_infeasible_reason(req, tables, device_sequences(req)))
    return build_plan(req, tables, best[1], best[2], "exhaustive")


# A label of the cut search: (worst resource so far, total so far, the owner's first-stage
# ms and bytes (U-shape only), back-pointer (stage, start, previous label)). Plain tuples:
# millions are made for large topologies.
_W, _T, _FMS, _FMEM, _PREV = range(5)


def _pareto_cuts(req: PlanRequest, tables: CostTables, seq: list[str], bound: float) -> tuple[float, list[int]] | None:
    """The best cuts for a fixed device sequence: a dynamic programme over (stage, cut)
    keeping every label (worst resource so far, total so far) that no other label beats in
    both — exact for the objective total + (M-1) * worst. Labels whose lower bound is not
    below ``bound`` are dropped."""
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
        cum = tables._cum[dev]
        memtab = tables.mem_table(tables.inflight(s, S))
        hi = n if last else n - (S - s - 1)
        for a, labels in frontier.items():
            lo = n if last else a + 1
            if lo > hi:
                continue
            bs = np.arange(lo, hi + 1)
            c = cum[bs] - cum[a]
            mem = memtab[a, bs]
            la, lg = tables.link(seq[s - 1], dev, a) if s > 0 else (0.0, 0.0)
            for lab in labels:
                w0, t0, fms, fmem = lab[_W], lab[_T], lab[_FMS], lab[_FMEM]
                if ushape and last:
                    ok = fmem + mem <= cap
                    worst = np.maximum(max(w0, la, lg), fms + c)
                elif ushape and s == 0:
                    ok = mem <= cap
                    worst = np.full(len(bs), max(w0, la, lg))  # the owner's load is known at the end
                else:
                    ok = mem <= cap
                    worst = np.maximum(max(w0, la, lg), c)
                total = t0 + c + la + lg
                low = M * total if sequential else total + (M - 1) * worst
                keep = np.nonzero(ok & (low < bound))[0]
                if not len(keep):
                    continue
                prev = (s, a, lab)
                first = ushape and s == 0
                for wk, tk, ck, mk, b in zip(
                    worst[keep].tolist(),
                    total[keep].tolist(),
                    c[keep].tolist(),
                    mem[keep].tolist(),
                    bs[keep].tolist(),
                    strict=True,
                ):
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
    cuts, lab = [], best
    while lab[_PREV] is not None:
        s, a, lab = lab[_PREV]
        cuts.append(a)
    bounds = sorted(set([*cuts, n]))
    return lower(best), bounds


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
    best: tuple[float, list[str], list[int]] | None = None
    for seq in sorted(candidates, key=len):
        got = _pareto_cuts(req, tables, seq, best[0] if best else math.inf)
        if got is not None and (best is None or got[0] < best[0] - 1e-12):
            best = (got[0], seq, got[1])
    if best is None:
        raise PlanError(_infeasible_reason(req, tables, candidates))
    return build_plan(req, tables, best[1], best[2], "optimal")


def _infeasible_reason(req: PlanRequest, tables: CostTables, seqs: list[list[str]]) -> str:
    """One line: which constraint fails, and by how much, for the most promising attempt."""
    topo = req.topology
    owner = topo.data_owner
    total_need = stage_memory(
        req.layers, schedule=req.schedule, num_micro_batches=req.num_micro_batches, precision=req.precision
    ).device_total
    pool = list(req.devices or topo.device_names)
    total_cap = sum(topo.device(d).memory_gb for d in pool) * GB
    if total_need > total_cap:
        return (
            f"no feasible plan: the model needs {total_need / GB:.2f} GB for training but the devices "
            f"together have {total_cap / GB:.2f} GB ({(total_need - total_cap) / GB:.2f} GB short)"
        )
    first = stage_memory(
        req.layers[:1],
        stage=0,
        num_stages=max(len(pool), 1),
        schedule=req.schedule,
        num_micro_batches=req.num_micro_batches,
        precision=req.precision,
    ).device_total
    if req.label_privacy:
        first += stage_memory(
            req.layers[-1:], schedule=req.schedule, num_micro_batches=req.num_micro_batches, precision=req.precision
        ).device_total
    if first > owner.memory_gb * GB:
        what = "the embedding and the head (label_privacy)" if req.label_privacy else "the embedding"
        return (
            f"no feasible plan: privacy pins {what} to '{owner.name}', which needs {first / GB:.3f} GB "
            f"but has memory_gb={owner.memory_gb:g} ({(first - owner.memory_gb * GB) / GB:.3f} GB short)"
        )
    # report the tightest stage of the first sequence's uniform split
    seq = max(seqs, key=len) if seqs else [owner.name]
    bounds = [0, *uniform_cuts(req.n, min(len(seq), req.n)), req.n]
    why = check_plan(req, tables, seq[: len(bounds) - 1], bounds)
    return f"no feasible plan: memory does not fit on any device sequence (e.g. {why})"


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
