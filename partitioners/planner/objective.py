"""The objective: what one training step of a plan takes, as the simulator runs it.

The planner's figure for a plan is the simulator's (:mod:`partitioners.simulator`): the
same action lists the workers execute, one device's stages sharing its compute (the
U-shape's two stages on the data owner), transfers that cross one zone uplink sharing it,
replicas as their own timelines. Two schedules have a closed form that equals the
simulator's makespan when nothing is shared and nothing is replicated (checked in the
tests), and :func:`evaluate` takes it there instead of running the simulator:

- ``sequential``: a micro-batch's whole round trip ``P`` (every forward, backward and
  transfer) ``M`` times; stage ``s`` finishes its last backward ``pre_s`` (the backwards
  and gradient transfers of the stages before it) before the end, so the step is
  ``M P + max_s (O_s - pre_s)``, with ``O_s`` the stage's optimizer step;
- ``gpipe``: the forward phase is a flow shop over the stages and activation wires (every
  micro-batch in order through each): ``sum + (M - 1) max`` of their per-micro-batch
  times; the backward phase is one over the stages and gradient wires from the last stage
  back, and stage ``s`` ends its backwards at that flow shop's completion ``C_s`` at its
  machine; the step is the forward phase plus ``max_s (C_s + O_s)`` (the optimizer steps of
  different stages overlap).

:func:`lower_bound` is a bound below the simulator's step for every schedule, shared or
not: what the searches minimise where no closed form is exact (1F1B, shared devices and
uplinks), so that a plan can carry a proven distance from the best.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import numpy as np

from partitioners.costmodel import PRECISIONS, StageMethod
from partitioners.planner.feasibility import base_options
from partitioners.planner.request import Groups, group_name, groups_of
from partitioners.planner.tables import CostTables
from partitioners.schedule import Schedule, replica_pairs
from partitioners.schedule import build as build_schedule
from partitioners.simulator import LinkCosts, StageCosts, link_resource, node_name, simulate


@dataclass
class StepFigures:
    """A plan's costs as the objective reads them: per stage one micro-batch's forward and
    backward, its optimizer step and all-reduce (once per step) and its replica count; per
    cut the activation and gradient transfer; which stages share a device and which wires
    share an uplink."""

    fwd: list[float]
    bwd: list[float]
    opt: list[float]
    allreduce: list[float]
    replicas: list[int]
    act: list[float]
    grad: list[float]
    shared: list[tuple[int, ...]] = field(default_factory=list)
    channels: dict[str, str] = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(self.fwd)

    @property
    def plain(self) -> bool:
        """Nothing shared and nothing replicated: where the closed forms are exact."""
        return not self.shared and not self.channels and all(r == 1 for r in self.replicas)


def figures(
    tables: CostTables, seq: list[str], bounds: list[int], opts: list[StageMethod], groups: Groups
) -> StepFigures:
    S, M = len(seq), tables.M
    fwd, bwd, opt, ar = [], [], [], []
    for s in range(S):
        # the slowest replica sets the stage's pace (replicas are identical, federated clients may differ)
        f, b, o = max((tables.fbo(d, bounds[s], bounds[s + 1], opts[s]) for d in groups[s]), key=lambda t: t[0] + t[1])
        fwd.append(f)
        bwd.append(b)
        opt.append(o)
        ar.append(tables.allreduce_ms(groups[s], bounds[s], bounds[s + 1], opts[s]))
    if tables.req.clients and S > 1:  # the clients' sum goes through the server, never client to client
        ar[0] = fedavg_ms(tables, groups[0], groups[1][0], bounds[0], bounds[1], opts[0])
    act, grad = [], []
    topo = tables.req.topology
    uplinks: dict[str, list[str]] = {}
    for s in range(S - 1):
        src, dst = groups[s], groups[s + 1]
        pairs = replica_pairs(len(src), len(dst), M)
        figs = [tables.link(src[r], dst[q], bounds[s + 1]) for r, q in pairs]
        act.append(max(x[0] for x in figs))
        grad.append(max(x[1] for x in figs))
        for r, q in pairs:
            here, there = node_name(s, r, len(src)), node_name(s + 1, q, len(dst))
            for wire, key in (
                (link_resource(here, there), topo.uplink(src[r], dst[q])),
                (link_resource(there, here), topo.uplink(dst[q], src[r])),
            ):
                if key is not None:
                    uplinks.setdefault(key, []).append(wire)
    channels = {w: key for key, wires in uplinks.items() if len(wires) > 1 for w in wires}
    on: dict[str, list[int]] = {}
    for s, d in enumerate(seq):
        on.setdefault(d, []).append(s)
    shared = [tuple(v) for v in on.values() if len(v) > 1]
    return StepFigures(fwd, bwd, opt, ar, [len(g) for g in groups], act, grad, shared, channels)


def fedavg_ms(tables: CostTables, clients: tuple[str, ...], server: str, a: int, b: int, opt: StageMethod) -> float:
    """The clients' front gradients (or weights) summed through ``server``: each client's
    copy up and the sum back over its own link, in parallel; the slowest round trip."""
    topo = tables.req.topology
    nbytes = tables.trainable(a, b, opt) * PRECISIONS[tables.req.precision][1]
    return max(topo.transfer_ms(c, server, nbytes) + topo.transfer_ms(server, c, nbytes) for c in clients)


def _flow_shop(times: list[float], M: int) -> list[float]:
    """Completion of the last of ``M`` identical jobs at each machine of a flow shop."""
    out, total, worst = [], 0.0, 0.0
    for p in times:
        total += p
        worst = max(worst, p)
        out.append(total + (M - 1) * worst)
    return out


def closed_form(schedule: str, fig: StepFigures, M: int) -> float | None:
    """The simulator's step for ``sequential`` and ``gpipe`` plans with nothing shared or
    replicated (see the module notes); None elsewhere."""
    if not fig.plain or schedule not in ("sequential", "gpipe"):
        return None
    S = fig.num_stages
    F, B, Opt, a, g = fig.fwd, fig.bwd, fig.opt, fig.act, fig.grad
    if schedule == "sequential":
        P = sum(F) + sum(B) + sum(a) + sum(g)
        pre, best = 0.0, -math.inf
        for s in range(S):
            best = max(best, Opt[s] - pre)
            pre += B[s] + (g[s] if s < S - 1 else 0.0)
        return M * P + best
    forward = []
    for s in range(S):
        forward.append(F[s])
        if s < S - 1:
            forward.append(a[s])
    backward, machine = [], []
    for s in range(S - 1, -1, -1):
        backward.append(B[s])
        machine.append(s)
        if s > 0:
            backward.append(g[s - 1])
            machine.append(-1)
    done = _flow_shop(backward, M)
    return _flow_shop(forward, M)[-1] + max(c + Opt[s] for c, s in zip(done, machine, strict=True) if s >= 0)


def lower_bound(schedule: str, fig: StepFigures, M: int) -> float:
    """A bound below the simulator's step of this plan, for every schedule, whether devices
    and uplinks are shared or not (sharing only delays; replicas are not bounded here: a
    replicated plan returns 0). The terms: a micro-batch's round trip ``P``; each stage's
    own work ``M (F + B)`` after the first micro-batch reaches it and before the last one's
    gradient returns to stage 0; each wire's ``M`` transfers within the round trip; under
    1F1B, stage ``s`` holds at most ``S - s`` micro-batches, so every ``S - s``-th one
    waits for a whole round trip beyond it, and stage ``s + 1`` runs its last
    :func:`drained` backwards after its last forward, so their gradients cross the wire back
    one after another after the last activation arrived (:func:`drained`); the data owner's
    two stages (U-shape) one after the other; and stage 0's optimizer step after
    everything.

    The cut search (:mod:`partitioners.planner.cuts`) ranks by an incremental form of these
    terms with only stage 0's 1F1B round trips (and without its ``B`` and optimizer step
    there); this whole form is the reference the tests hold the simulator above."""
    if any(r > 1 for r in fig.replicas):
        return 0.0
    closed = closed_form(schedule, dataclasses.replace(fig, shared=[], channels={}), M)  # unshared: below
    S = fig.num_stages
    F, B, Opt, a, g = fig.fwd, fig.bwd, fig.opt, fig.act, fig.grad
    P = sum(F) + sum(B) + sum(a) + sum(g)
    best = closed if closed is not None else P + Opt[0]
    head = ahead = 0.0  # the path before stage s: both ways, and forward only
    for s in range(S):
        best = max(best, head + M * (F[s] + B[s]) + Opt[0], ahead + M * (F[s] + B[s]) + Opt[s])
        if schedule == "1f1b":
            K = S - s
            rounds = (M - 1) // K
            rt = P - head
            best = max(best, head + (rounds + 1) * rt + (M - 1 - rounds * K) * B[s] + Opt[0])
        if s < S - 1:
            best = max(best, P + (M - 1) * max(a[s], g[s]) + Opt[0])
            if schedule == "1f1b":
                back = drained(S, s + 1, M)
                best = max(best, head + F[s] + B[s] + M * a[s] + F[s + 1] + B[s + 1] + back * g[s] + Opt[0])
            head += F[s] + B[s] + a[s] + g[s]
            ahead += F[s] + a[s]
    for group in fig.shared:
        best = max(best, sum(M * (F[s] + B[s]) + Opt[s] for s in group))
    return best


def drained(num_stages: int, s: int, M: int) -> int:
    """Under 1F1B, how many backwards stage ``s`` (``s >= 1``) runs after its last forward:
    it warms up with ``S - s - 1`` forwards, then each forward is followed by the backward
    that many micro-batches behind it, so the last forward is followed by that backward and
    the ones still in flight (every one, where it holds all ``M``). Each sends its gradient
    to stage ``s - 1`` over one wire, so after the last activation reaches stage ``s`` (``M``
    transfers after the first) that wire still carries this many gradients, after at least
    one forward and one backward of stage ``s``; then the backwards run down to stage 0."""
    return min(num_stages - s - 1, M - 1) + 1


@functools.lru_cache(maxsize=256)
def _actions(schedule: str, num_stages: int, num_micro_batches: int) -> Schedule:
    """The schedule's action lists, built and checked once per shape (the simulator only reads them)."""
    return build_schedule(schedule, num_stages, num_micro_batches)


