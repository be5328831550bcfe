"""Tier 1-2, one process: every data format reads the same rows; chat and prompt/response
rows carry loss on the response only (checked by hand); bad rows name the file, the field
and the key; LR schedules; curves (TensorBoard event files, the PNG); generate."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from splitlearn.chat_example import build_model, build_tokenizer, synth_chats
from splitlearn.cli import main
from splitlearn.data import load_dataset, load_run_data
from splitlearn.data_formats import Keys, read_samples
from splitlearn.errors import DataError
from splitlearn.models.chain import IGNORE_INDEX, causal_lm_loss
from splitlearn.optim import lr_at

CHATS = synth_chats(6, seed=3)


def data_cfg(path, tokenizer="byte", **kw):
    base = dict(
        path=str(path), format="auto", text_key="text", messages_key="messages", prompt_key="prompt",
        response_key="response", loss_on="response", tokenizer=str(tokenizer), seq_len=24, packing=None,
        eval_path=None, eval_fraction=0.0,
    )  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer([" ".join(m["content"] for m in r["messages"]) for r in synth_chats(50, 0)], d)
    return d


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_response_loss_counts_only_response_tokens_by_hand(tmp_path):
    """Prompt "ab", response "cd": labels are the response and its end-of-text only, and the
    loss is the mean of exactly those three next-token terms, computed here by hand."""
    path = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "ab", "response": "cd"}])
    ds, _ = load_dataset(data_cfg(path, seq_len=8))
    assert ds.input_ids[0].tolist() == [97, 98, 99, 100, 256, 257, 257, 257]
    assert ds.labels[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 99, 100, 256] + [IGNORE_INDEX] * 3
    torch.manual_seed(0)
    logits = torch.randn(1, 8, 258)
    logp = torch.log_softmax(logits[0], dim=-1)
    by_hand = -(logp[1, 99] + logp[2, 100] + logp[3, 256]) / 3  # position t predicts token t+1
    torch.testing.assert_close(causal_lm_loss(logits, ds.labels), by_hand)
    ds_all, _ = load_dataset(data_cfg(path, seq_len=8, loss_on="all"))
    assert ds_all.labels[0].tolist()[:5] == [97, 98, 99, 100, 256]


def test_chat_labels_are_the_assistant_turns(tmp_path, tok_dir):
    rows = [{"messages": [{"role": "user", "content": "what is one plus two ?"},
                          {"role": "assistant", "content": "one plus two is three ."},
                          {"role": "user", "content": "and two plus two ?"},
                          {"role": "assistant", "content": "four ."}]}]  # fmt: skip
    ds, tok = load_dataset(data_cfg(write_jsonl(tmp_path / "c.jsonl", rows), tok_dir, seq_len=40))
    toks = tok.tok.convert_ids_to_tokens(ds.input_ids[0].tolist())
    labeled = [t for t, lab in zip(toks, ds.labels[0].tolist(), strict=True) if lab != IGNORE_INDEX]
    assert labeled == ["one", "plus", "two", "is", "three", ".", "<|end|>", "four", ".", "<|end|>"]
    assert toks[:2] == ["<|user|>", "what"] and "<|assistant|>" in toks


def test_each_format_reads_the_same_rows(tmp_path, tok_dir):
    """The same chat rows as chat JSONL (named and auto-detected), parquet and a `datasets`
    save_to_disk folder; the same documents as text and JSONL."""
    chat = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    want = load_dataset(data_cfg(chat, tok_dir, format="chat"))[0]
    same = [load_dataset(data_cfg(chat, tok_dir))[0]]
    import datasets

    ds = datasets.Dataset.from_list(CHATS)
    ds.to_parquet(str(tmp_path / "chat.parquet"))
    ds.save_to_disk(str(tmp_path / "chat_disk"))
    same.append(load_dataset(data_cfg(tmp_path / "chat.parquet", tok_dir))[0])
    same.append(load_dataset(data_cfg(tmp_path / "chat_disk", tok_dir))[0])  # a folder: auto is hf_disk
    for got in same:
        for a, b in (
            (got.input_ids, want.input_ids),
            (got.labels, want.labels),
            (got.attention_mask, want.attention_mask),
        ):
            assert torch.equal(a, b)
    docs = ["first doc", "second, longer doc", "third"]
    (tmp_path / "d.txt").write_text("\n\n".join(docs))
    write_jsonl(tmp_path / "d.jsonl", [{"body": d} for d in docs])
    a = load_dataset(data_cfg(tmp_path / "d.txt", seq_len=4))[0]
    b = load_dataset(data_cfg(tmp_path / "d.jsonl", seq_len=4, text_key="body"))[0]
    assert torch.equal(a.input_ids, b.input_ids) and a.labels is None
    pr = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "q", "response": "a"}])
    assert read_samples(pr, "auto", Keys())[0].kind == "prompt_response"


def test_eval_split_and_eval_file(tmp_path, tok_dir):
    chat = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    data = load_run_data(data_cfg(chat, tok_dir, eval_fraction=0.34), seed=1)
    assert (data.train.num_rows, data.eval.num_rows) == (4, 2)
    held = load_run_data(data_cfg(chat, tok_dir, eval_path=str(chat)))
    assert torch.equal(held.eval.input_ids, held.train.input_ids)


@pytest.mark.parametrize(
    "rows,kw,needle",
    [
        ([{"msgs": []}], {"format": "chat"}, "t.jsonl:1: expected a field 'messages'"),
        ([{"prompt": "x"}], {"format": "prompt_response"}, "t.jsonl:1: expected a string field 'response' (missing)"),
        (CHATS, {"tokenizer": "byte"}, "data.tokenizer: 'byte' has no chat template"),
        (CHATS, {"packing": True, "tok": True}, "data.packing: "),
        (CHATS, {"eval_path": "{other}", "tok": True}, "data.eval_path: "),
        ([{"messages": [{"role": "user", "content": "hi"}]}], {"tok": True}, "has no 'assistant' message"),
    ],
)
def test_bad_rows_name_the_file_the_field_and_the_key(tmp_path, tok_dir, rows, kw, needle):
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    (tmp_path / "other.txt").write_text("plain text\n")
    kw = {k: (v.format(other=tmp_path / "other.txt") if isinstance(v, str) else v) for k, v in kw.items()}
    tok = tok_dir if kw.pop("tok", False) else kw.pop("tokenizer", "byte")
    with pytest.raises(DataError) as e:
        load_run_data(data_cfg(path, tok, **kw))
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("data.format=xml", "data.format: 'xml' is not one of"),
        ("data.loss_on=prompt", "data.loss_on: 'prompt' is not one of response, all"),
        ("data.eval_fraction=1.5", "data.eval_fraction: must be in [0, 1)"),
        ("data.eval_path=/nowhere.jsonl", "data.eval_path: file not found"),
        ("train.lr_schedule=step", "train.lr_schedule: 'step' is not one of constant, linear, cosine"),
        ("train.eval_every=-1", "train.eval_every: must be >= 0"),
    ],
)
def test_new_keys_are_validated(tmp_path, capsys, override, needle):
    from test_cli import one_line_error, write_config

    one_line_error(capsys, main(["validate", str(write_config(tmp_path)), override, "--no-plan"]), needle)


def test_export_and_generate_refuse_bad_targets(tmp_path, capsys):
    from test_cli import one_line_error

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    one_line_error(capsys, main(["export", str(tmp_path), "--out", str(tmp_path / "out")]), "is not empty")
    one_line_error(capsys, main(["generate", str(tmp_path), "--prompt", "hi"]), "neither an exported model")


def test_lr_schedules():
    t = SimpleNamespace(lr=1.0, warmup_steps=2, steps=12, lr_schedule="cosine")
    assert [lr_at(s, t) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, t) == 1.0 and math.isclose(lr_at(7, t), 0.5) and lr_at(12, t) == 0.0
    t.lr_schedule = "linear"
    assert math.isclose(lr_at(7, t), 0.5) and lr_at(12, t) == 0.0
    t.lr_schedule = "constant"
    assert lr_at(11, t) == 1.0


def test_curves_png_and_tensorboard_event_files(tmp_path):
    from splitlearn.curves import draw_curves, make_logger, step_scalars, tensorboard_missing

    recs = [{"step": s, "loss": 3.0 - s, "tokens_per_s": 100.0, "grad_norm": 1.0} for s in range(3)]
    recs[-1].update(eval_loss=1.5, eval_perplexity=math.exp(1.5))
    write_jsonl(tmp_path / "metrics.jsonl", recs)
    assert draw_curves(tmp_path, tmp_path / "c.png") == {"steps": 3, "evals": 1, "last_loss": 1.0}
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert tensorboard_missing() is None  # a dependency of the project
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = make_logger("tensorboard", tmp_path)
    for r in recs:
        logger.log(r["step"] + 1, step_scalars(r, 1e-3))
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [3.0, 2.0, 1.0]
    assert [e.step for e in acc.Scalars("eval/loss")] == [3]


def test_generate_runs_on_a_local_model(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    from splitlearn.export import generate

    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    tok.save_pretrained(str(tmp_path))
    build_model(tok, tmp_path, layers=1)
    text = generate(tmp_path, "what is one plus two ?", max_new_tokens=4)
    assert isinstance(text, str)
    assert generate(tmp_path, "one", max_new_tokens=3, temperature=0.8, chat=False) is not None
