"""From a search's choice (devices, cuts, methods, replicas) to a :class:`Plan`: the
stage methods that fit, the checks, the per-stage figures; and the simulator run on a plan."""

from __future__ import annotations

import functools
import itertools

import numpy as np

from partitioners.costmodel import StageMethod, effective_layer, stage_time
from partitioners.plan import Plan, Stage
from partitioners.planner.feasibility import allow_hint, check_plan, closest_options
from partitioners.planner.objective import evaluate
from partitioners.planner.request import GB, Groups, PlanError, PlanRequest, groups_of
from partitioners.planner.tables import CostTables


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
    groups = groups_of(seq, groups)
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


def build_plan(
    req: PlanRequest,
    tables: CostTables,
    seq: list[str],
    bounds: list[int],
    name: str,
    opts: list[StageMethod] | None = None,
    groups: Groups | None = None,
) -> Plan:
    groups = groups_of(seq, groups)
    if opts is None:
        opts = choose_options(req, tables, seq, bounds, groups)
    why = check_plan(req, tables, seq, bounds, opts or closest_options(tables, seq, bounds), groups)
    if why:
        raise PlanError(why + allow_hint(req, seq))
    assert opts is not None
    ev = evaluate(tables, seq, bounds, opts, groups)
    S = len(seq)
    stages = []
    for s in range(S):
        a, b = bounds[s], bounds[s + 1]
        seg = req.layers[a:b]
        mem = req.stage_memory(a, b, s, S, opts[s], seq[s])
        # the slowest replica's times (federated clients may differ; replicas are identical)
        slow = max(groups[s], key=functools.partial(_stage_ms, tables, a, b, opts[s]))
        t = stage_time(
            req.layers_on(slow)[a:b],
            req.topology.device(slow),
            req.calibrated_for(slow),
            method=opts[s],
            precision=req.precision,
        )
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
    # model FLOPs of a step (each stage's method; a recompute's extra forward not counted) and
    # the devices' peak, for the run's MFU
    effective = [effective_layer(layer, opts[s]) for s in range(S) for layer in req.layers[bounds[s] : bounds[s + 1]]]
    flops = sum(e.fwd_flops + e.bwd_flops for e in effective)
    peak = sum(req.topology.device(d).tflops for g in groups for d in g)
    bubble = 1.0 - ev.busy_ms * req.num_micro_batches / (num_devices * ev.step_ms) if ev.step_ms > 0 else 0.0
    return Plan(
        stages=stages,
        partitioner=name,
        schedule=req.schedule,
        num_micro_batches=req.num_micro_batches,
        label_privacy=req.label_privacy,
        precision=req.precision,
        predicted={
            "step_ms": round(ev.step_ms, 4),
            "bottleneck": ev.bottleneck,
            "bubble_fraction": round(bubble, 4),
            "flops_per_step": float(flops * req.num_micro_batches),
            "peak_tflops": float(peak),
            **({"times_measured_on": sorted(req.measured_on)} if req.measured_on else {}),
            **({"times_measured_like": dict(sorted(req.measured_like.items()))} if req.measured_like else {}),
            **({"step_overhead_ms": round(req.step_overhead_ms, 4)} if req.step_overhead_ms else {}),
            **({"shared_cpus": list(req.shared_cpus)} if req.shared_cpus else {}),
            **({"links_measured": used_measured_links(req, stages)} if req.topology.measured else {}),
            **(
                {"federation": federation_figures(req, tables, bounds, opts, ev.step_ms, stages)} if req.clients else {}
            ),
        },
        uplinks=ev.uplinks,
    )


def _stage_ms(tables: CostTables, a: int, b: int, opt: StageMethod, dev: str) -> float:
    return tables.stage_ms(dev, a, b, opt)