def simulated(schedule: str, fig: StepFigures, M: int) -> float:
    """The simulator's step on these figures (the schedule the workers run)."""
    S = fig.num_stages
    stages = [StageCosts(fig.fwd[s], fig.bwd[s], fig.opt[s], fig.allreduce[s]) for s in range(S)]
    links = [LinkCosts(fig.act[s], fig.grad[s]) for s in range(S - 1)]
    sim = simulate(
        _actions(schedule, S, M), stages, links, replicas=fig.replicas, shared=fig.shared, channels=fig.channels
    )
    return sim.step_ms


def step_ms(schedule: str, fig: StepFigures, M: int) -> float:
    """The plan's step: the closed form where it is exact, else the simulator."""
    exact = closed_form(schedule, fig, M)
    return exact if exact is not None else simulated(schedule, fig, M)


@dataclass
class Evaluation:
    step_ms: float
    bottleneck: str
    busy_ms: float  # total compute of all stages, for the bubble fraction
    stage_ms: list[float]  # per stage, per micro-batch (its step's optimizer and all-reduce spread over M)
    link_ms: list[tuple[float, float]]  # per cut: (activation, gradient) per micro-batch
    allreduce_ms: list[float] = field(default_factory=list)  # per stage, once per step (replicas only)
    uplinks: dict[str, str] = field(default_factory=dict)  # wires that share a zone uplink (Plan.uplinks)


