"""plan.profile: on_cluster (tier 3, a real local Ray cluster): each device times the run's
layers in its own Ray worker, the planner uses those milliseconds for that device, and the
figures are cached."""

import pytest
from conftest import inline_topology
from test_cli import write_config

from partitioners import partition
from partitioners.costmodel import stage_time
from splitlearn.config import load_config
from splitlearn.planning import plan_request


@pytest.mark.ray
def test_devices_time_their_layers_and_the_plan_uses_them(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    topo = inline_topology(["edge-a", "cloud-c", "cloud-d"])
    topo["devices"][0]["tflops"] = 50.0  # a prior far from what this CPU does: the measured times replace it
    path = write_config(tmp_path, topology={"inline": topo}, plan={"devices": ["edge-a", "cloud-c", "cloud-d"]})
    cfg = load_config(path, ["plan.profile=on_cluster", "plan.partitioner=manual", "plan.cuts=[2,4]"])
    req = plan_request(cfg)
    assert req.measured_on == {"edge-a", "cloud-c", "cloud-d"} and set(req.device_layers or {}) == req.measured_on
    edge = req.device_layers["edge-a"]
    assert all(layer.fwd_ms > 0 and layer.bwd_ms > 0 for layer in edge[1:])  # blocks and head, timed
    assert edge[1].fwd_ms == edge[2].fwd_ms  # every block takes the first block's times
    assert edge[0].opt_ms > 0  # the embedding's AdamW step, which FLOPs do not see
    cached = sorted((tmp_path / "cache" / "splitlearn" / "profiles").glob("*.json"))
    assert len(cached) == 2  # one measurement per kind of device: cloud-c and cloud-d are alike
    assert req.device_layers["cloud-c"] == req.device_layers["cloud-d"]
    plan = partition("manual", req)
    dev = cfg.topology.device("edge-a")
    measured = stage_time(edge[0:2], dev, dev.tflops)  # the device's own times, unscaled
    counted = stage_time(req.layers[0:2], dev)  # FLOPs over the topology's 50 TFLOPS
    assert plan.stages[0].fwd_ms == pytest.approx(measured.fwd_ms, rel=1e-3)
    assert plan.stages[0].fwd_ms > 10 * counted.fwd_ms
    assert "times: measured on cloud-c, cloud-d, edge-a (plan.profile: on_cluster)" in plan.table()
    again = plan_request(cfg)  # from the cache: the same figures
    assert [x.fwd_ms for x in again.device_layers["cloud-c"]] == [x.fwd_ms for x in req.device_layers["cloud-c"]]