def federation_figures(
    req: PlanRequest,
    tables: CostTables,
    bounds: list[int],
    opts: list[StageMethod],
    step_ms: float,
    stages: list[Stage],
) -> dict[str, object]:
    """Per client, its front's busy time in one step (its share of the micro-batches, forward
    and backward, and the optimizer step); the shared stages' time for every client's
    micro-batches; the round (``rounds_every`` steps)."""
    N, M = len(req.clients), req.num_micro_batches
    per_client = {}
    for c in req.clients:
        f, b, o = tables.fbo(c, bounds[0], bounds[1], opts[0])
        per_client[c] = round(M // N * (f + b) + o, 4)
    # what the shared stages work in one step for all clients (each replica its share)
    shared = sum(M / s.num_replicas * (s.fwd_ms + s.bwd_ms) + s.opt_ms for s in stages[1:])
    return {
        "client_ms": per_client,
        "slowest_client": max(per_client, key=lambda c: per_client[c]),
        "rounds_every": req.rounds_every,
        "round_ms": round(step_ms * req.rounds_every, 4),
        "shared_ms": round(shared, 4),
    }


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
    shared_cpus: list[dict] | None = None,
    step_barrier: bool = False,
):
    """Run the simulator on a plan's predicted costs with the schedule the workers run:
    a replicated stage's replicas as separate timelines (see :func:`schedule.replica_actions`).

    ``step_barrier``: every stage steps when the last has reached its ``STEP``, as the
    workers do (see :func:`partitioners.simulator.simulate`).

    ``shared_cpus`` (``plan.predicted["shared_cpus"]``: hosts whose devices ask for more
    threads than they have CPUs, or whose CPU devices were measured slower side by side)
    stretches the compute of those devices by how much of it overlaps, as :func:`share_cpus` finds.

    ``stage_costs`` (one :class:`~partitioners.simulator.StageCosts` per stage) replaces the
    plan's compute, e.g. with what a run's workers measured (a replay); ``free_links`` makes
    every transfer instant (the step the same compute would take on free links).

    The costs outside the plan's stages are zero unless given (see
    :func:`partitioners.simulator.simulate`): ``step_overhead_ms`` per step, and the host CPU
    of each end of a transfer (``send_host`` / ``recv_host`` / ``recv_late_host``,
    :class:`~partitioners.simulator.HostCost`)
    of the plan's ``cut_bytes`` per activation and gradient, ``labels_bytes`` per labels transfer."""
    from partitioners.simulator import LinkCosts, StageCosts, simulate

    stages = stage_costs or [StageCosts(s.fwd_ms, s.bwd_ms, s.opt_ms, s.allreduce_ms) for s in plan.stages]
    kwargs = dict(
        labels_ms=labels_ms,
        step_overhead_ms=step_overhead_ms,
        send_host=send_host,
        recv_host=recv_host,
        recv_late_host=recv_late_host,
        labels_bytes=labels_bytes,
        free_links=free_links,
        step_barrier=step_barrier,
    )
    if shared_cpus:
        return share_cpus(plan, stages, shared_cpus, **kwargs)
    sched = plan.actions()
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
        shared=plan.shared_devices,
        channels=plan.uplinks,
        step_overhead_ms=step_overhead_ms,
        send_host=send_host,
        recv_host=recv_host,
        recv_late_host=recv_late_host,
        labels_bytes=labels_bytes,
        step_barrier=step_barrier,
    )


SHARING_ROUNDS = 8  # share_cpus: simulations after the first (the factors settle in 4-6)