def evaluate(
    tables: CostTables,
    seq: list[str],
    bounds: list[int],
    opts: list[StageMethod] | None = None,
    groups: Groups | None = None,
) -> Evaluation:
    """The predicted step of a plan (:func:`step_ms`: the simulator's), and what limits it:
    the resource with the most work per micro-batch (a device, counting every stage it runs
    and a replica's share, or one direction of a link)."""
    S, M = len(seq), tables.M
    opts = opts or base_options(tables, seq)
    groups = groups_of(seq, groups)
    schedule = tables.req.schedule
    fig = figures(tables, seq, bounds, opts, groups)
    stage_ms: list[float] = []
    load: dict[str, float] = {}
    busy = 0.0
    for s in range(S):
        R = len(groups[s])
        fb = fig.fwd[s] + fig.bwd[s]
        step = fig.opt[s] + fig.allreduce[s]
        stage_ms.append(fb + step / M)
        busy += fb + R * step / M
        per_dev = fb + step / M if R == 1 else replica_load(fb, step, effective_replicas(schedule, R, S), M)
        for dev in groups[s]:
            load[dev] = load.get(dev, 0.0) + per_dev
    links = list(zip(fig.act, fig.grad, strict=True))
    worst_dev = max(load, key=lambda d: load[d])
    worst: float = load[worst_dev]
    bottleneck = f"device {worst_dev}"
    for s, (act_ms, grad_ms) in enumerate(links):
        k = math.lcm(len(groups[s]), len(groups[s + 1]))
        wire = max(act_ms, grad_ms) if k == 1 or M < 2 else (M // k - 1) * max(act_ms, grad_ms) / (M - 1)
        if wire > worst:
            src_name, dst_name = group_name(groups[s]), group_name(groups[s + 1])
            worst = wire
            bottleneck = f"link {src_name}->{dst_name}" if act_ms >= grad_ms else f"link {dst_name}->{src_name}"
    step = step_ms(schedule, fig, M) + tables.req.step_overhead_ms
    return Evaluation(step, bottleneck, busy, stage_ms, links, fig.allreduce, fig.channels)


def effective_replicas(schedule: str, num_replicas: int, num_stages: int) -> int:
    """How many replicas of a stage can be busy at once: 1F1B lets the data owner's stage
    run at most ``S`` micro-batches ahead of its backwards (its warmup), so no more than
    ``S`` replicas find work at a time; GPipe forwards every micro-batch first."""
    return min(num_replicas, num_stages) if schedule == "1f1b" else num_replicas


def replica_load(fwd_bwd_ms: float, step_ms: float, busy_replicas: int, num_micro_batches: int) -> float:
    """A replicated stage's work per micro-batch on each replica: ``M / R`` forwards and
    backwards one after another (``R`` replicas busy at once) and one optimizer step with the
    all-reduce, over ``M - 1`` (the stage's per-micro-batch cost when ``R = 1``)."""
    M, R = num_micro_batches, busy_replicas
    if M < 2:
        return fwd_bwd_ms + step_ms
    return ((M / R - 1) * fwd_bwd_ms + (M - 1) / M * step_ms) / (M - 1)


def stage_load(tables: CostTables, group: tuple[str, ...], a: int, b: int, opt: StageMethod, S: int) -> float:
    """Per micro-batch, what a stage keeps each of its devices busy (``balanced`` minimises
    the largest)."""
    ms = max(tables.stage_ms(d, a, b, opt) for d in group)  # the slowest (federated clients may differ)
    if len(group) == 1:
        return ms
    o = tables.opt_ms(group[0], a, b, opt)
    busy = effective_replicas(tables.req.schedule, len(group), S)
    return replica_load(ms - o / tables.M, o + tables.allreduce_ms(group, a, b, opt), busy, tables.M)


@functools.lru_cache(maxsize=64)
def _program(schedule: str, num_stages: int, num_micro_batches: int) -> tuple[tuple, ...]:
    """The schedule's actions in an order the simulator could take them on a plain plan
    (nothing shared or replicated): each stage as far as it can, again while any moved, as
    :meth:`partitioners.simulation.Simulation.run` does. On a plain plan every resource has
    one issuer, so the times do not depend on the order (the simulator's notes); the order
    depends only on which transfers have been issued, not on any cost, so one order serves
    every plan of this shape. Ops: ``(0, stage, kind)`` compute, ``(1, stage, wire, mb,
    kind)`` send, ``(2, stage, wire, mb)`` receive; wires ``('a', s)`` stage s -> s + 1,
    ``('g', s)`` back, ``('l',)`` the labels line."""
    from partitioners.schedule import RECV_ACT, RECV_GRAD, RECV_LABELS, SEND_ACT, SEND_GRAD, SEND_LABELS

    acts = _actions(schedule, num_stages, num_micro_batches)
    last = num_stages - 1

    def wire(kind, s: int) -> tuple:
        if kind in (SEND_ACT,):
            return ("a", s)
        if kind == RECV_ACT:
            return ("a", s - 1)
        if kind == SEND_GRAD:
            return ("g", s - 1)
        if kind == RECV_GRAD:
            return ("g", s)
        return ("l",)

    sends, recvs = (SEND_ACT, SEND_GRAD, SEND_LABELS), (RECV_ACT, RECV_GRAD, RECV_LABELS)
    pc = [0] * num_stages
    issued: set[tuple] = set()
    out: list[tuple] = []
    moved = True
    while moved:
        moved = False
        for s in range(num_stages):
            while pc[s] < len(acts[s]):
                a = acts[s][pc[s]]
                if a.kind in sends:
                    if a.kind == SEND_LABELS and not 0 == s < last:
                        raise ValueError(f"stage {s}: {a} has no wire")
                    out.append((1, s, wire(a.kind, s), a.mb, str(a.kind)))
                    issued.add((wire(a.kind, s), a.mb))
                elif a.kind in recvs:
                    key = (wire(a.kind, s), a.mb)
                    if key not in issued:
                        break
                    issued.discard(key)
                    out.append((2, s, key[0], a.mb))
                else:
                    out.append((0, s, str(a.kind)))
                pc[s] += 1
                moved = True
    if any(pc[s] < len(acts[s]) for s in range(num_stages)):
        raise ValueError(f"{schedule} on {num_stages} stages deadlocks")
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _compiled(schedule: str, num_stages: int, num_micro_batches: int) -> tuple[tuple, tuple]:
    """:func:`_program` as integer instructions ``(kind, stage, x, y)``: compute
    ``(0, s, 0|1|2, 0)`` (forward, backward, optimizer step), send ``(1, s, wire, message)``,
    receive ``(2, s, 0, message)``; and the wires, ``(kind, index)`` (``('l', 0)``: the labels)."""
    wires: dict[tuple, int] = {}
    messages: dict[tuple, int] = {}
    code = []
    for op in _program(schedule, num_stages, num_micro_batches):
        if op[0] == 0:
            code.append((0, op[1], {"F": 0, "B": 1}.get(op[2], 2), 0))
        elif op[0] == 1:
            _, s, w, mb, _kind = op
            wid = wires.setdefault(w, len(wires))
            messages[(w, mb)] = len(code)
            code.append((1, s, wid, len(code)))
        else:
            _, s, w, mb = op
            code.append((2, s, 0, messages.pop((w, mb))))
    kinds = [(w[0], w[1] if len(w) > 1 else 0) for w in wires]
    return tuple(code), tuple(kinds)


def plain_steps(
    schedule: str,
    M: int,
    fwd: np.ndarray,
    bwd: np.ndarray,
    opt: np.ndarray,
    act: np.ndarray,
    grad: np.ndarray,
) -> np.ndarray:
    """The simulator's step of many plain plans of one shape at once (nothing shared or
    replicated, no labels time): ``fwd``, ``bwd``, ``opt`` of shape (stages, plans), ``act``
    and ``grad`` (stages - 1, plans). The same replay as :func:`simulated`, each clock an
    array over the plans (the tests hold the two equal)."""
    S, K = fwd.shape
    code, wires = _compiled(schedule, S, M)
    zero = np.zeros(K)
    clock = [np.zeros(K) for _ in range(S)]  # per stage its clock, changed in place (never shared)
    times = [list(fwd), list(bwd), list(opt)]  # [kind][stage]: rows, split once
    wire_ms = [act[i] if w == "a" else grad[i] if w == "g" else zero for w, i in wires]
    free = [zero] * len(wires)  # per wire, when its last transfer arrives (each send a new array)
    pending: list[np.ndarray] = [zero] * len(code)
    for kind, s, x, y in code:
        if kind == 0:  # compute: x indexes fwd, bwd, opt
            clock[s] += times[x][s]
        elif kind == 1:  # send on wire x, arriving as message y
            arrive = np.maximum(clock[s], free[x])
            arrive += wire_ms[x]
            free[x] = pending[y] = arrive
        else:  # receive message y
            np.maximum(clock[s], pending[y], out=clock[s])
    return np.max(clock, axis=0)


def plain_sequence(tables: CostTables, seq: list[str]) -> bool:
    """Whether every plan on ``seq`` without replicas is plain: no device runs two stages
    and no two wires cross one zone uplink (:func:`figures`' ``shared`` and ``channels``)."""
    if len(set(seq)) < len(seq):
        return False
    topo = tables.req.topology
    keys = [topo.uplink(u, v) for x, y in zip(seq, seq[1:], strict=False) for u, v in ((x, y), (y, x))]
    keys = [k for k in keys if k is not None]
    return len(keys) == len(set(keys))


def batch_steps(tables: CostTables, seq: list[str], choices: list) -> np.ndarray:
    """The simulator's step of each plan of a plain sequence (:func:`plain_sequence`): one
    per choice (``bounds``, ``opts``), replayed together (:func:`plain_steps`)."""
    S = len(seq)
    bounds = np.array([c.bounds for c in choices], dtype=int).reshape(len(choices), S + 1)
    index = [{o: k for k, o in enumerate(tables.options(s, d))} for s, d in enumerate(seq)]
    opts = np.array([[index[s][o] for s, o in enumerate(c.opts)] for c in choices], dtype=int).reshape(-1, S)
    return array_steps(tables, seq, bounds, opts)


def array_steps(tables: CostTables, seq: list[str], bounds: np.ndarray, opts: np.ndarray) -> np.ndarray:
    """:func:`batch_steps` on arrays: per plan its stage bounds (``plans x (S + 1)``) and
    each stage's option index (``plans x S``, into ``tables.options``)."""
    S, K = len(seq), len(bounds)
    fwd, bwd, opt = np.zeros((S, K)), np.zeros((S, K)), np.zeros((S, K))
    for s, dev in enumerate(seq):
        a, b = bounds[:, s], bounds[:, s + 1]
        for k, o in enumerate(tables.options(s, dev)):
            rows = np.nonzero(opts[:, s] == k)[0]
            if not len(rows):
                continue
            f, bw, op = tables.parts(dev, o)
            fwd[s, rows] = f[b[rows]] - f[a[rows]]
            bwd[s, rows] = bw[b[rows]] - bw[a[rows]]
            opt[s, rows] = op[b[rows]] - op[a[rows]]
    act, grad = np.zeros((S - 1, K)), np.zeros((S - 1, K))
    for s in range(S - 1):
        links = tables.link_table(seq[s], seq[s + 1])
        act[s], grad[s] = links[bounds[:, s + 1], 0], links[bounds[:, s + 1], 1]
    return plain_steps(tables.req.schedule, tables.M, fwd, bwd, opt, act, grad)
