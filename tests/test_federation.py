"""Split-federated learning (issue 21): several data-owning clients, each its own front on its
own data, sharing the cloud's stages; FedAvg through the server."""

import pytest
import torch
from conftest import ROOT, checkpoint_state
from families import TINY

from splitlearn.config import config_from_container
from splitlearn.data import BatchSource, load_dataset
from splitlearn.errors import ConfigError
from splitlearn.models import build_model
from splitlearn.optim import make_optimizer, reference_step
from splitlearn.planning import make_plan
from splitlearn.privacy.audit import summary, transfers, violations
from splitlearn.trainer import train

CLIENTS = ["edge-a", "edge-e", "edge-f"]


def topology(slow: str | None = None):
    devices = [*CLIENTS, "cloud-c"]
    return {
        "devices": [
            {
                "name": d,
                "tier": "edge" if d.startswith("edge") else "cloud",
                "memory_gb": 2.0,
                "tflops": 0.01 if d == slow else 0.02,
                "owns_data": d in CLIENTS,
                "zone": d if d.startswith("edge") else "cloud",  # each client its own link to the cloud
            }
            for d in devices
        ],
        "links": {"default": {"bandwidth_mbps": 1000, "latency_ms": 0.1}},
    }


def client_files(tmp_path, identical: bool) -> list[str]:
    """Each client's own text (non-IID: a different slice of the quickstart text each), or
    the same file for every client."""
    text = (ROOT / "data" / "quickstart.txt").read_text()
    if identical:
        return [str(ROOT / "data" / "quickstart.txt")] * len(CLIENTS)
    third = len(text) // 3
    paths = []
    for i in range(len(CLIENTS)):
        p = tmp_path / f"client{i}.txt"
        p.write_text(text[i * third : (i + 1) * third])
        paths.append(str(p))
    return paths


def fed_raw(tmp_path, name, paths, steps=3, rounds_every=1, **over):
    raw = {
        "name": name,
        "model": {"family": "llama", "config": {**TINY["llama"], "vocab_size": 258}},
        "data": {"seq_len": 16},
        "topology": {"inline": topology()},
        "train": {"steps": steps, "batch_size": 6, "micro_batches": 3, "lr": 1e-2, "seed": 7, "max_grad_norm": 0.5},
        "plan": {"partitioner": "uniform"},
        "privacy": {"measure": "off"},
        "federation": {
            "mode": "splitfed",
            "rounds_every": rounds_every,
            "clients": [{"device": d, "data": {"path": p}} for d, p in zip(CLIENTS, paths, strict=True)],
        },
        "runtime": {
            "output_dir": str(tmp_path / "runs"),
            "run_name": name,
            "progress": "none",
            "timeout_s": 60,
            "placement_timeout_s": 30,
            "audit_transport": True,
        },
        "checkpoint": {"every_steps": 1, "keep": 5},
    }
    raw.update(over)  # whole sections
    return raw


