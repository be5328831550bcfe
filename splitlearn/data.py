"""Local training data, tokenized offline, served as deterministic batches.

Files are read by :mod:`splitlearn.data_formats` (text, JSONL, chat, prompt/response,
parquet, ``save_to_disk`` folders). Nothing is downloaded. The tokenizer is the built-in
byte-level one (256 byte ids plus end-of-text and padding), a local ``tokenizer.json`` read
with the ``tokenizers`` library, or a local tokenizer folder read with ``transformers`` (its
chat template renders chat rows). Chat and prompt/response rows carry loss only on the
response's tokens unless ``data.loss_on=all``. Batches are a pure function of (seed, step), so any worker can regenerate the
batch of any step and a resumed run sees the same data as an uninterrupted one.

Only the stage on the data-owning device reads these files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splitlearn.data_formats import JSONL_SUFFIXES, Keys, Sample, read_samples
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


class HFTokenizer:
    """A local tokenizer directory (``tokenizer.json``, ``tokenizer_config.json``, and for
    chat data its ``chat_template``), loaded with ``transformers.AutoTokenizer``."""

    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"data.tokenizer: cannot load a tokenizer from the folder '{path}': {first}") from e
        self.path = path
        self.vocab_size = len(self.tok)
        eos = self.tok.eos_token_id
        if eos is None:
            raise DataError(f"data.tokenizer: '{path}' has no eos_token; set one in its tokenizer_config.json")
        self.eos_id = int(eos)
        self.pad_id = int(self.tok.pad_token_id) if self.tok.pad_token_id is not None else self.eos_id
        self.chat_template = getattr(self.tok, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids))

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        return str(self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))

    def encode_chat(
        self, messages: tuple[tuple[str, str], ...], loss_on: str, where: str
    ) -> tuple[list[int], list[int]]:
        """Token ids of the conversation rendered by the chat template, and its labels: the
        tokens of each assistant turn (through its end-of-turn marker) with ``loss_on=response``,
        every token with ``all``. An assistant turn's characters are those the template adds
        between the conversation so far with its generation prompt and the conversation
        through that turn."""
        msgs = [{"role": r, "content": c} for r, c in messages]
        text = self._render(msgs)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if loss_on == "all":
            return ids, list(ids)
        spans = []
        for i, (role, _) in enumerate(messages):
            if role != "assistant":
                continue
            before, through = self._render(msgs[:i], generation_prompt=True), self._render(msgs[: i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError(
                    f"{where}: the chat template of data.tokenizer does not render a conversation prefix by prefix, "
                    "so the assistant's tokens cannot be told apart; set data.loss_on=all"
                )
            spans.append((len(before), len(through)))
        labels = [
            t if any(a <= start < b for a, b in spans) else IGNORE_INDEX
            for t, (start, _) in zip(ids, enc["offset_mapping"], strict=True)
        ]
        return ids, labels


AnyTokenizer = ByteTokenizer | FileTokenizer | HFTokenizer


def make_tokenizer(spec: str, resolve=lambda p: Path(p)) -> AnyTokenizer:
    """``byte``, a ``tokenizer.json`` file, or a tokenizer directory."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(resolve(spec))
    if path.is_dir():
        return HFTokenizer(path)
    if not path.is_file():
        raise DataError(f"data.tokenizer: file not found: {spec}")
    return FileTokenizer(path)


def read_documents(path: Path, fmt: str = "auto", text_key: str = "text") -> list[str]:
    """Documents of a file of ``text`` rows (blocks of a .txt file, a field of .jsonl rows, ...)."""
    samples = read_samples(path, "jsonl" if fmt == "auto" and path.suffix in JSONL_SUFFIXES else fmt, Keys(text_key))
    return [s.text for s in samples]


@dataclass
class TokenDataset:
    """Rows of ``seq_len`` token ids, with a padding mask when rows are not packed, and
    labels when not every real token carries loss (prompt and padding: ``IGNORE_INDEX``)."""

    input_ids: torch.Tensor  # (rows, seq_len) int64
    attention_mask: torch.Tensor | None  # (rows, seq_len) int64, None when packed
    labels: torch.Tensor | None = None  # (rows, seq_len) int64; None: the ids where the mask is 1

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> dict[str, Any]:
        """Rows ``start:stop`` as a batch (input ids, mask, labels)."""
        return _as_batch(self, torch.arange(start, min(stop, self.num_rows)))


def _as_batch(ds: TokenDataset, idx: torch.Tensor) -> dict[str, Any]:
    ids = ds.input_ids[idx]
    mask = None if ds.attention_mask is None else ds.attention_mask[idx]
    if ds.labels is not None:
        labels = ds.labels[idx]
    else:
        labels = ids.clone()
        if mask is not None:
            labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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


