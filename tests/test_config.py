"""Tier 1: the run config, the topology files and their errors."""

from pathlib import Path

import pytest
from conftest import ROOT

from cluster.topology import load_topology, topology_from_container
from splitlearn.config import load_config
from splitlearn.errors import ConfigError, TopologyError

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def write(tmp_path: Path, text: str, name="run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_quickstart_loads_with_overrides():
    cfg = load_config(QUICKSTART, ["train.steps=7", "train.lr=0.01", "plan.partitioner=uniform"])
    assert cfg.run.train.steps == 7 and cfg.run.train.lr == 0.01
    assert cfg.topology.device_names == ["edge-phone", "home-server", "cloud-gpu"]
    assert cfg.topology.data_owner.name == "edge-phone"


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["train.stepz=3"], "train.stepz"),
        (["train.steps=abc"], "train.steps"),
        (["train.steps=0"], "train.steps: must be >= 1"),
        (["train.micro_batches=3"], "train.micro_batches: 3 does not divide train.batch_size=16"),
        (["train.dtype=fp8"], "train.dtype: 'fp8' is not one of fp32, bf16"),
        (["train.lr=nan"], "train.lr: must be a finite number, got nan"),
        (["train.lr=inf"], "train.lr: must be a finite number, got inf"),
        (["train.weight_decay=-inf"], "train.weight_decay: must be a finite number"),
        (["runtime.run_name=../../x"], "runtime.run_name: '../../x' must be a name, not a path"),
        (["runtime.run_name=/tmp/abs"], "runtime.run_name: '/tmp/abs' must be a name"),
        (["runtime.run_name=.."], "runtime.run_name: '..' must be a name"),
        (["plan.partitioner=magic"], "plan.partitioner"),
        (["plan.devices=[edge-phone,nowhere]"], "plan.devices[1]: device 'nowhere' is not in the topology"),
        (["data.path=nope.txt"], "data.path: file not found"),
        (["model.path=/no/such/dir", "model.family=null"], "model.path: directory not found"),
        (["runtime.timeout_s=-1"], "runtime.timeout_s"),
        (["trainsteps"], "expected key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = write(tmp_path, "model: {family: llama}\ntrain: {lr: 0.1, epochs: 3}\ntopology: {inline: null}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "train.epochs" in str(e.value)


def test_malformed_yaml(tmp_path):
    p = write(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_missing_topology_file(tmp_path):
    p = write(
        tmp_path,
        f"model: {{family: llama}}\ndata: {{path: {ROOT}/data/quickstart.txt}}\ntopology: {{file: gone.yaml}}\n",
    )
    with pytest.raises(ConfigError, match="topology file not found: .*gone.yaml"):
        load_config(p)


def test_topology_relative_to_config_and_inline_exclusive(tmp_path):
    (tmp_path / "t.yaml").write_text((ROOT / "configs/topologies/laptop.yaml").read_text())
    p = write(
        tmp_path, f"model: {{family: llama}}\ndata: {{path: {ROOT}/data/quickstart.txt}}\ntopology: {{file: t.yaml}}\n"
    )
    assert load_config(p).topology.name == "t"
    p = write(
        tmp_path,
        f"model: {{family: llama}}\ndata: {{path: {ROOT}/data/quickstart.txt}}\n"
        "topology: {file: t.yaml, inline: {devices: []}}\n",
    )
    with pytest.raises(ConfigError, match="not both"):
        load_config(p)


def test_model_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of model.family"):
        load_config(QUICKSTART, ["model.path=" + str(ROOT)])


# -- topology ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "topologies").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_topologies_load(path):
    topo = load_topology(path)
    assert topo.devices and topo.data_owner.tier == "edge"
    for d in topo.devices:  # every device can reach every other
        for e in topo.devices:
            if d.name != e.name:
                assert topo.link(d.name, e.name).bandwidth_mbps > 0


def test_example_topologies_cover_the_range():
    names = {p.stem for p in (ROOT / "configs" / "topologies").glob("*.yaml")}
    assert len(names) >= 4 and "laptop" in names
    big = load_topology(ROOT / "configs/topologies/edge8-cloud4.yaml")
    assert sum(d.tier == "edge" for d in big.devices) == 8 and sum(d.tier == "cloud" for d in big.devices) == 4


def test_link_lookup_pair_then_zone_then_default():
    topo = topology_from_container(
        {
            "devices": [
                {"name": "a", "memory_gb": 1, "tflops": 1, "zone": "z1", "owns_data": True},
                {"name": "b", "memory_gb": 1, "tflops": 1, "zone": "z2"},
                {"name": "c", "memory_gb": 1, "tflops": 1, "zone": "z2"},
                {"name": "d", "memory_gb": 1, "tflops": 1, "zone": "z3"},
            ],
            "links": {
                "default": {"bandwidth_mbps": 5, "latency_ms": 50},
                "zones": [
                    {"a": "z1", "b": "z2", "bandwidth_mbps": 20, "latency_ms": 10, "reverse_bandwidth_mbps": 200}
                ],
                "pairs": [{"a": "a", "b": "c", "bandwidth_mbps": 1000, "latency_ms": 1}],
            },
        }
    )
    assert topo.link("a", "b").bandwidth_mbps == 20 and topo.link("b", "a").bandwidth_mbps == 200
    assert topo.link("a", "c").bandwidth_mbps == 1000 and topo.link("c", "a").latency_ms == 1
    assert topo.link("a", "d").bandwidth_mbps == 5
    # 1 MB over 20 Mbit/s = 400 ms, plus 10 ms latency
    assert topo.transfer_ms("a", "b", 1e6) == pytest.approx(410.0)


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"devices": []}, "no devices"),
        ({"devices": [{"name": "a", "memory_gb": 1, "tflops": 1}]}, "owns_data"),
        ({"devices": [{"name": "a", "memory_gb": -1, "tflops": 1, "owns_data": True}]}, "devices[0].memory_gb"),
        (
            {"devices": [{"name": "a", "memory_gb": float("nan"), "tflops": 1, "owns_data": True}]},
            "devices[0].memory_gb: must be a finite number, got nan",
        ),
        (
            {"devices": [{"name": "a", "memory_gb": 1, "tflops": float("inf"), "owns_data": True}]},
            "devices[0].tflops: must be a finite number, got inf",
        ),
        (
            {
                "devices": [{"name": "a", "memory_gb": 1, "tflops": 1, "owns_data": True}],
                "links": {"default": {"bandwidth_mbps": float("nan")}},
            },
            "links.default.bandwidth_mbps: must be a finite number",
        ),
        (
            {"devices": [{"name": "a", "memory_gb": 1, "tflops": 1, "tier": "fog", "owns_data": True}]},
            "devices[0].tier",
        ),
        (
            {
                "devices": [
                    {"name": "a", "memory_gb": 1, "tflops": 1, "owns_data": True},
                    {"name": "a", "memory_gb": 1, "tflops": 1},
                ]
            },
            "defined twice",
        ),
        ({"devices": [{"name": "a", "memory_gb": 1, "tflops": 1, "owns_data": True, "speed": 3}]}, "devices[0].speed"),
        (
            {
                "devices": [{"name": "a", "memory_gb": 1, "tflops": 1, "owns_data": True}],
                "links": {"pairs": [{"a": "a", "b": "zz", "bandwidth_mbps": 1, "latency_ms": 1}]},
            },
            "links.pairs[0].b",
        ),
        (
            {"devices": [{"name": "a", "memory_gb": 1, "tflops": 1, "owns_data": True}], "links": {"wires": []}},
            "links.wires",
        ),
    ],
)
def test_topology_errors_name_the_key(data, needle):
    with pytest.raises(TopologyError) as e:
        topology_from_container(data, "topo.yaml")
    assert needle in str(e.value) and str(e.value).startswith("topo.yaml")


def test_worker_env_follows_the_runtime_settings():
    """What a stage worker (and the device profile) starts with: the malloc and huge-page
    settings of ``runtime``, each left to the library's default when turned off."""
    from splitlearn.runtime import worker_env

    run = load_config(QUICKSTART).resolved_dict()
    assert worker_env(run) == {
        "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
        "MALLOC_TRIM_THRESHOLD_": str(128 * 1024),
        "MALLOC_ARENA_MAX": "1",
        "THP_MEM_ALLOC_ENABLE": "1",
    }
    off = ["runtime.malloc_mmap_threshold_kb=0", "runtime.malloc_arena_max=0", "runtime.huge_pages=false"]
    assert worker_env(load_config(QUICKSTART, off).resolved_dict()) == {}
    only = load_config(QUICKSTART, ["runtime.malloc_mmap_threshold_kb=0", "runtime.huge_pages=false"])
    assert worker_env(only.resolved_dict()) == {"MALLOC_ARENA_MAX": "1"}
