import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEST_DEVICES = ["edge-a", "mid-b", "cloud-c", "cloud-d"]
CLIENT_DEVICES = ["edge-e", "edge-f"]  # more data owners for federated runs (tests/test_federation.py)

# Fixtures that start Ray: a test that uses one (directly or through another fixture) is in
# the `ray` tier whether or not it says so (README, "Tests"). A test that starts Ray in
# another way (train(...), the `train` CLI, ray.cluster_utils.Cluster) carries the mark itself.
RAY_FIXTURES = {"ray_cluster", "local_cluster"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES.intersection(getattr(item, "fixturenames", ())) and not item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.ray)


def checkpoint_state(run_dir, step: int) -> dict:
    """The weights (no optimizer state) of a run's newest whole checkpoint, which must be
    the one of ``step``."""
    import torch
    from safetensors.torch import load_file

    from splitlearn.checkpoint import latest

    ck = latest(run_dir)
    assert ck is not None and ck.step == step
    state = {}
    for name in ck.files:
        if not name.endswith(".optim.safetensors"):
            for k, v in load_file(ck.path / name).items():
                assert k not in state or torch.equal(state[k], v), f"{k} differs between shards"
                state[k] = v
    return state


def inline_topology(devices=TEST_DEVICES, owner="edge-a"):
    return {
        "devices": [
            {
                "name": d,
                "tier": "edge" if d.startswith("edge") else "cloud",
                "memory_gb": 2.0,
                "tflops": 0.02,
                "owns_data": d == owner,
                "zone": "home" if d.startswith("edge") else "cloud",
            }
            for d in devices
        ],
        "links": {"default": {"bandwidth_mbps": 1000, "latency_ms": 0.1}},
    }


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray instance for the session, carrying the test devices' resources."""
    import ray

    from cluster.topology import device_resource

    if not ray.is_initialized():
        ray.init(
            address="local",  # never a Ray that `ray start` left on the machine
            num_cpus=2,
            resources={device_resource(d): 1.0 for d in [*TEST_DEVICES, *CLIENT_DEVICES]},
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