def centralised(cfg, paths, steps):
    """The unsplit model trained on one process on the union of the clients' batches: the
    global batch in micro-batch order (micro-batch m is client m % N's local micro-batch m // N)."""
    run = cfg.run
    model = build_model(run.model, run.train.seed)
    model.train()
    opt = make_optimizer(model.parameters(), run.train)
    n = len(paths)
    rows = run.train.batch_size // run.train.micro_batches
    sources = []
    for p in paths:
        data = run.data.__class__(**{**run.data.__dict__, "path": p})
        sources.append(BatchSource(load_dataset(data)[0], run.train.batch_size // n, run.train.seed))
    losses = []
    for s in range(steps):
        own = [src.batch(s) for src in sources]
        batch = {}
        for key in ("input_ids", "attention_mask", "labels"):
            if own[0][key] is None:
                batch[key] = None
                continue
            parts = [own[m % n][key][(m // n) * rows : (m // n + 1) * rows] for m in range(run.train.micro_batches)]
            batch[key] = torch.cat(parts)
        losses.append(reference_step(model, batch, run.train, opt, s)[0])
    return model, losses


# -- config and plan (no Ray) ----------------------------------------------------------------


def test_federated_plan_shares_one_cut_paced_by_the_slowest_client(tmp_path):
    raw = fed_raw(tmp_path, "plan", client_files(tmp_path, identical=True), plan={"partitioner": "balanced"})
    raw["topology"]["inline"] = topology(slow="edge-e")
    plan = make_plan(config_from_container(raw, [], "test", tmp_path))
    assert plan.stages[0].devices == CLIENTS and plan.stages[1].devices == ["cloud-c"]
    fed = plan.predicted["federation"]
    assert fed["slowest_client"] == "edge-e" and fed["client_ms"]["edge-e"] > fed["client_ms"]["edge-a"]
    assert fed["round_ms"] == pytest.approx(plan.step_ms)
    table = plan.table()
    assert "federation: 3 clients share one cut" in table and "edge-e" in table and "round" in table


def assert_same_run(result, steps: int, ref_model, ref_losses) -> None:
    """The run's losses and its checkpoint after ``steps`` equal the reference's (1e-5, fp32)."""
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    state, ref_state = checkpoint_state(result.run_dir, steps), ref_model.state_dict()
    assert set(state) == {n for n, _ in ref_model.named_parameters()}
    for k in state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda r: r.pop("federation"), "topology.devices[1].owns_data"),
        (lambda r: r["federation"]["clients"].pop(), "federation.clients: 'edge-f' owns data but is no client"),
        (
            lambda r: r["federation"]["clients"][1]["data"].update(path="/no/such.txt"),
            "federation.clients[1].data.path",
        ),
        (lambda r: r["train"].update(micro_batches=2, batch_size=6), "train.micro_batches"),
        (lambda r: r["federation"].update(mode="round-robin"), "federation.mode"),
        (lambda r: r["federation"].update(mode="sequential", rounds_every=2), "federation.rounds_every"),
        (lambda r: (r["federation"].update(mode="sequential"), r["train"].update(dtype="bf16-master")), "train.dtype"),
        (lambda r: r["federation"].update(rounds_every=2), "checkpoint.every_steps"),
    ],
)
def test_federation_config_errors_name_the_key(tmp_path, change, needle):
    raw = fed_raw(tmp_path, "bad", client_files(tmp_path, identical=True))
    change(raw)
    with pytest.raises(ConfigError) as e:
        config_from_container(raw, [], "test", tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)


# -- real runs ---------------------------------------------------------------------------------


@pytest.mark.ray
def test_splitfed_every_step_equals_centralised_training_on_all_batches(ray_cluster, tmp_path):
    """Three clients, each its own (non-IID) text, FedAvg of the gradients every step: the
    losses and the weights equal the unsplit model trained on the union of the three batches
    (3x one client's). fp32; tolerance 1e-5 as for a plain split run
    (test_split_training_equals_single_process): the sums run in the same order (the server
    adds the clients' gradients in micro-batch order, as the reference accumulates them), so
    what differs is the cut's own rounding, amplified a little by three AdamW steps at lr 1e-2.
    The transport audit of the same run: no client sends anything to another client."""
    paths = client_files(tmp_path, identical=False)
    cfg = config_from_container(fed_raw(tmp_path, "fed", paths), [], "test", tmp_path)
    result = train(cfg, progress="none")
    assert result.plan.stages[0].devices == CLIENTS
    ref_model, ref_losses = centralised(cfg, paths, 3)
    assert_same_run(result, 3, ref_model, ref_losses)

    sent = transfers(result.stage_metrics)
    assert violations(result.plan, cfg.topology, sent) == []
    kinds = summary(sent)
    for c in CLIENTS:  # each client: its own activations and labels up, its update to the server
        assert kinds[f"activation {c}->cloud-c"] == 3 and kinds[f"labels {c}->cloud-c"] == 3
        assert kinds[f"gradient cloud-c->{c}"] == 3
        assert kinds[f"fedavg-gradient {c}->cloud-c"] == kinds[f"fedavg-aggregate cloud-c->{c}"] == 3
    assert not any(k.split()[1].split("->")[0] in CLIENTS and k.split("->")[1] in CLIENTS for k in kinds)


def _saved(ck_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint by file and key: weights, each client's optimizer state."""
    from safetensors.torch import load_file

    return {f"{p.name}:{k}": v for p in sorted(ck_dir.glob("*.safetensors")) for k, v in load_file(p).items()}


@pytest.mark.ray
def test_a_killed_client_is_dropped_from_the_round_rejoins_and_the_run_resumes_exactly(ray_cluster, tmp_path):
    """Local steps (rounds_every=2, 4 steps), checkpoints at each round's end: each client steps
    its own front, and the fronts are averaged at each round's end. Client edge-f's
    worker is killed during step 1 (round 0): edge-a and edge-e redo round 0 without it (from
    the seed's model: no checkpoint yet), edge-f rejoins at step 2 with the averaged front, and
    the run ends with every client. The events name edge-f; metrics.jsonl says who took part in
    each step; the final checkpoint holds each client's own optimizer state (local steps make
    them differ); resuming from the step-2 checkpoint ends with exactly the saved step-4 state."""
    import json
    import shutil
    import threading
    import time

    import ray

    paths = client_files(tmp_path, identical=False)
    raw = fed_raw(tmp_path, "drop", paths, steps=4, rounds_every=2, checkpoint={"every_steps": 2, "keep": 5})
    raw["topology"]["inline"]["links"]["default"]["latency_ms"] = 40  # steps long enough to be killed in
    raw["runtime"].update(emulate_links=True, timeout_s=30)
    cfg = config_from_container(raw, [], "test", tmp_path)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(result=train(cfg, progress="none")))
    t.start()
    metrics = tmp_path / "runs" / "drop" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.02)
    ray.kill(ray.get_actor("drop:a0:stage0.2", namespace="splitlearn"), no_restart=True)  # edge-f, in step 1
    t.join(timeout=240)
    assert not t.is_alive()
    result = out["result"]
    run_dir = result.run_dir
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    dropped = [e for e in events if e["kind"] == "client_dropped"]
    assert len(dropped) == 1 and "client edge-f dropped" in dropped[0]["reason"] and dropped[0]["step"] == 1, events
    rejoined = [e for e in events if e["kind"] == "client_rejoined"]
    assert len(rejoined) == 1 and "edge-f" in rejoined[0]["reason"] and rejoined[0]["step"] == 2, events
    assert result.restarts == 0 and len(result.losses) == 4

    recs = {}
    for line in metrics.read_text().splitlines():  # a redone step's record replaces the first
        rec = json.loads(line)
        recs[rec["step"]] = rec
    assert [recs[s]["clients"] for s in range(4)] == [CLIENTS[:2]] * 2 + [CLIENTS] * 2
    assert all(torch.isfinite(torch.tensor(result.losses)))
    # each client steps its own front, and the fronts are averaged at each round's end (steps 1
    # and 3): edge-f took part in the second round only; no gradient is averaged
    kinds = summary(transfers(result.stage_metrics))
    assert [kinds[f"fedavg-weights {c}->cloud-c"] for c in CLIENTS] == [2, 2, 1], kinds
    assert not any(k.startswith("fedavg-gradient") for k in kinds)

    final = run_dir / "checkpoints" / "step_00000004"
    saved = _saved(final)
    for c in CLIENTS:
        assert any(k.startswith(f"stage_0.client-{c}.optim.safetensors:optim/") for k in saved), c
    a, e = (
        {k.split(":", 1)[1]: v for k, v in saved.items() if k.startswith(f"stage_0.client-{c}.")}
        for c in ("edge-a", "edge-e")
    )
    assert any(not torch.equal(a[k], e[k]) for k in a if "exp_avg" in k)  # each client's own moments

    copy = tmp_path / "resume" / "drop"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000004")
    (copy / "summary.json").unlink()
    raw["runtime"]["output_dir"] = str(tmp_path / "resume")
    resumed = train(config_from_container(raw, [], "test", tmp_path), progress="none", resume=str(copy))
    again = _saved(copy / "checkpoints" / "step_00000004")
    assert set(again) == set(saved)
    for k in saved:
        torch.testing.assert_close(again[k], saved[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(torch.tensor(resumed.losses[2:]), torch.tensor(result.losses[2:]), rtol=0, atol=0)


@pytest.mark.ray
def test_sequential_split_learning_equals_centralised_training_of_the_turns_in_order(ray_cluster, tmp_path):
    """mode: sequential, three clients, each its own (non-IID) text: step s is client s % 3's
    own (s // 3)-th batch, and the front (weights and AdamW state) is handed on to the next
    client through the server. Four steps (client edge-a twice: the front came back to it
    through both others) equal the unsplit model trained on the same batches in the same order:
    fp32, 1e-5 as for the splitfed test (the same ops in the same order; what differs is the
    cut's rounding through four AdamW steps). The audit: each client sends activations only on
    its turns, gets back gradients of its own micro-batches only, and the front goes through
    the server."""
    paths = client_files(tmp_path, identical=False)
    raw = fed_raw(tmp_path, "seq", paths, steps=4)
    raw["federation"]["mode"] = "sequential"
    raw["checkpoint"] = {"every_steps": 2, "keep": 2}
    cfg = config_from_container(raw, [], "test", tmp_path)
    result = train(cfg, progress="none")
    assert "sequential split learning: 3 clients take turns" in result.plan.table()

    run = cfg.run
    model = build_model(run.model, run.train.seed)
    model.train()
    opt = make_optimizer(model.parameters(), run.train)
    sources = []
    for p in paths:
        data = run.data.__class__(**{**run.data.__dict__, "path": p})
        sources.append(BatchSource(load_dataset(data)[0], run.train.batch_size, run.train.seed))
    ref_losses = [reference_step(model, sources[s % 3].batch(s // 3), run.train, opt, s)[0] for s in range(4)]
    assert_same_run(result, 4, model, ref_losses)

    sent = transfers(result.stage_metrics)
    assert violations(result.plan, cfg.topology, sent, sequential=True) == []
    assert violations(result.plan, cfg.topology, sent) != []  # the rule sees whose turn it was
    kinds = summary(sent)
    assert [kinds[f"labels {c}->cloud-c"] for c in CLIENTS] == [2, 1, 1]
    assert [kinds[f"handoff {c}->cloud-c"] for c in CLIENTS] == [2, 1, 1]
    assert [kinds[f"handoff cloud-c->{c}"] for c in CLIENTS] == [1, 2, 1]
    assert not any(k.startswith("fedavg") for k in kinds)


def test_audit_flags_a_micro_batch_that_reaches_another_client(tmp_path):
    """The audit's per-client rule on recorded transfers (no Ray): micro-batch m is client
    m % 3's, so a gradient of micro-batch 0 sent to edge-e, or an activation of it sent from
    edge-e, is flagged; the same under sequential turns goes by the step."""
    raw = fed_raw(tmp_path, "audit", client_files(tmp_path, identical=True))
    cfg = config_from_container(raw, [], "test", tmp_path)
    plan = make_plan(cfg)
    stage = {**dict.fromkeys(CLIENTS, 0), "cloud-c": 1}

    def sent(kind, src, dst, mb, step=0):
        ends = {"src_stage": stage[src], "src_device": src, "dst_stage": stage[dst], "dst_device": dst}
        return {"kind": kind, "dtype": "float32", "shape": [2, 16, 8], "mb": mb, "step": step, **ends}

    def check(*ts, sequential=False):
        return violations(plan, cfg.topology, list(ts), sequential=sequential)

    assert check(sent("gradient", "cloud-c", "edge-e", 1), sent("activation", "edge-f", "cloud-c", 2)) == []
    bad = check(sent("gradient", "cloud-c", "edge-e", 0), sent("activation", "edge-e", "cloud-c", 0))
    assert len(bad) == 2 and all("micro-batch 0 is client edge-a's" in b for b in bad), bad
    assert check(sent("gradient", "cloud-c", "edge-e", 0, step=1), sequential=True) == []
    assert len(check(sent("gradient", "cloud-c", "edge-e", 1, step=2), sequential=True)) == 1
