"""plan.profile: on_cluster (tier 3, a real local Ray cluster): each device times the run's
layers in its own Ray worker, the planner uses those milliseconds for that device, and the
figures are cached."""

import dataclasses
import json

import pytest
from conftest import inline_topology
from test_cli import write_config

from partitioners import partition
from partitioners.costmodel import stage_time
from partitioners.planner import simulate_plan
from splitlearn.config import load_config
from splitlearn.planning import make_plan, plan_request
from splitlearn.runtime import WORKER_ENV_VARS, worker_env


@pytest.mark.ray
def test_devices_time_their_layers_and_the_plan_uses_them(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    topo = inline_topology(["edge-a", "cloud-c", "cloud-d"])
    topo["devices"][0]["tflops"] = 50.0  # a prior far from what this CPU does: the measured times replace it
    path = write_config(tmp_path, topology={"inline": topo}, plan={"devices": ["edge-a", "cloud-c", "cloud-d"]})
    cfg = load_config(path, ["plan.profile=on_cluster", "plan.partitioner=manual", "plan.cuts=[2,4]"])
    req = plan_request(cfg)
    # three one-thread devices on the test cluster's one node of 2 CPUs: said, not hidden
    assert "edge-a, cloud-c, cloud-d share a host of 2 CPUs and ask 3 threads" in capsys.readouterr().out
    assert req.measured_on == {"edge-a", "cloud-c", "cloud-d"} and set(req.device_layers or {}) == req.measured_on
    edge = req.device_layers["edge-a"]
    assert all(layer.fwd_ms > 0 and layer.bwd_ms > 0 for layer in edge[1:])  # blocks and head, timed
    assert edge[1].fwd_ms == edge[2].fwd_ms  # every block takes the first block's times
    assert edge[0].opt_ms > 0  # the embedding's AdamW step, which FLOPs do not see
    cached = sorted((tmp_path / "cache" / "splitlearn" / "profiles").glob("[0-9a-f]*.json"))
    assert len(cached) == 2  # one measurement per kind of device: cloud-c and cloud-d are alike
    # timed in the stage workers' environment (malloc and huge pages), as the Ray task saw it
    env = worker_env(cfg.resolved_dict())
    assert set(env) == set(WORKER_ENV_VARS)  # the defaults set every one
    assert all(json.loads(p.read_text())["times"]["env"] == env for p in cached)
    assert req.device_layers["cloud-c"] == req.device_layers["cloud-d"]
    plan = partition("manual", req)
    dev = cfg.topology.device("edge-a")
    measured = stage_time(edge[0:2], dev, dev.tflops)  # the device's own times, unscaled
    counted = stage_time(req.layers[0:2], dev)  # FLOPs over the topology's 50 TFLOPS
    assert plan.stages[0].fwd_ms == pytest.approx(measured.fwd_ms, rel=1e-3)
    assert plan.stages[0].fwd_ms > 10 * counted.fwd_ms
    assert "times: measured on cloud-c, cloud-d, edge-a (plan.profile: on_cluster)" in plan.table()
    # the transport between the devices' hosts was measured (one node here: its loopback) and
    # no link is taken faster than that, whatever the topology declares
    names = ["edge-a", "cloud-c", "cloud-d"]
    assert set(req.topology.measured) == {f"{a}->{b}" for a in names for b in names if a != b}
    got = req.topology.measured["edge-a->cloud-c"]
    assert 0 < got.bandwidth_mbps < 1e6 and got.latency_ms > 0
    declared = cfg.topology.link("edge-a", "cloud-c")
    link = req.topology.link("edge-a", "cloud-c")
    assert link.bandwidth_mbps == min(declared.bandwidth_mbps, got.bandwidth_mbps)
    assert link.latency_ms == max(declared.latency_ms, got.latency_ms)
    assert "links: measured edge-a->cloud-c" in plan.table()
    # what a step costs the runtime outside the stages' actions (the call to each worker and
    # back), measured, is in the plan's step and in the simulator's
    assert 0 < req.step_overhead_ms < 1000
    assert plan.predicted["step_overhead_ms"] == pytest.approx(req.step_overhead_ms, abs=1e-3)
    bare = partition("manual", dataclasses.replace(req, step_overhead_ms=0.0))
    assert plan.step_ms == pytest.approx(bare.step_ms + req.step_overhead_ms, abs=1e-3)
    assert "outside the stages (the runtime's call to each worker, measured)" in plan.table()
    made = make_plan(cfg)
    alone = simulate_plan(made, step_overhead_ms=made.predicted["step_overhead_ms"]).step_ms
    assert alone == pytest.approx(made.step_ms, rel=0.02)
    assert alone > made.predicted["step_overhead_ms"] > 0
    # the three share the node's 2 CPUs: the simulated step stretches what overlaps there (in
    # this sequential schedule never more than two at once: nothing; see test_simulator); and
    # each CPU device's block was timed alone and beside the others (cached; alike devices share one k)
    (host,) = req.shared_cpus
    assert host["cpus"] == 2 and host["threads"] == {"edge-a": 1, "cloud-c": 1, "cloud-d": 1}
    side = host["side_by_side"]
    assert set(side) == {"edge-a", "cloud-c", "cloud-d"} and side["cloud-c"] == side["cloud-d"]
    assert all(set(k) == {"F", "B", "STEP"} and all(0 <= v < 10 for v in k.values()) for k in side.values())
    (record,) = (tmp_path / "cache" / "splitlearn" / "profiles").glob("side-*.json")
    assert json.loads(record.read_text())["devices"] == ["edge-a", "cloud-c", "cloud-d"]
    assert made.predicted["shared_cpus"] == req.shared_cpus
    assert made.predicted["simulated_step_ms"] >= alone
    assert "cores shared: edge-a, cloud-c, cloud-d ask 3 threads of a host's 2 CPUs" in made.table()
    assert "side by side: edge-a, cloud-c, cloud-d measured slower per thread" in made.table()
    again = plan_request(cfg)  # from the cache: the same figures
    assert [x.fwd_ms for x in again.device_layers["cloud-c"]] == [x.fwd_ms for x in req.device_layers["cloud-c"]]
    assert again.shared_cpus == req.shared_cpus  # the side-by-side figures too


def test_devices_sharing_a_node_are_timed_one_after_another():
    from splitlearn.device_profile import _waves

    node_of = {"edge-a": "n1", "edge-b": "n1", "gpu": "n1", "phone": "n2"}
    waves = _waves(["edge-a", "edge-b", "gpu", "phone", "elsewhere"], node_of)
    assert waves == [["edge-a", "phone", "elsewhere"], ["edge-b"], ["gpu"]]
    for wave in waves:  # never two devices of one node at once
        nodes = [node_of.get(n, n) for n in wave]
        assert len(nodes) == len(set(nodes))


def test_saved_bytes_measured_on_a_device_replace_the_counted_ones():
    from partitioners.costmodel import StageMethod
    from partitioners.profile import LayerProfile
    from splitlearn.device_profile import measured_layers

    layers = [LayerProfile(n, saved_bytes=1000) for n in ("embed", "block_0", "block_1", "head")]
    times = {"embed": [1.0, 2.0, 3.0], "block": [4.0, 5.0, 6.0], "head": [7.0, 8.0, 9.0]}
    counted = measured_layers(layers, times, StageMethod())
    assert [x.saved_bytes for x in counted] == [1000] * 4  # not measured (a CPU): the count stays
    got = measured_layers(layers, {**times, "saved": {"block": 600, "head": 50}}, StageMethod())
    assert [x.saved_bytes for x in got] == [1000, 600, 600, 50]
    assert [(x.fwd_ms, x.bwd_ms, x.opt_ms) for x in got][1:3] == [(4.0, 5.0, 6.0)] * 2


@pytest.mark.ray
def test_a_device_not_on_the_cluster_takes_a_measured_devices_times_scaled_by_tflops(
    ray_cluster, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    topo = inline_topology(["edge-a", "cloud-x"])  # no node of the test cluster holds cloud-x
    topo["devices"][1]["tflops"] = 0.04  # twice edge-a's
    path = write_config(tmp_path, topology={"inline": topo}, plan={"devices": ["edge-a", "cloud-x"]})
    cfg = load_config(path, ["plan.profile=on_cluster", "plan.partitioner=manual", "plan.cuts=[2]"])
    req = plan_request(cfg)
    assert "not on the cluster, not timed: cloud-x" in capsys.readouterr().out
    assert req.measured_on == {"edge-a"} and req.measured_like == {"cloud-x": "edge-a"}
    plan = partition("manual", req)
    edge = req.device_layers["edge-a"]
    # edge-a's own times for the layers cloud-x runs, at its 0.02 TFLOPS against cloud-x's 0.04
    assert plan.stages[1].fwd_ms == pytest.approx(sum(x.fwd_ms for x in edge[2:]) * 0.5, rel=1e-3)
    assert plan.stages[1].bwd_ms == pytest.approx(sum(x.bwd_ms for x in edge[2:]) * 0.5, rel=1e-3)
    assert "not on the cluster, scaled by tflops: cloud-x from edge-a's" in plan.table()
    assert req.topology.measured == {}  # no link to measure: one end is not there


def test_the_measured_device_an_absent_one_takes_is_of_its_kind_and_tier_nearest_in_speed():
    from cluster.topology import topology_from_container
    from splitlearn.device_profile import measured_like

    topo = inline_topology(["edge-a", "edge-b", "cloud-c", "cloud-d", "cloud-e"])
    speeds = {"edge-a": 1.0, "edge-b": 3.0, "cloud-c": 10.0, "cloud-d": 40.0, "cloud-e": 30.0}
    for d in topo["devices"]:
        d["tflops"] = speeds[d["name"]]
    topo["devices"][3]["accelerator"] = "cuda"  # cloud-d: a GPU
    t = topology_from_container(topo, "test")
    got = measured_like(t, ["edge-a", "cloud-c", "cloud-d"], ["edge-a", "edge-b", "cloud-e"])
    # cloud-e (a CPU) takes the CPU cloud device, not the faster GPU; edge-b its tier's
    assert got == {"edge-b": "edge-a", "cloud-e": "cloud-c"}
    assert measured_like(t, ["cloud-d"], ["edge-a"]) == {}  # no CPU measured: the FLOPs prior


@pytest.mark.ray
def test_a_link_is_measured_with_the_runs_codec(ray_cluster):
    from splitlearn.device_profile import measure_links

    links = measure_links(["edge-a", "cloud-c"], 8 << 20, codec="int8", log=lambda _: None)
    assert set(links) == {"edge-a->cloud-c", "cloud-c->edge-a"}
    got = links["edge-a->cloud-c"]
    # the bandwidth is over the packed bytes (a quarter of fp32's), what the plan divides by it
    assert 0 < got.bandwidth_mbps < 1e6 and 0 < got.latency_ms < 1000
