"""Tier 1: plans, partitioners and schedules are plain data made by pure functions."""

import itertools
import random

import pytest
from conftest import inline_topology

from cluster.topology import topology_from_container
from partitioners import LayerProfile, Plan, PlanError, PlanRequest, partition, uniform_cuts
from partitioners import schedule as S
from partitioners.choices import OFFLOAD_PRECISIONS, PRECISIONS
from partitioners.costmodel import StageMethod, stage_memory
from partitioners.planner import CostTables, check_plan, evaluate, identical, simulate_plan

TOPO = topology_from_container(inline_topology())


def chain(n_blocks=4, block_params=1000, embed=500, head=500, saved=10_000, out=1000, flops=10**9):
    def mk(name, params, f):
        return LayerProfile(
            name, params=params, fwd_flops=f, bwd_flops=2 * f, in_bytes=out, out_bytes=out, saved_bytes=saved
        )

    return [
        mk("embed", embed, 0),
        *[mk(f"block_{i}", block_params, flops) for i in range(n_blocks)],
        mk("head", head, flops // 4),
    ]


def req(layers=None, topo=TOPO, **kw):
    return PlanRequest(layers=layers or chain(), topology=topo, **kw)


@pytest.mark.parametrize(
    "n,k,expected", [(6, 3, [2, 4]), (6, 4, [2, 4, 5]), (7, 2, [4]), (5, 5, [1, 2, 3, 4]), (3, 1, [])]
)
def test_uniform_cuts(n, k, expected):
    assert uniform_cuts(n, k) == expected


def test_uniform_plan_covers_the_chain_in_order():
    plan = partition("uniform", req(devices=["edge-a", "mid-b", "cloud-c"]))
    assert plan.ranges == [(0, 2), (2, 4), (4, 6)]
    assert plan.stages[0].layer_names == ["embed", "block_0"]
    assert plan.stages[2].layer_names == ["block_3", "head"]
    assert plan.devices == ["edge-a", "mid-b", "cloud-c"]
    assert plan.stages[1].params == 2000
    assert plan.stages[0].link_act_ms > 0 and plan.predicted["step_ms"] > 0


def test_default_order_puts_the_data_owner_first():
    topo = topology_from_container(inline_topology(owner="mid-b"))
    plan = partition("uniform", req(topo=topo))
    assert plan.devices[0] == "mid-b" and len(plan.stages) == 4


def test_plan_yaml_round_trip_and_table():
    for name in ("uniform", "balanced", "optimal"):
        plan = partition(name, req(devices=["edge-a", "mid-b", "cloud-c"], schedule="1f1b", num_micro_batches=4))
        again = Plan.from_yaml(plan.to_yaml())
        assert again == plan
    plan = partition("manual", req(devices=["edge-a", "cloud-c"], cuts=[3]))
    table = plan.table()
    assert "edge-a" in table and "[0,3)" in table and "block_2 .. head" in table and "predicted step" in table


@pytest.mark.parametrize(
    "devices,cuts,needle",
    [
        (["edge-a", "cloud-c"], [0], "strictly increasing"),
        (["edge-a", "cloud-c"], [6], "strictly increasing"),
        (["edge-a", "mid-b", "cloud-c"], [3, 2], "strictly increasing"),
        (["edge-a", "cloud-c"], [2, 3], "need 1 cuts"),
        (["cloud-c", "edge-a"], [3], "must run on a data-owning device, not 'cloud-c'"),
        (["edge-a", "edge-a"], [3], "listed twice"),
        (["edge-a", "nowhere"], [3], "device 'nowhere' is not in topology"),
    ],
)
def test_manual_plan_errors(devices, cuts, needle):
    with pytest.raises(Exception) as e:
        partition("manual", req(devices=devices, cuts=cuts))
    assert needle in str(e.value)


def test_more_devices_than_layers():
    with pytest.raises(PlanError, match="only 3 layers"):
        partition("uniform", req(layers=chain(n_blocks=1), devices=["edge-a", "mid-b", "cloud-c", "cloud-d"]))


def test_model_that_fits_no_device():
    big = chain(block_params=200_000_000)  # 3.2 GB of weights + grads + AdamW per block, 2 GB devices
    for name in ("uniform", "balanced", "optimal"):
        with pytest.raises(PlanError) as e:
            partition(name, req(layers=big, devices=["edge-a", "mid-b"]))
        assert "GB" in str(e.value) and "memory_gb=2" in str(e.value) or "short" in str(e.value)


def test_privacy_pins_the_embedding_to_a_too_small_owner():
    topo = topology_from_container(inline_topology())
    topo.device("edge-a").memory_gb = 1e-6
    with pytest.raises(PlanError) as e:
        partition("optimal", req(topo=topo))
    assert "privacy pins the embedding to 'edge-a'" in str(e.value) and "short" in str(e.value)


def test_label_privacy_puts_the_head_on_the_owner():
    for name in ("uniform", "balanced", "optimal", "exhaustive"):
        plan = partition(
            name, req(devices=["edge-a", "mid-b", "cloud-c"], label_privacy=True, schedule="1f1b", num_micro_batches=4)
        )
        assert plan.stages[0].device == "edge-a" and plan.stages[-1].device == "edge-a", name
        assert plan.stages[-1].layer_names[-1] == "head" and plan.label_privacy


# -- schedules ----------------------------------------------------------------------------


@pytest.mark.parametrize("stages,mbs", [(1, 1), (1, 3), (2, 2), (3, 4)])
def test_sequential_schedule_is_valid(stages, mbs):
    sched = S.build("sequential", stages, mbs)
    assert len(sched) == stages
    for acts in sched:
        assert acts[-1] == S.Action(S.STEP)
        assert [a.mb for a in acts if a.kind == S.F] == list(range(mbs))
    if stages > 1:
        assert sched[0][0].kind == S.SEND_LABELS and sched[-1][0].kind == S.RECV_LABELS
    grid = S.format_grid(sched).splitlines()  # plain text under pytest: header, rule, a row per stage
    assert grid[0].split() == ["stage", *map(str, range(max(map(len, sched))))]
    assert [row.split() for row in grid[2:]] == [[str(s), *map(str, acts)] for s, acts in enumerate(sched)]


def test_sequential_order_of_a_middle_stage():
    sched = S.sequential(3, 2)
    assert [str(a) for a in sched[1]] == [
        "RECV_ACT0",
        "F0",
        "SEND_ACT0",
        "RECV_GRAD0",
        "B0",
        "SEND_GRAD0",
        "RECV_ACT1",
        "F1",
        "SEND_ACT1",
        "RECV_GRAD1",
        "B1",
        "SEND_GRAD1",
        "STEP",
    ]


def test_validate_catches_mismatched_transfers_and_order():
    sched = S.sequential(2, 2)
    swapped = [list(sched[0]), list(sched[1])]
    i, j = swapped[1].index(S.Action(S.RECV_ACT, 0)), swapped[1].index(S.Action(S.RECV_ACT, 1))
    swapped[1][i], swapped[1][j] = swapped[1][j], swapped[1][i]
    with pytest.raises(S.ScheduleError, match="order"):
        S.validate(swapped, 2)
    backwards_first = [[S.Action(S.B, 0), S.Action(S.F, 0), S.Action(S.STEP)]]
    with pytest.raises(S.ScheduleError, match="F before one B"):
        S.validate(backwards_first, 1)


# -- optimal against exhaustive on random heterogeneous instances -------------------------


def random_layers(rng: random.Random, n: int, transients: bool = False) -> list[LayerProfile]:
    return [
        LayerProfile(
            f"l{i}",
            params=rng.randint(1_000, 20_000),
            fwd_flops=rng.randint(10**8, 10**10),
            bwd_flops=rng.randint(2 * 10**8, 2 * 10**10),
            in_bytes=rng.choice([10**4, 10**5, 10**6]),
            out_bytes=rng.choice([10**3, 10**4, 10**5, 10**6]),
            saved_bytes=rng.randint(10**4, 10**5),
            bwd_transient_bytes=rng.randint(0, 10**4) if transients else 0,
        )
        for i in range(n)
    ]


def random_instance(rng: random.Random):
    k = rng.randint(1, 5)
    zones = ["home", "office", "cloud"]
    gpus = rng.random() < 0.5  # some instances have cuda devices, some small: only offload fits
    devices = []
    for i in range(k):
        d = {
            "name": f"d{i}",
            "tier": "edge" if i == 0 else rng.choice(["edge", "cloud"]),
            "memory_gb": rng.choice([0.0008, 0.002, 0.004, 0.05]),
            "tflops": rng.choice([0.5, 1, 2, 8, 30]),
            "zone": rng.choice(zones),
            "owns_data": i == 0 or rng.random() < 0.15,
        }
        if gpus and rng.random() < 0.6 and sum(x.get("accelerator") == "cuda" for x in devices) < 2:
            d |= {
                "accelerator": "cuda",
                "memory_gb": rng.choice([0.0003, 0.0006, 0.001, 0.002, 0.05]),
                "host_memory_gb": rng.choice([0.0, 0.0005, 0.002, 0.05]),
                "host_tflops": rng.choice([0.001, 0.01, 0.1]),
                "host_link_gbps": rng.choice([1, 16, 200]),
            }
        devices.append(d)
    if k >= 3 and rng.random() < 0.3:  # two identical devices: room for replicas
        devices[-1] = devices[-2] | {"name": devices[-1]["name"], "owns_data": False}
    zone_links = [
        {
            "a": a,
            "b": b,
            "bandwidth_mbps": rng.choice([5, 20, 100, 1000]),
            "latency_ms": rng.choice([0.1, 2, 20]),
            "reverse_bandwidth_mbps": rng.choice([None, 50, 500]),
        }
        for a, b in itertools.combinations_with_replacement(sorted({d["zone"] for d in devices}), 2)
        if rng.random() < 0.8
    ]
    topo = topology_from_container(
        {
            "devices": devices,
            "links": {"default": {"bandwidth_mbps": rng.choice([10, 100]), "latency_ms": 5}, "zones": zone_links},
        }
    )
    layers = random_layers(rng, rng.randint(3, 9), transients=True)
    return PlanRequest(
        layers=layers,
        topology=topo,
        num_micro_batches=rng.choice([1, 2, 4, 8]),
        schedule=rng.choice(["sequential", "gpipe", "1f1b"]),
        label_privacy=rng.random() < 0.25,
        # offload runs with fp32 and bf16 autocast only: instances with GPUs draw among those
        precision=rng.choice(OFFLOAD_PRECISIONS if gpus else PRECISIONS),
    )


def plan_options(plan: Plan) -> list[StageMethod]:
    return [StageMethod(s.method, s.recompute, s.frozen_dtype, s.offload) for s in plan.stages]


def assert_valid(plan: Plan, r: PlanRequest):
    tables = CostTables(r)
    seq = [s.device for s in plan.stages]
    groups = [tuple(s.devices) for s in plan.stages]
    opts = plan_options(plan)
    bounds = [plan.stages[0].start, *[s.stop for s in plan.stages]]
    assert bounds[0] == 0 and bounds[-1] == r.n
    assert check_plan(r, tables, seq, bounds, opts, groups) is None
    assert r.topology.device(seq[0]).owns_data
    if r.label_privacy:
        assert seq[-1] == seq[0]
    for dev in set(plan.devices):  # memory per device, from the cost model directly
        mems = [
            stage_memory(
                r.layers[s.start : s.stop],
                stage=s.index,
                num_stages=len(seq),
                schedule=r.schedule,
                num_micro_batches=r.num_micro_batches,
                precision=r.precision,
                method=opts[s.index],
            )
            for s in plan.stages
            if dev in s.devices
        ]
        d = r.topology.device(dev)
        need, host = sum(m.device_total for m in mems), sum(m.host for m in mems)
        if d.accelerator == "cpu":  # the host is the same RAM
            need, host = need + host, 0.0
        assert need <= d.memory_gb * 1e9 * (1 + 1e-9)
        assert host <= d.host_budget_gb * 1e9 * (1 + 1e-9)
        assert all(
            d.accelerator == "cuda" or o.offload == "none"
            for o, s in zip(opts, plan.stages, strict=True)
            if dev in s.devices
        )
    assert plan.step_ms == pytest.approx(evaluate(tables, seq, bounds, opts, groups).step_ms, rel=1e-3)


@pytest.mark.slow  # test_optimal_equals_a_brute_force_at_8_to_12_devices covers optimal in the default run
def test_optimal_equals_exhaustive_on_random_instances():
    rng = random.Random(1234)
    checked = infeasible = offloaded = replicated = 0
    while checked < 150:  # 300 more, at 8-12 devices, in test_optimal_equals_a_brute_force_at_8_to_12_devices
        r = random_instance(rng)
        r.replicate = False  # exhaustive is the reference for plans without replicas
        try:
            ref = partition("exhaustive", r)
        except PlanError:
            with pytest.raises(PlanError):
                partition("optimal", r)
            infeasible += 1
            continue
        got = partition("optimal", r)
        assert got.step_ms == pytest.approx(ref.step_ms, rel=1e-6, abs=1e-9), (got.table(), ref.table())
        # at this size the search closes every gap between bound and step: proven optimal
        assert got.predicted["lower_bound_ms"] == pytest.approx(got.step_ms, rel=1e-6)
        assert_valid(got, r)
        assert_valid(ref, r)
        offloaded += any(s.offload != "none" for s in got.stages)
        for name in ("uniform", "balanced"):
            try:
                other = partition(name, r)
            except PlanError:
                continue
            assert_valid(other, r)
            assert other.step_ms >= got.step_ms * (1 - 1e-9)
        if not any(identical(a, b) for a, b in itertools.combinations(r.topology.devices, 2)):
            checked += 1
            continue
        r.replicate = True  # the replica post-pass only ever lowers the predicted step
        rep = partition("optimal", r)
        assert_valid(rep, r)
        assert rep.step_ms <= got.step_ms * (1 + 1e-9)
        if any(len(s.devices) > 1 for s in rep.stages):
            replicated += 1
            assert rep.step_ms < got.step_ms
        checked += 1
    assert infeasible < 75, infeasible  # the memory figures leave most instances feasible
    assert offloaded >= 8, offloaded  # replicas: tests/test_planner_offload.py


def test_balanced_minimises_the_largest_stage():
    r = req(devices=["edge-a", "mid-b", "cloud-c"])
    topo = r.topology
    topo.device("mid-b").tflops = 0.04  # twice as fast as the others
    plan = partition("balanced", r)
    tables = CostTables(r)
    worst = max(tables.stage_ms(s.device, s.start, s.stop) for s in plan.stages)
    for cuts in itertools.combinations(range(1, r.n), 2):
        b = [0, *cuts, r.n]
        other = max(tables.stage_ms(d, b[i], b[i + 1]) for i, d in enumerate(plan.devices))
        assert worst <= other + 1e-12


# -- the objective: closed forms, bounds and the simulator -----------------------------------


def test_closed_forms_equal_the_simulator_and_bounds_stay_below_it():
    """On random plans of random instances: where a closed form exists (sequential and GPipe,
    nothing shared or replicated) it equals the simulator's step; every schedule's lower
    bound (what the cut search ranks by) is at or below it."""
    from partitioners.planner.exhaustive import device_sequences
    from partitioners.planner.objective import closed_form, figures, lower_bound, simulated

    rng = random.Random(99)
    seen = {"closed": 0, "shared": 0, "1f1b": 0}
    for _ in range(150):
        r = random_instance(rng)
        t = CostTables(r)
        seqs = device_sequences(r)
        for _ in range(3):
            seq = rng.choice(seqs)
            bounds = [0, *sorted(rng.sample(range(1, r.n), len(seq) - 1)), r.n]
            opts = [rng.choice(t.options(s, d)) for s, d in enumerate(seq)]
            fig = figures(t, seq, bounds, opts, [(d,) for d in seq])
            M = r.num_micro_batches
            sim = simulated(r.schedule, fig, M)
            exact = closed_form(r.schedule, fig, M)
            if exact is not None:
                assert exact == pytest.approx(sim, rel=1e-9, abs=1e-9)
                seen["closed"] += 1
            assert lower_bound(r.schedule, fig, M) <= sim * (1 + 1e-9) + 1e-9
            seen["shared"] += bool(fig.shared or fig.channels)
            seen["1f1b"] += r.schedule == "1f1b"
    assert min(seen.values()) >= 50, seen


def test_every_plan_predicts_the_simulators_step():
    """What a plan predicts is what the simulator runs on the plan's own figures (the
    workers' schedule, shared devices and uplinks): within rounding, for every partitioner."""
    rng = random.Random(7)
    checked = 0
    while checked < 60:
        r = random_instance(rng)
        for name in ("uniform", "balanced", "optimal"):
            try:
                plan = partition(name, r)
            except PlanError:
                continue
            sim = simulate_plan(plan).step_ms
            assert plan.step_ms == pytest.approx(sim, rel=1e-3, abs=1e-3), (name, plan.table())
            checked += 1


def test_unused_devices_say_why():
    from partitioners.planner.explain import unused_devices

    topo = topology_from_container(
        inline_topology(["edge-a", "mid-b", "cloud-c", "cloud-d"])
        | {
            "links": {
                "default": {"bandwidth_mbps": 1000, "latency_ms": 0.1},
                "pairs": [{"a": "edge-a", "b": "cloud-d", "bandwidth_mbps": 0.001, "latency_ms": 500}]
                + [{"a": x, "b": "cloud-d", "bandwidth_mbps": 0.001, "latency_ms": 500} for x in ("mid-b", "cloud-c")],
            }
        }
    )
    topo.device("mid-b").memory_gb = 1e-6  # not even one layer fits
    r = req(topo=topo, num_micro_batches=2, schedule="gpipe")
    plan = partition("optimal", r)
    notes = unused_devices(r, plan)
    assert "mid-b" not in plan.devices and notes["mid-b"].startswith("too little memory")
    assert "cloud-d" not in plan.devices and notes["cloud-d"].startswith("link too slow")
    assert all(d in plan.devices or d in notes for d in r.pool)
    fixed = partition("uniform", req(topo=topo, devices=["edge-a", "cloud-c"]))
    notes = unused_devices(req(topo=topo, devices=["edge-a", "cloud-c"]), fixed)
    assert notes["cloud-d"] == "not listed in plan.devices"


# -- optimal at 8-12 devices against a brute force written here ------------------------------


def many_device_instance(rng: random.Random) -> PlanRequest:
    """8-12 devices of a few kinds in two or three zones, several data owners, asymmetric
    zone links and a device pair link, tight memory, GPUs with offload, 3-4 layers."""
    kinds = [
        {"tier": "edge", "memory_gb": rng.choice([0.0008, 0.002, 0.05]), "tflops": rng.choice([0.5, 2])},
        {"tier": "edge", "memory_gb": rng.choice([0.001, 0.004]), "tflops": rng.choice([1, 8])},
        {"tier": "cloud", "memory_gb": 0.05, "tflops": rng.choice([8, 30])},
        {
            "tier": "cloud",
            "accelerator": "cuda",
            "memory_gb": rng.choice([0.0004, 0.001]),
            "host_memory_gb": rng.choice([0.0, 0.002]),
            "tflops": 30,
            "host_tflops": rng.choice([0.01, 0.1]),
            "host_link_gbps": rng.choice([16, 200]),
        },
    ]
    zones = ["home", "office", "cloud"][: rng.choice([2, 3])]
    k = rng.randint(8, 12)
    devices = []
    for i in range(k):
        kind = kinds[0] if i == 0 else rng.choice(kinds)
        devices.append(
            kind
            | {
                "name": f"d{i}",
                "zone": "home" if i == 0 else rng.choice(zones),
                "owns_data": i == 0 or (kind["tier"] == "edge" and rng.random() < 0.3),
            }
        )
    zone_links = [
        {
            "a": a,
            "b": b,
            "bandwidth_mbps": rng.choice([5, 50, 1000]),
            "latency_ms": rng.choice([0.1, 5, 30]),
            "reverse_bandwidth_mbps": rng.choice([None, 20, 500]),
        }
        for a, b in itertools.combinations_with_replacement(sorted({d["zone"] for d in devices}), 2)
    ]
    pairs = [{"a": "d0", "b": f"d{rng.randrange(1, k)}", "bandwidth_mbps": 10_000, "latency_ms": 0.05}]
    topo = topology_from_container(
        {
            "devices": devices,
            "links": {"default": {"bandwidth_mbps": 10, "latency_ms": 5}, "zones": zone_links, "pairs": pairs},
        }
    )
    layers = random_layers(rng, rng.randint(3, 4))
    return PlanRequest(
        layers=layers,
        topology=topo,
        num_micro_batches=rng.choice([1, 2, 4]),
        schedule=rng.choice(["sequential", "gpipe", "1f1b"]),
        label_privacy=rng.random() < 0.25,
        precision="fp32",
        replicate=False,
    )


def brute_force(r: PlanRequest) -> float | None:
    """The smallest simulated step over every plan: every data owner first, every ordered
    choice of other devices (one of each set of devices that cannot be told apart: the same
    figures and zone, no link of their own), every cut, every combination of stage methods."""
    topo = r.topology
    paired = {x for e in topo.links.pairs for x in (e.a, e.b)}

    def kind(name):
        d = topo.device(name)
        return (
            d.tier,
            d.accelerator,
            d.memory_gb,
            d.host_memory_gb,
            d.tflops,
            d.host_tflops,
            d.host_link_gbps,
            d.zone,
            d.owns_data,
            name if name in paired else "",
        )

    tables = CostTables(r)
    best = None
    owners = [d.name for d in topo.devices if d.owns_data]
    extra = 1 if r.label_privacy else 0

    def sequences(prefix):
        yield prefix
        if len(prefix) + extra >= r.n:
            return
        seen = set()
        for d in topo.device_names:
            if d in prefix or kind(d) in seen:
                continue
            seen.add(kind(d))
            yield from sequences([*prefix, d])

    for owner in owners:
        for core in sequences([owner]):
            seq = [*core, owner] if r.label_privacy else core
            S = len(seq)
            for cuts in itertools.combinations(range(1, r.n), S - 1):
                bounds = [0, *cuts, r.n]
                for combo in itertools.product(*[tables.options(s, d) for s, d in enumerate(seq)]):
                    if best is not None and busiest_device_ms(r, tables, seq, bounds, combo) >= best * (1 + 1e-9):
                        continue  # its step is at least this: it cannot be the best
                    if check_plan(r, tables, seq, bounds, list(combo)) is not None:
                        continue
                    t = evaluate(tables, seq, bounds, list(combo)).step_ms
                    best = t if best is None or t < best else best
    return best


def busiest_device_ms(r: PlanRequest, tables: CostTables, seq, bounds, combo) -> float:
    """A floor under any schedule's step: each device runs every micro-batch's forward and
    backward of each of its stages, one thing at a time."""
    work: dict[str, float] = {}
    for s, (dev, opt) in enumerate(zip(seq, combo, strict=True)):
        f, b, _ = tables.fbo(dev, bounds[s], bounds[s + 1], opt)
        work[dev] = work.get(dev, 0.0) + r.num_micro_batches * (f + b)
    return max(work.values())


def test_optimal_equals_a_brute_force_at_8_to_12_devices():
    rng = random.Random(2026)
    checked = feasible = ushape = owners = 0
    while checked < 300:
        r = many_device_instance(rng)
        ref = brute_force(r)
        if ref is None:
            with pytest.raises(PlanError):
                partition("optimal", r)
        else:
            got = partition("optimal", r)  # never "infeasible" when a plan exists
            assert got.step_ms == pytest.approx(ref, rel=1e-6, abs=1e-4), got.table()  # rounded to 0.1 us
            assert got.predicted["lower_bound_ms"] == pytest.approx(got.step_ms, rel=1e-6, abs=1e-4)
            feasible += 1
            ushape += r.label_privacy
            owners += sum(d.owns_data for d in r.topology.devices) > 1
        checked += 1
    assert feasible >= 200 and ushape >= 30 and owners >= 100, (feasible, ushape, owners)
