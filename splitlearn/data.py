"""Local training data: text or JSONL files, tokenized offline, served as deterministic batches.

Nothing is downloaded. The tokenizer is either the built-in byte-level one (256 byte ids
plus end-of-text and padding) or a local ``tokenizer.json`` read with the ``tokenizers``
library. Batches are a pure function of (seed, step), so any worker can regenerate the
batch of any step and a resumed run sees the same data as an uninterrupted one.

Only the stage on the data-owning device reads these files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splitlearn.errors import DataError
from splitlearn.fsio import atomic_write
from splitlearn.models.chain import IGNORE_INDEX


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; 256 ends a document, 257 pads."""

    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class FileTokenizer:
    """A local ``tokenizer.json`` (Hugging Face ``tokenizers`` format)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise DataError(f"data.tokenizer: cannot read '{path}': {str(e).splitlines()[0]}") from e
        self.vocab_size = self.tok.get_vocab_size()
        self.eos_id = self._first_token(("</s>", "<|endoftext|>", "<eos>", "[SEP]"), 0)
        self.pad_id = self._first_token(("<pad>", "[PAD]"), self.eos_id)

    def _first_token(self, names: tuple[str, ...], default: int) -> int:
        for n in names:
            i = self.tok.token_to_id(n)
            if i is not None:
                return i
        return default

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def make_tokenizer(spec: str, resolve=lambda p: Path(p)) -> ByteTokenizer | FileTokenizer:
    if spec == "byte":
        return ByteTokenizer()
    path = resolve(spec)
    if not Path(path).is_file():
        raise DataError(f"data.tokenizer: file not found: {spec}")
    return FileTokenizer(Path(path))


def read_documents(path: Path, fmt: str = "auto", text_key: str = "text") -> list[str]:
    """Documents of a .txt file (blocks separated by blank lines) or a .jsonl file."""
    if not path.is_file():
        raise DataError(f"data.path: file not found: {path}")
    if fmt == "auto":
        fmt = "jsonl" if path.suffix in (".jsonl", ".json", ".ndjson") else "text"
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data.path: {path} is not UTF-8 text (byte {e.start})") from e
    if fmt == "text":
        docs = [block.strip() for block in content.split("\n\n")]
    else:
        docs = []
        for lineno, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one object per line") from e
            if not isinstance(rec, dict) or not isinstance(rec.get(text_key), str):
                raise DataError(
                    f"{path}:{lineno}: expected an object with a string field '{text_key}' (set data.text_key)"
                )
            docs.append(rec[text_key])
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"data.path: {path} holds no text")
    return docs


@dataclass
class TokenDataset:
    """Rows of ``seq_len`` token ids, with a padding mask when rows are not packed."""

    input_ids: torch.Tensor  # (rows, seq_len) int64
    attention_mask: torch.Tensor | None  # (rows, seq_len) int64, None when packed

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]


def tokenize(docs: list[str], tokenizer, seq_len: int, packing: bool, source: str = "data") -> TokenDataset:
    if packing:
        stream: list[int] = []
        for d in docs:
            stream.extend(tokenizer.encode(d))
            stream.append(tokenizer.eos_id)
        rows = len(stream) // seq_len
        if rows < 1:
            raise DataError(
                f"{source}: {len(stream)} tokens, fewer than data.seq_len={seq_len}; add text or lower data.seq_len"
            )
        ids = torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)
        return TokenDataset(ids, None)
    ids = torch.full((len(docs), seq_len), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), seq_len), dtype=torch.long)
    for i, d in enumerate(docs):
        toks = (tokenizer.encode(d) + [tokenizer.eos_id])[:seq_len]
        ids[i, : len(toks)] = torch.tensor(toks)
        mask[i, : len(toks)] = 1
    return TokenDataset(ids, mask)


class BatchSource:
    """Batch ``step`` of a run: rows drawn without replacement within each epoch, an epoch
    being a seeded permutation of all rows. A pure function of (seed, step)."""

    def __init__(self, dataset: TokenDataset, batch_size: int, seed: int):
        self.ds, self.batch_size, self.seed = dataset, batch_size, seed
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(self.ds.num_rows, generator=g)}
        return self._perm_cache[epoch]

    def rows(self, step: int) -> list[int]:
        n = self.ds.num_rows
        out = []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._perm(k // n)[k % n]))
        return out

    def batch(self, step: int) -> dict[str, Any]:
        idx = torch.tensor(self.rows(step))
        ids = self.ds.input_ids[idx]
        mask = None if self.ds.attention_mask is None else self.ds.attention_mask[idx]
        labels = ids.clone()
        if mask is not None:
            labels[mask == 0] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def load_dataset(data_cfg: Any, resolve=lambda p: Path(p)) -> tuple[TokenDataset, Any]:
    """Read, tokenize and return the dataset and its tokenizer for a ``DataConfig``."""
    tokenizer = make_tokenizer(data_cfg.tokenizer, resolve)
    path = Path(resolve(data_cfg.path))
    docs = read_documents(path, data_cfg.format, data_cfg.text_key)
    return tokenize(docs, tokenizer, data_cfg.seq_len, data_cfg.packing, str(path)), tokenizer


# -- the quickstart corpus ---------------------------------------------------------------

_NAMES = ["ada", "bo", "cy", "dee", "eli", "fay", "gus", "ivy", "jon", "kai", "lea", "max"]
_COLORS = ["red", "blue", "green", "black", "white", "gold"]
_THINGS = ["cats", "boxes", "apples", "kites", "books", "coins", "shells", "cups"]
_PLACES = ["the park", "the shop", "the lake", "the hill", "the farm", "the port"]
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def synth_corpus(num_docs: int = 600, seed: int = 0) -> str:
    """A small English-like corpus with regular structure, so a tiny model learns it visibly:
    short stories of who has how many of what, where they went, and simple sums."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        who = rng.choice(_NAMES)
        a, b = rng.randrange(1, 5), rng.randrange(1, 5)
        color, thing = rng.choice(_COLORS), rng.choice(_THINGS)
        lines = [
            f"{who} has {_NUMBERS[a - 1]} {color} {thing}.",
            f"{who} goes to {rng.choice(_PLACES)} and finds {_NUMBERS[b - 1]} more.",
            f"now {who} has {_NUMBERS[a + b - 1]} {color} {thing}.",
        ]
        docs.append(" ".join(lines))
    return "\n\n".join(docs) + "\n"


def write_synth_corpus(path: str | Path, num_docs: int = 600, seed: int = 0) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(p, synth_corpus(num_docs, seed))