def encode_sample(sample: Sample, tokenizer: AnyTokenizer, loss_on: str, where: str) -> tuple[list[int], list[int]]:
    """Token ids of a chat or prompt/response sample and its labels (``IGNORE_INDEX`` on
    tokens without loss: the prompt and the user's turns, unless ``loss_on`` is ``all``)."""
    if sample.kind == "chat":
        if not isinstance(tokenizer, HFTokenizer) or not tokenizer.chat_template:
            raise DataError(
                f"data.tokenizer: '{getattr(tokenizer, 'path', 'byte')}' has no chat template, which chat rows "
                f"({where}) need; point data.tokenizer at a tokenizer folder whose tokenizer_config.json has one"
            )
        return tokenizer.encode_chat(sample.messages, loss_on, where)
    prompt = tokenizer.encode(sample.prompt)
    response = tokenizer.encode(sample.response) + [tokenizer.eos_id]
    ids = prompt + response
    return ids, (list(ids) if loss_on == "all" else [IGNORE_INDEX] * len(prompt) + response)


def tokenize_samples(samples: list[Sample], tokenizer: AnyTokenizer, data_cfg: Any, source: str) -> TokenDataset:
    """Rows of ``samples``: text packed or padded as ``data.packing`` says; chat and
    prompt/response samples one per padded row (truncated to ``data.seq_len``), so that no
    sample attends to another."""
    seq_len = data_cfg.seq_len
    if samples[0].kind == "text":
        packing = True if data_cfg.packing is None else bool(data_cfg.packing)
        return tokenize([s.text for s in samples], tokenizer, seq_len, packing, source)
    if data_cfg.packing:
        raise DataError(
            f"data.packing: {source} holds {samples[0].kind} rows, which are never packed (a packed row would let "
            "one sample attend to another); set data.packing=false or leave it unset"
        )
    ids = torch.full((len(samples), seq_len), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), seq_len), dtype=torch.long)
    labels = torch.full((len(samples), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        toks, labs = encode_sample(s, tokenizer, getattr(data_cfg, "loss_on", "response"), f"{source} (sample {i})")
        n = min(len(toks), seq_len)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(toks[:n]), torch.tensor(labs[:n]), 1
    return TokenDataset(ids, mask, labels)


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
        return _as_batch(self.ds, torch.tensor(self.rows(step)))


@dataclass
class RunData:
    """What the data owner reads: the training rows, the eval rows (if any), the tokenizer."""

    train: TokenDataset
    eval: TokenDataset | None
    tokenizer: AnyTokenizer
    kind: str


def split_eval(samples: list[Sample], fraction: float, seed: int, source: str) -> tuple[list[Sample], list[Sample]]:
    """A seeded ``fraction`` of the samples held out for eval, the rest for training."""
    n_eval = max(1, round(len(samples) * fraction))
    if n_eval >= len(samples):
        raise DataError(
            f"data.eval_fraction={fraction} of {source}'s {len(samples)} samples leaves none to train on; lower it"
        )
    perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_eval])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


def load_run_data(data_cfg: Any, resolve=lambda p: Path(p), seed: int = 0) -> RunData:
    """Read and tokenize a ``DataConfig``'s training file and its eval file or fraction."""
    tokenizer = make_tokenizer(data_cfg.tokenizer, resolve)
    keys = Keys.from_config(data_cfg)
    path = Path(resolve(data_cfg.path))
    samples = read_samples(path, data_cfg.format, keys)
    kind = samples[0].kind
    eval_samples: list[Sample] = []
    eval_source = str(path)
    if data_cfg.eval_path:
        eval_path = Path(resolve(data_cfg.eval_path))
        eval_samples = read_samples(eval_path, data_cfg.format, keys, want_kind=kind, key="data.eval_path")
        eval_source = str(eval_path)
    elif data_cfg.eval_fraction > 0:
        samples, eval_samples = split_eval(samples, data_cfg.eval_fraction, seed, str(path))
    train = tokenize_samples(samples, tokenizer, data_cfg, str(path))
    evals = tokenize_samples(eval_samples, tokenizer, data_cfg, eval_source) if eval_samples else None
    return RunData(train, evals, tokenizer, kind)


def load_dataset(data_cfg: Any, resolve=lambda p: Path(p)) -> tuple[TokenDataset, Any]:
    """The training rows and the tokenizer of a ``DataConfig`` (no eval split)."""
    tokenizer = make_tokenizer(data_cfg.tokenizer, resolve)
    path = Path(resolve(data_cfg.path))
    samples = read_samples(path, data_cfg.format, Keys.from_config(data_cfg))
    return tokenize_samples(samples, tokenizer, data_cfg, str(path)), tokenizer


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
