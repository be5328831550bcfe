"""Tier 1: ZeRO offload as a per-stage option, and data-parallel replicas of a stage.

Hand-computed figures use a device whose host link moves 1000 bytes per ms
(``host_link_gbps=0.008``) and whose host CPU does 1e6 flops per ms (``host_tflops=0.001``).
"""

import pytest

from cluster.topology import topology_from_container
from partitioners import LayerProfile, Plan, PlanError, PlanRequest, partition
from partitioners import schedule as sch
from partitioners.costmodel import FinetunePolicy, StageMethod, ring_allreduce_ms, stage_memory, stage_time
from partitioners.planner import CostTables, check_replicas, evaluate, simulate_plan
from partitioners.schedule import Action
from partitioners.simulator import LinkCosts, StageCosts, simulate
from partitioners.timeline import timeline_figure, timeline_rows

SLOW_HOST = {"host_tflops": 0.001, "host_link_gbps": 0.008}  # 1e6 flops/ms, 1000 bytes/ms


def two_layers():
    return [
        LayerProfile(
            f"l{i}",
            params=1000,
            fwd_flops=10**9,
            bwd_flops=2 * 10**9,
            in_bytes=10,
            out_bytes=10,
            saved_bytes=100,
            bwd_transient_bytes=5,
        )
        for i in range(2)
    ]


