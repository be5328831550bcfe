"""Tier 1: local data files, tokenizers and deterministic batches."""

import json

import pytest
import torch
from conftest import ROOT

from splitlearn.data import (
    BatchSource,
    ByteTokenizer,
    FileTokenizer,
    load_dataset,
    read_documents,
    synth_corpus,
    tokenize,
)
from splitlearn.errors import DataError


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo")) == "héllo"
    assert max(tok.encode("ÿ")) < 256 and tok.vocab_size == 258


def test_text_and_jsonl_documents(tmp_path):
    (tmp_path / "a.txt").write_text("one doc\nsecond line\n\n\nnext doc\n")
    assert read_documents(tmp_path / "a.txt") == ["one doc\nsecond line", "next doc"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": "y"}) + "\n")
    assert read_documents(tmp_path / "b.jsonl") == ["x", "y"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert read_documents(tmp_path / "c.jsonl", text_key="body") == ["x"]


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "bad.jsonl:2: not valid JSON"),
        (
            "nokey.jsonl",
            '{"body": "x"}\n',
            "nokey.jsonl:1: expected a string field 'text' (missing); set data.text_key",
        ),
        ("empty.txt", "\n\n", "holds no text"),
    ],
)
def test_malformed_data_is_named(tmp_path, name, content, needle):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        read_documents(tmp_path / name)


def test_binary_and_missing_files(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not UTF-8"):
        read_documents(tmp_path / "bin.txt")
    with pytest.raises(DataError, match="file not found"):
        read_documents(tmp_path / "gone.txt")


def test_packing_and_padding():
    tok = ByteTokenizer()
    packed = tokenize(["abc", "de"], tok, seq_len=3, packing=True)
    assert packed.attention_mask is None
    assert packed.input_ids.tolist() == [[97, 98, 99], [256, 100, 101]]
    padded = tokenize(["abc", "de"], tok, seq_len=5, packing=False)
    assert padded.input_ids[1].tolist() == [100, 101, 256, 257, 257]
    assert padded.attention_mask[1].tolist() == [1, 1, 1, 0, 0]
    with pytest.raises(DataError, match="fewer than data.seq_len"):
        tokenize(["ab"], tok, seq_len=64, packing=True)


def test_batches_are_a_pure_function_of_seed_and_step():
    ds = tokenize(synth_corpus(40).strip().split("\n\n"), ByteTokenizer(), seq_len=16, packing=False)
    assert ds.num_rows == 40
    a, b = BatchSource(ds, 4, seed=1), BatchSource(ds, 4, seed=1)
    assert torch.equal(a.batch(7)["input_ids"], b.batch(7)["input_ids"])
    assert not torch.equal(a.batch(0)["input_ids"], BatchSource(ds, 4, seed=2).batch(0)["input_ids"])
    rows = [r for s in range(10) for r in a.rows(s)]  # 40 rows = one epoch exactly
    assert sorted(rows) == list(range(40))
    lab = a.batch(3)
    assert (lab["labels"][lab["attention_mask"] == 0] == -100).all()


def test_local_tokenizer_json(tmp_path):
    """A tokenizer.json made offline with the tokenizers library loads as data.tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [synth_corpus(50)], trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>", "<pad>"])
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    ft = FileTokenizer(tmp_path / "tokenizer.json")
    assert ft.eos_id == tok.token_to_id("</s>") and ft.pad_id == tok.token_to_id("<pad>")
    assert ft.vocab_size <= 120 and ft.encode("ada has two red cats")

    class Cfg:
        path = str(ROOT / "data" / "quickstart.txt")
        format = "auto"
        text_key = "text"
        tokenizer = str(tmp_path / "tokenizer.json")
        seq_len = 8
        packing = True

    ds, t = load_dataset(Cfg)
    assert ds.num_rows > 10 and int(ds.input_ids.max()) < t.vocab_size


def test_shipped_quickstart_corpus_is_the_generated_one():
    assert (ROOT / "data" / "quickstart.txt").read_text() == synth_corpus()
