"""Tier 3: the chat loop in the real runtime (Ray actors over gloo). A local Llama checkpoint
fine-tuned on chat JSONL over two stages (LoRA on the edge, full on the cloud) with an eval
file: the pipeline's eval loss equals a single-process forward on the same rows; the
exported directory loads with AutoModelForCausalLM / AutoTokenizer and gives the trained
segments' logits; generate runs on it."""

import pytest
import torch
from conftest import checkpoint_state, inline_topology

from splitlearn.chat_example import write_chat_example
from splitlearn.checkpoint import latest
from splitlearn.config import config_from_container
from splitlearn.data import load_run_data
from splitlearn.export import export_run, generate
from splitlearn.models.chain import causal_lm_loss
from splitlearn.stage.worker import StageWorker
from splitlearn.trainer import train

pytestmark = pytest.mark.ray


def chat_config(tmp_path, paths):
    raw = {
        "name": "chat",
        "model": {"path": str(paths["model"])},
        "data": {"path": str(paths["train"]), "format": "chat", "tokenizer": str(paths["tokenizer"]),
                 "eval_path": str(paths["eval"]), "seq_len": 24},
        "topology": {"inline": inline_topology()},
        "train": {"steps": 3, "batch_size": 4, "micro_batches": 2, "lr": 1e-2, "eval_every": 2, "seed": 3},
        "plan": {"partitioner": "manual", "devices": ["edge-a", "cloud-c"], "cuts": [2]},
        "finetune": {"by_stage": {"0": {"method": "lora"}}, "lora": {"r": 4, "alpha": 8}},
        "runtime": {"output_dir": str(tmp_path / "runs"), "run_name": "chat", "progress": "none", "timeout_s": 60},
    }  # fmt: skip
    return config_from_container(raw, [], "test", tmp_path)


def segment_logits(result, ids, mask):
    """The trained segments, rebuilt in this process from the run's last checkpoint, chained."""
    ck = latest(result.run_dir)
    workers = []
    run = config_from_container(_run(result), [], "t", result.run_dir)
    for s in range(result.plan.num_stages):
        w = StageWorker(s, run.resolved_dict(), result.plan.to_dict(), str(result.run_dir))
        w.prepare()
        w.checkpoints.load(str(ck.path), ck.files)
        workers.append(w)
    h = ids
    with torch.no_grad():
        for w in workers[:-1]:
            h = w.segment.eval()(h, mask)
        last = workers[-1].segment.eval()
        seen = []  # the head's logits, caught on the way to the loss
        hook = last.model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o))
        last(h, mask, ids, None)
        hook.remove()
        return seen[0]


def _run(result):
    import json

    return json.loads(result.run_dir.joinpath("run.json").read_text())["run"]


def test_chat_run_eval_export_generate(ray_cluster, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = write_chat_example(tmp_path / "chat", num_train=24, num_eval=6, seed=1)
    cfg = chat_config(tmp_path, paths)
    result = train(cfg, progress="none")
    assert [e["step"] for e in result.evals] == [2, 3]
    assert result.summary["eval_loss"] == result.evals[-1]["eval_loss"]

    out = tmp_path / "exported"
    info = export_run(result.run_dir, out)
    assert info["step"] == 3 and info["lora_modules"] > 0 and info["tokenizer"]
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.chat_template and model.dtype == torch.float32

    data = load_run_data(cfg.run.data)  # the eval rows, as the data owner reads them
    ev = data.eval.rows(0, data.eval.num_rows)
    with torch.no_grad():
        logits = model(input_ids=ev["input_ids"], attention_mask=ev["attention_mask"]).logits
    single = float(causal_lm_loss(logits, ev["labels"]))
    assert abs(single - result.summary["eval_loss"]) < 1e-5, (single, result.summary["eval_loss"])

    want = segment_logits(result, ev["input_ids"], ev["attention_mask"])
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    assert set(checkpoint_state(result.run_dir, 3))  # the checkpoint the export read

    text = generate(out, "what is one plus two ?", max_new_tokens=4)
    assert isinstance(text, str)