def share_cpus(plan, stages: list, hosts: list[dict], **kwargs):
    """The simulated step when some devices share a host: ``hosts`` are ``{"cpus": C,
    "threads": {device: t}}``, with ``"side_by_side": {device: {kind: k}}`` where measured. A
    device's compute (forward, backward, STEP) timed alone is stretched by what the host's
    other devices run beside it: an action during which the host's devices ask L threads in
    all (its own t among them, L averaged over the action) runs ``min(t, C) * max(L, C) / (t * C)``
    times its time alone (its fair share of the cores against what it had alone), and
    ``1 + k * O`` times that where the others' measured CPU devices run O threads beside it
    on average (the host's memory and caches, shared:
    :func:`splitlearn.device_profile.side_by_side`). The simulator fixes each action's time
    when it starts, so this is a mean field: simulate, take each stage's stretch per kind of
    action from the timeline (weighted by time), simulate again on the timed-alone costs
    times the stretch (halfway from the last, to settle), ``SHARING_ROUNDS`` times. Exact when
    the overlapping actions start and end together; a staggered overlap comes out somewhat
    long (GPipe over 4 one-thread stages on one core, 2 micro-batches of 10 ms forward and 20
    ms backward: 260 ms, against the 240 ms of work the core does in all). The search does
    not see it: it plans on the times alone."""
    from partitioners.simulator import StageCosts

    where: dict[tuple[int, int], tuple[int, int, int, dict | None]] = {}  # (stage, replica) -> host, t, C, k
    for h, host in enumerate(hosts):
        side = host.get("side_by_side") or {}
        for s in plan.stages:
            for r, d in enumerate(s.devices):
                if d in host["threads"]:
                    where[(s.index, r)] = (h, int(host["threads"][d]), int(host["cpus"]), side.get(d))
    kinds = ("F", "B", "STEP")
    stretch = {(i, k): 1.0 for i in range(len(stages)) for k in kinds}
    result = simulate_plan(plan, stage_costs=list(stages), **kwargs)
    for _ in range(SHARING_ROUNDS):
        seen = _stretch(result.timeline, where, kinds)
        stretch = {key: 0.5 * (old + seen.get(key, 1.0)) for key, old in stretch.items()}
        costs = [
            StageCosts(c.fwd_ms * stretch[(i, "F")], c.bwd_ms * stretch[(i, "B")], c.step_ms * stretch[(i, "STEP")],
                       c.allreduce_ms)
            for i, c in enumerate(stages)
        ]  # fmt: skip
        result = simulate_plan(plan, stage_costs=costs, **kwargs)
    return result


def core_share(threads: int, load: float, cpus: int) -> float:
    """How much longer an action of ``threads`` threads runs while the host's devices ask
    ``load`` threads in all (its own among them) of its ``cpus``: its fair share of the cores
    against what it had alone (processor sharing)."""
    return min(threads, cpus) * max(load, cpus) / (threads * cpus)


def _stretch(timeline: list, where: dict, kinds: tuple[str, ...]) -> dict[tuple[int, str], float]:
    """Per (stage, kind), the time-weighted stretch of its actions on a shared host (see
    :func:`share_cpus`), from one simulated timeline."""
    acts = [iv for iv in timeline if iv.kind in kinds and (iv.stage, iv.replica) in where and iv.end_ms > iv.start_ms]
    weighted: dict[tuple[int, str], list[float]] = {}
    for iv in acts:
        host, t, cpus, side = where[(iv.stage, iv.replica)]
        span = iv.end_ms - iv.start_ms
        others = measured = 0.0
        for o in acts:
            oh, ot, _, oside = where[(o.stage, o.replica)]
            if o is iv or oh != host or (o.stage, o.replica) == (iv.stage, iv.replica):
                continue
            overlap = ot * max(0.0, min(iv.end_ms, o.end_ms) - max(iv.start_ms, o.start_ms))
            others += overlap
            measured += overlap if oside is not None else 0.0
        factor = core_share(t, t + others / span, cpus)
        if side:
            factor *= 1.0 + side.get(iv.kind, 0.0) * measured / span
        acc = weighted.setdefault((iv.stage, iv.kind), [0.0, 0.0])
        acc[0] += factor * span
        acc[1] += span
    return {key: num / den for key, (num, den) in weighted.items()}


def used_measured_links(req: PlanRequest, stages: list[Stage]) -> dict[str, list[float]]:
    """The measured figures (Mbit/s, ms) of the links between consecutive stages' devices."""
    out = {}
    for s, t in zip(stages, stages[1:], strict=False):
        for a in s.devices:
            for b in t.devices:
                for key in (f"{a}->{b}", f"{b}->{a}"):
                    got = req.topology.measured.get(key)
                    if got is not None:
                        out[key] = [round(got.bandwidth_mbps, 1), round(got.latency_ms, 3)]
    return out
