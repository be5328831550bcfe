"""Tiers 1-2: the attacks on real (tiny, random-init) transformers models, the privacy
command and the planner's bound from its measurement."""

import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT
from families import TINY

from splitlearn.models.build import build_model
from splitlearn.models.chain import cut
from splitlearn.privacy.attacks import nearest_tokens, recovery
from splitlearn.privacy.bound import least_blocks

TOPO = {
    "devices": [
        {"name": "edge-a", "tier": "edge", "memory_gb": 2, "tflops": 0.00001, "owns_data": True, "zone": "home"},
        {"name": "cloud-c", "tier": "cloud", "memory_gb": 8, "tflops": 10, "zone": "cloud"},
    ],
    "links": {"default": {"bandwidth_mbps": 1000, "latency_ms": 0.1}},
}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_embedding_only_cut_gives_every_token_away(family):
    from omegaconf import OmegaConf

    from splitlearn.config import ModelConfig

    mc = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), {"family": family, "config": TINY[family]})
    )
    model = build_model(mc, seed=0).eval()
    vocab = model.get_input_embeddings().weight
    ids = torch.randint(0, vocab.shape[0], (8, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        acts = cut(model, 0, 1)(ids)  # what the owner sends when it keeps only the embedding
    assert recovery(nearest_tokens(acts, vocab.detach()), ids) >= 0.99


def test_least_blocks_takes_the_measured_cuts_from_which_all_meet_the_bound():
    assert least_blocks({0: 1.0, 1: 0.5, 2: 0.01, 3: 0.02}, 0.05) == 2
    assert least_blocks({0: 1.0, 1: 0.01, 2: 0.5, 3: 0.02}, 0.05) == 3  # 1 meets it but 2, deeper, does not
    assert least_blocks({0: 1.0, 1: 0.5}, 0.05) is None


def cli(*args):
    return subprocess.run([sys.executable, "-m", "splitlearn", *args], capture_output=True, text=True, cwd=ROOT)


def test_privacy_command_and_the_bound_the_plan_honours(tmp_path):
    cfg = {
        "name": "priv",
        "model": {"family": "llama", "config": {**TINY["llama"], "vocab_size": 258}},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": 16},
        "topology": {"inline": TOPO},
        "train": {"batch_size": 4, "micro_batches": 2},
        "plan": {"partitioner": "optimal", "search_seconds": 2},
        "privacy": {"cache_dir": str(tmp_path / "cache"), "attacks": ["nearest", "label"], "max_owner_blocks": 2},
    }
    path = tmp_path / "priv.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = cli("plan", str(path), "--out", str(tmp_path / "p0.yaml"))
    assert before.returncode == 0 and "privacy: not measured" in before.stdout
    assert yaml.safe_load((tmp_path / "p0.yaml").read_text())["stages"][0]["stop"] == 1  # slow owner: embedding only
    out = cli("privacy", str(path))
    assert out.returncode == 0, out.stderr
    assert "owner blocks" in out.stdout and "100.0%" in out.stdout  # the embedding-only cut gives all away
    report = yaml.safe_load(next((tmp_path / "cache").glob("*.json")).read_text())
    rows = {r["owner_blocks"]: r for r in report["rows"]}
    assert rows[0]["nearest"] >= 0.99
    # the default bound (5%): no measured cut meets it, so the whole model stays on the owner
    default = cli("plan", str(path), "--out", str(tmp_path / "p1.yaml"))
    assert default.returncode == 0 and "nothing leaves it" in default.stdout
    assert len(yaml.safe_load((tmp_path / "p1.yaml").read_text())["stages"]) == 1
    # a looser bound: the owner's first stage is never one whose measured recovery exceeds it
    bound = rows[2]["nearest"]  # 2 owner blocks meet it (the deepest measured)
    assert bound < 1.0
    loose = cli(
        "plan",
        str(path),
        "--out",
        str(tmp_path / "p2.yaml"),
        f"privacy.max_token_recovery={bound}",
        "privacy.max_label_recovery=1.0",
    )
    assert loose.returncode == 0, loose.stderr
    plan = yaml.safe_load((tmp_path / "p2.yaml").read_text())
    first = plan["stages"][0]
    assert first["stop"] - 1 >= 2 or len(plan["stages"]) == 1
    if plan["stages"][-1]["devices"] != first["devices"] or len(plan["stages"]) > 2:  # something leaves the owner
        assert rows[first["stop"] - 1]["nearest"] <= bound and first["leak"] <= bound
        assert plan["label_privacy"]  # the labels are the tokens: the head stays on the owner
    bad = cli("plan", str(path), "privacy.max_token_recovery=2")
    assert (
        bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "privacy.max_token_recovery" in bad.stderr
    )