def chain():
    """embed (500), 4 blocks (1000 each), head (500): 4500 parameters after the embedding."""

    def mk(name, params, flops):
        return LayerProfile(
            name, params=params, fwd_flops=flops, bwd_flops=2 * flops, in_bytes=1000, out_bytes=1000, saved_bytes=10_000
        )

    return [mk("embed", 500, 0), *[mk(f"block_{i}", 1000, 10**9) for i in range(4)], mk("head", 500, 10**9 // 4)]


def gpu_topology(memory_gb, host_memory_gb=0.001, accelerator="cuda"):
    return topology_from_container(
        {
            "devices": [
                # holds the embedding only (21000 B): the blocks must go to cloud-g
                {"name": "edge-a", "memory_gb": 0.00003, "tflops": 0.02, "owns_data": True, "zone": "home"},
                {
                    "name": "cloud-g",
                    "tier": "cloud",
                    "accelerator": accelerator,
                    "memory_gb": memory_gb,
                    "host_memory_gb": host_memory_gb,
                    "tflops": 1.0,
                    "zone": "cloud",
                },
            ],
            "links": {"default": {"bandwidth_mbps": 1000, "latency_ms": 0.1}},
        }
    )


# -- the option ---------------------------------------------------------------------------


def test_stage_method_offload_label_parse_and_policy():
    m = StageMethod("lora", True, "int8", "optimizer")
    assert m.key == "lora+int8" and m.label == "lora+int8+rc+off-opt"
    for label in ("full", "full+off-opt", "full+off-params", "lora+int8+rc+off-params", "frozen+rc"):
        assert StageMethod.parse(label).label == label
    assert StageMethod.parse("full+rc+off-params") == StageMethod("full", True, "fp32", "params")
    policy = FinetunePolicy(by_tier={"cloud": {"offload": "optimizer"}}, by_stage={2: {"offload": "params"}})
    assert policy.for_stage(0, "edge").offload == "none"
    assert policy.for_stage(1, "cloud").offload == "optimizer"
    assert policy.for_stage(2, "cloud").offload == "params"
    with pytest.raises(ValueError, match="unknown offload 'disk'"):
        StageMethod(offload="disk")


def test_offload_options_only_on_cuda_devices():
    r = PlanRequest(layers=chain(), topology=gpu_topology(1.0))
    # params (ZeRO-3) is costed but not offered: the runtime needs one micro-batch in flight for it
    assert [o.offload for o in r.options(1, "cloud-g")] == ["none", "optimizer"]
    assert [o.offload for o in r.options(0, "edge-a")] == ["none"]
    r.finetune = FinetunePolicy(default=StageMethod(offload="params"))
    assert [o.offload for o in r.options(1, "cloud-g")] == ["params"]  # a configured offload is kept
    # bf16 weights (bf16-master, bf16-pure) are not offered offload: the runtime does not run it
    for precision, offered in (("bf16", ["none", "optimizer"]), ("bf16-master", ["none"]), ("bf16-pure", ["none"])):
        r = PlanRequest(layers=chain(), topology=gpu_topology(1.0), precision=precision)
        assert [o.offload for o in r.options(1, "cloud-g")] == offered


def test_offload_memory_and_time_by_hand():
    layers = two_layers()
    topo = topology_from_container(
        {
            "devices": [
                {"name": "g", "accelerator": "cuda", "memory_gb": 1, "tflops": 1.0, "owns_data": True, **SLOW_HOST}
            ]
        }
    )
    dev = topo.device("g")
    # 2 layers of 1e9 + 2e9 flops at 1e9 flops/ms; AdamW's 12 flops per trainable parameter at the device's peak
    base = stage_time(layers, dev)
    assert (base.fwd_ms, base.bwd_ms, base.opt_ms) == (
        pytest.approx(2.0),
        pytest.approx(4.0),
        pytest.approx(12 * 2000 / 1e9),
    )
    # optimizer: 8000 B of fp32 gradients down (8 ms), 12 * 2000 flops of AdamW (0.024 ms), 8000 B of weights up (8 ms)
    off = stage_time(layers, dev, method=StageMethod(offload="optimizer"))
    assert (off.fwd_ms, off.bwd_ms, off.opt_ms) == (pytest.approx(2.0), pytest.approx(4.0), pytest.approx(16.024))
    # params: no weights up after the step, but 8000 B fetched for every forward and backward
    p3 = stage_time(layers, dev, method=StageMethod(offload="params"))
    assert (p3.fwd_ms, p3.bwd_ms, p3.opt_ms) == (pytest.approx(10.0), pytest.approx(12.0), pytest.approx(8.024))
    # a cpu device moves nothing over a link: the AdamW step alone
    cpu = topology_from_container(
        {"devices": [{"name": "c", "memory_gb": 1, "tflops": 1.0, "owns_data": True, **SLOW_HOST}]}
    ).device("c")
    assert stage_time(layers, cpu, method=StageMethod(offload="optimizer")).opt_ms == pytest.approx(0.024)
    assert stage_time(layers, cpu).opt_ms == pytest.approx(0.024)  # and so does its own AdamW, counted from FLOPs

    # memory (fp32, sequential): weights 8000, grads 8000, AdamW 16000, activations 200 + 10, buffers 10 + 10 + 5
    full = stage_memory(layers)
    assert full.device_total == 32235 and full.host == 0
    m_opt = stage_memory(layers, method=StageMethod(offload="optimizer"))
    assert m_opt.device_total == 32235 - 16000 and m_opt.host == 16000 + 8000  # moments + fp32 gradient copy
    m_p = stage_memory(layers, method=StageMethod(offload="params"))
    assert m_p.device_total == 4000 + 8000 + 235 and m_p.host == 24000 + 8000  # the largest layer stays

    # the planner's tables agree with the cost model
    req = PlanRequest(layers=layers, topology=topo, num_micro_batches=4, schedule="gpipe")
    t = CostTables(req)
    for mode, per_mb, opt_ms in (("none", 6.0, 2.4e-5), ("optimizer", 6.0, 16.024), ("params", 22.0, 8.024)):
        o = StageMethod(offload=mode)
        mem = stage_memory(layers, schedule="gpipe", num_micro_batches=4, method=o)
        assert t.stage_mem(0, 2, 0, 1, o) == pytest.approx(mem.device_total)
        assert t.dev_mem("g", 0, 2, 0, 1, o) == pytest.approx(mem.device_total)
        assert t.host_mem("g", 0, 2, o) == pytest.approx(mem.host)
        assert t.opt_ms("g", 0, 2, o) == pytest.approx(opt_ms)
        assert t.stage_ms("g", 0, 2, o) == pytest.approx(per_mb + opt_ms / 4)
    # on a cpu device the offloaded bytes stay in the same RAM: they count against memory_gb
    creq = PlanRequest(layers=layers, topology=topology_from_container({"devices": [cpu.__dict__]}))
    ct = CostTables(creq)
    o = StageMethod(offload="optimizer")
    assert ct.dev_mem("c", 0, 2, 0, 1, o) == pytest.approx(16235 + 24000) and ct.host_mem("c", 0, 2, o) == 0


# -- planning with offload ----------------------------------------------------------------
# stage 1 (block_0..head, 4500 params, sequential): weights 18000 + grads 18000 + AdamW 36000,
# activations 5 * 10000 + 1000, buffers 2000: 125000 B on the device with no offload;
# optimizer offload: 89000 on the device, 54000 on the host; params: 75000 and 72000.


@pytest.mark.parametrize("name", ["manual", "balanced", "optimal", "exhaustive"])
def test_offload_makes_an_infeasible_plan_feasible(name):
    cuts = [1] if name == "manual" else None
    plan = partition(name, PlanRequest(layers=chain(), topology=gpu_topology(0.0001), cuts=cuts))
    assert [s.offload for s in plan.stages] == ["none", "optimizer"]
    s = plan.stages[1]
    assert (s.start, s.memory_gb, s.host_memory_gb) == (1, pytest.approx(89000 / 1e9), pytest.approx(54000 / 1e9))
    assert "optimizer (" in plan.table() and "GB host)" in plan.table()
    assert Plan.from_yaml(plan.to_yaml()) == plan
    # only params offload fits 80000 B: the planner does not pick it by itself (the runtime
    # cannot run ZeRO-3 in a pipeline yet), but costs it when it is configured
    with pytest.raises(PlanError, match="short"):
        partition(name, PlanRequest(layers=chain(), topology=gpu_topology(0.00008), cuts=cuts))
    policy = FinetunePolicy(by_tier={"cloud": {"offload": "params"}})
    plan = partition(name, PlanRequest(layers=chain(), topology=gpu_topology(0.00008), cuts=cuts, finetune=policy))
    assert plan.stages[1].offload == "params"
    # a cpu device gains nothing from offload: no plan
    with pytest.raises(PlanError, match="short"):
        partition(name, PlanRequest(layers=chain(), topology=gpu_topology(0.0001, accelerator="cpu"), cuts=cuts))


def test_uniform_takes_offload_when_its_split_does_not_fit():
    # uniform: [0,3) and [3,6); stage 1 (2500 params): 40000 + 31000 + 2000 = 73000 B, 53000 with offload
    topo = gpu_topology(0.00006)
    topo.device("edge-a").memory_gb = 1.0
    plan = partition("uniform", PlanRequest(layers=chain(), topology=topo))
    assert plan.ranges == [(0, 3), (3, 6)] and [s.offload for s in plan.stages] == ["none", "optimizer"]
    assert plan.stages[1].memory_gb == pytest.approx(53000 / 1e9)


def test_offload_only_when_it_pays():
    plan = partition("optimal", PlanRequest(layers=chain(), topology=gpu_topology(1.0)))
    assert all(s.offload == "none" for s in plan.stages)  # the host step only adds time


def test_host_budget_exceeded_names_the_device():
    req = PlanRequest(layers=chain(), topology=gpu_topology(0.0001, host_memory_gb=0.00005), cuts=[1])
    with pytest.raises(PlanError) as e:
        partition("manual", req)
    msg = str(e.value)
    assert "device 'cloud-g' needs 5.4e-05 GB of host memory" in msg and "host_memory_gb=5e-05" in msg, msg
    assert "4e-06 GB short" in msg and "full+off-opt" in msg
    with pytest.raises(PlanError, match="no feasible plan"):  # its example is the first uniform split
        partition("optimal", PlanRequest(layers=chain(), topology=gpu_topology(0.0001, host_memory_gb=0.00005)))


def test_configured_offload_is_kept_when_it_fits():
    policy = FinetunePolicy(by_tier={"cloud": {"offload": "params"}})
    plan = partition("manual", PlanRequest(layers=chain(), topology=gpu_topology(1.0), cuts=[1], finetune=policy))
    assert plan.stages[1].offload == "params"  # kept, although no offload would fit and be faster
    assert plan.stages[1].opt_ms > 0.0


# -- replicas: validation ------------------------------------------------------------------


def cloud_topology(slow=("cloud-c", "cloud-d", "cloud-e"), odd_tflops=4.0):
    devices = [{"name": "edge-a", "memory_gb": 0.03, "tflops": 2.0, "owns_data": True, "zone": "home"}]
    for name in slow:
        devices.append({"name": name, "tier": "cloud", "memory_gb": 1.0, "tflops": 1.0, "zone": "cloud"})
    if odd_tflops:
        devices.append({"name": "cloud-f", "tier": "cloud", "memory_gb": 1.0, "tflops": odd_tflops, "zone": "cloud"})
    return topology_from_container(
        {
            "devices": devices,
            "links": {
                "default": {"bandwidth_mbps": 1000, "latency_ms": 1},
                "zones": [{"a": "cloud", "b": "cloud", "bandwidth_mbps": 100_000, "latency_ms": 0.05}],
            },
        }
    )


def heavy_chain():
    """A cheap embedding on the owner and one heavy block (+head) it cannot hold."""

    def mk(name, params, flops):
        return LayerProfile(
            name,
            params=params,
            fwd_flops=flops,
            bwd_flops=2 * flops,
            in_bytes=10**5,
            out_bytes=10**5,
            saved_bytes=10**6,
        )

    return [mk("embed", 50_000, 10**8), mk("block_0", 5_000_000, 10**11)]


@pytest.mark.parametrize(
    "devices,m,needle",
    [
        (["edge-a+cloud-c", "cloud-d"], 2, "plan.devices: 'edge-a+cloud-c': the first stage (embedding, raw inputs)"),
        (["edge-a", "cloud-c+cloud-f"], 2, "'cloud-c' and 'cloud-f' differ in tflops 1.0 vs 4.0"),
        (["edge-a", "cloud-c+cloud-d", "cloud-d"], 2, "listed twice"),
        (["edge-a", "cloud-c+cloud-c"], 2, "listed twice"),
        (["edge-a", "cloud-c+cloud-d+cloud-e"], 4, "train.micro_batches to be a multiple of 3"),
        (["edge-a", "cloud-c+nowhere"], 2, "device 'nowhere' is not in topology"),
    ],
)
def test_replica_groups_are_validated(devices, m, needle):
    req = PlanRequest(
        layers=heavy_chain() * 2, topology=cloud_topology(), devices=devices, num_micro_batches=m, schedule="gpipe"
    )
    for name in ("uniform", "balanced"):
        with pytest.raises(Exception) as e:
            partition(name, req)
        assert needle in str(e.value)


def test_label_privacy_keeps_the_head_unreplicated():
    req = PlanRequest(layers=heavy_chain(), topology=cloud_topology(), label_privacy=True, num_micro_batches=2)
    why = check_replicas(req, [("edge-a",), ("cloud-c",), ("cloud-d", "cloud-e")])
    assert why and "label_privacy: the last stage (head, labels)" in why and "'cloud-d+cloud-e'" in why


# -- replicas: schedule and simulator ------------------------------------------------------


def test_replica_actions_filter_micro_batches_and_keep_step():
    acts = sch.gpipe(3, 4)[1]
    r1 = sch.replica_actions(acts, 1, 2)
    assert [str(a) for a in r1] == [
        "RECV_ACT1",
        "F1",
        "SEND_ACT1",
        "RECV_ACT3",
        "F3",
        "SEND_ACT3",
        "RECV_GRAD1",
        "B1",
        "SEND_GRAD1",
        "RECV_GRAD3",
        "B3",
        "SEND_GRAD3",
        "STEP",
    ]
    last = sch.replica_actions(sch.gpipe(3, 4)[2], 0, 2)
    assert last[0] == Action(sch.RECV_LABELS) and last[-1] == Action(sch.STEP)
    assert sch.replica_actions(acts, 0, 1) == acts
    assert sch.replica_pairs(1, 2, 4) == [(0, 0), (0, 1)] and sch.replica_pairs(2, 3, 6) == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
    ]
    with pytest.raises(ValueError):
        sch.replica_actions(acts, 2, 2)


def test_simulator_replicas_by_hand():
    # stage 0: f=b=1; stage 1 on 2 replicas: f=b=2, all-reduce 1, step 0.5; gpipe, M=2, free links
    # stage 0: F0 [0,1] F1 [1,2]
    # stage 1.0: F0 [1,3] B0 [3,5]        stage 1.1: F1 [2,4] B1 [4,6]
    # both replicas: ALLREDUCE [6,7] STEP [7,7.5]  (the all-reduce waits for the later replica)
    # stage 0: B0 [5,6] B1 [6,7] STEP [7,7]  -> 7.5
    r = simulate(
        sch.gpipe(2, 2),
        [StageCosts(1.0, 1.0), StageCosts(2.0, 2.0, 0.5, allreduce_ms=1.0)],
        [LinkCosts(0.0, 0.0)],
        replicas=[1, 2],
    )
    assert r.step_ms == pytest.approx(7.5)
    assert r.workers == [(0, 0), (1, 0), (1, 1)] and r.num_stages == 2 and r.replicas == [1, 2]
    spans = [(iv.kind, iv.mb, iv.start_ms, iv.end_ms) for iv in r.timeline if iv.resource == "stage 1.1"]
    assert spans == [("F", 1, 2, 4), ("B", 1, 4, 6), ("ALLREDUCE", -1, 6, 7), ("STEP", -1, 7, 7.5)]
    assert r.busy_ms == [pytest.approx(4.0), pytest.approx(5.5), pytest.approx(5.5)]
    assert timeline_rows(r) == [
        "stage 0",
        "link 0->1.0",
        "link 1.0->0",
        "link 0->1.1",
        "link 1.1->0",
        "stage 1.0",
        "stage 1.1",
        "labels 0->1.0",
        "labels 0->1.1",
    ]
    (ax,) = timeline_figure(r, "replicas", ["edge", "cloud"]).axes
    assert [t.get_text() for t in ax.get_yticklabels()][5:7] == ["cloud r0", "cloud r1"]


# -- replicas: planning --------------------------------------------------------------------


def test_manual_replicas_cost_and_table():
    req = PlanRequest(
        layers=heavy_chain(),
        topology=cloud_topology(),
        devices=["edge-a", "cloud-c+cloud-d"],
        cuts=[1],
        num_micro_batches=4,
        schedule="gpipe",
    )
    plan = partition("manual", req)
    s = plan.stages[1]
    assert s.devices == ["cloud-c", "cloud-d"] and plan.devices == ["edge-a", "cloud-c", "cloud-d"]
    # ring all-reduce of 5e6 fp32 gradients on 2 replicas over 100 Gbit/s, 0.05 ms:
    # 2 * (0.05 + 1e7 B * 8 / 1e11 b/s) = 2 * (0.05 + 0.8) ms
    assert s.allreduce_ms == pytest.approx(1.7)
    assert s.allreduce_ms == pytest.approx(ring_allreduce_ms(req.topology, s.devices, 5_000_000 * 4))
    assert "cloud-c+cloud-d" in plan.table() and "a+b: replicas" in plan.table()
    again = Plan.from_yaml(plan.to_yaml())
    assert again == plan and again.stages[1].devices == ["cloud-c", "cloud-d"]
    # evaluate: a replica runs M/R = 2 of the 300 ms micro-batches, then all-reduce and step
    # (AdamW over the block's 5e6 parameters on these cpu devices: 12 flops each at host_tflops 0.004 = 15 ms)
    t = CostTables(req)
    ev = evaluate(t, ["edge-a", "cloud-c"], [0, 1, 2], None, [("edge-a",), ("cloud-c", "cloud-d")])
    assert ev.step_ms == pytest.approx(plan.step_ms, abs=1e-3)
    # the step is the simulator's: the fill and drain of one micro-batch plus the other 300 ms
    # micro-batch of the bottleneck replica and the all-reduce (within 0.1 ms: the owner's waits)
    assert ev.step_ms == pytest.approx(simulate_plan(plan).step_ms, rel=1e-9)
    total = 0.15 + 300 + 1.7 / 4 + 2 * 1.8 + 15  # embed fwd+bwd, block, all-reduce over M, both links, AdamW
    assert ev.step_ms == pytest.approx(total + (300 + 3 / 4 * 1.7), abs=0.2)
    wide = PlanRequest(
        layers=heavy_chain(),
        topology=cloud_topology(slow=("cloud-node-c", "cloud-node-d", "cloud-node-e")),
        devices=["edge-a", "cloud-node-c+cloud-node-d+cloud-node-e"],
        cuts=[1],
        num_micro_batches=3,
        schedule="1f1b",
    )
    assert "cloud-node-c x3" in partition("manual", wide).table()


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_optimal_replicates_the_bottleneck_and_the_simulator_agrees(schedule):
    topo = cloud_topology(odd_tflops=0)  # the owner and three identical slow cloud devices
    req = PlanRequest(layers=heavy_chain(), topology=topo, num_micro_batches=6, schedule=schedule, replicate=False)
    base = partition("optimal", req)
    assert [s.devices for s in base.stages] == [["edge-a"], ["cloud-c"]]
    assert base.predicted["bottleneck"] == "device cloud-c"  # 300 ms per micro-batch on the block
    req.replicate = True
    plan = partition("optimal", req)
    adamw = 15.0  # the block's 5e6 parameters, 12 flops each at the cpu devices' host_tflops 0.004
    assert base.step_ms == pytest.approx(6 * 300 + 0.15 + 2 * 1.8 + adamw, rel=0.01)  # 6 x 300 ms on cloud-c
    ar = plan.stages[1].allreduce_ms
    if schedule == "gpipe":
        # 6 micro-batches: 2 or 3 replicas; 3 is faster: each replica runs 2 of the 300 ms micro-batches
        # after the fill, then the all-reduce (2 steps of 0.05 ms + 2e7 / 3 B at 100 Gbit/s)
        assert plan.stages[1].devices == ["cloud-c", "cloud-d", "cloud-e"], plan.table()
        assert ar == pytest.approx(4 * (0.05 + 2e7 / 3 * 8 / 1e11 * 1e3), abs=1e-4)
        assert plan.step_ms == pytest.approx(2 * 300 + 0.15 + 2 * 1.8 + ar + adamw, rel=0.01)
    else:
        # 1F1B on 2 stages keeps at most 2 micro-batches in flight: a third replica would idle
        assert plan.stages[1].devices == ["cloud-c", "cloud-d"], plan.table()
        assert plan.step_ms == pytest.approx(3 * 300 + 0.15 + 2 * 1.8 + ar + adamw, rel=0.01)
    # the simulator runs the replicas as timelines with the m % R routing; the plan's step is its
    sim = simulate_plan(plan)
    assert sim.workers == [(0, 0)] + [(1, r) for r in range(len(plan.stages[1].devices))]
    assert sim.step_ms == pytest.approx(plan.step_ms, rel=1e-6)
    assert simulate_plan(base).step_ms == pytest.approx(base.step_ms, rel=1e-6)
