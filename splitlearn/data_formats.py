"""Local data files of every common format, read into samples of one of three kinds.

A file's *container* is how its rows are stored: ``text`` (documents separated by blank
lines), ``jsonl`` (one JSON object per line), ``parquet`` or ``hf_disk`` (a folder written by
``datasets.Dataset.save_to_disk``); the last two are read with the ``datasets`` library. A
row's *kind* is what it holds: ``text`` (a document, every token carries loss), ``chat`` (a
list of ``{"role", "content"}`` messages, rendered by the tokenizer's own chat template) or
``prompt_response`` (loss on the response only). ``data.format`` names either: ``chat`` and
``prompt_response`` are JSONL of that kind; ``auto``, ``parquet`` and ``hf_disk`` take the
kind from the first row's fields.

Every bad row is a :class:`~splitlearn.errors.DataError` naming the file (and line or row),
the field, and the key that changes what is expected.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitlearn.errors import DataError

DATA_FORMATS = ("auto", "text", "jsonl", "chat", "prompt_response", "parquet", "hf_disk")
KINDS = ("text", "chat", "prompt_response")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass(frozen=True)
class Sample:
    """One training example: ``text``, or ``messages``, or ``prompt`` and ``response``."""

    kind: str
    text: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)
    prompt: str = ""
    response: str = ""


@dataclass(frozen=True)
class Keys:
    """The field names a row is read with (``data.text_key``, ``data.messages_key``, ...)."""

    text: str = "text"
    messages: str = "messages"
    prompt: str = "prompt"
    response: str = "response"

    @classmethod
    def from_config(cls, d: Any) -> Keys:
        keys = ("text_key", "messages_key", "prompt_key", "response_key")
        return cls(*(getattr(d, k, getattr(cls, k.removesuffix("_key"))) for k in keys))


def container_of(path: Path, fmt: str) -> str:
    """How the rows of ``path`` are stored, for ``data.format`` ``fmt``."""
    if fmt in ("chat", "prompt_response", "jsonl"):
        return "jsonl"
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf_disk"
    if path.suffix == ".parquet":
        return "parquet"
    return "jsonl" if path.suffix in JSONL_SUFFIXES else "text"


def _text_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte {e.start}); for a parquet file or a datasets folder set "
            "data.format=parquet or hf_disk"
        ) from e
    for i, block in enumerate(content.split("\n\n")):
        if block.strip():
            yield f"{path} (document {i + 1})", {"text": block.strip()}


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one object per line") from e
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                yield f"{path}:{lineno}", rec
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 JSONL (byte {e.start}); for a parquet file set data.format=parquet"
        ) from e


def _datasets_module(fmt: str) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"data.format={fmt} is read with the 'datasets' library, which is not installed: "
            "pip install datasets (or convert the file to JSONL)"
        ) from e
    return datasets


def _arrow_rows(path: Path, container: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a parquet file (streamed: files larger than memory are fine) or a
    ``save_to_disk`` folder (memory-mapped by ``datasets``)."""
    datasets = _datasets_module(container)
    try:
        if container == "parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        else:
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{path}: a DatasetDict without a 'train' split ({', '.join(ds)}); point at one")
                ds = ds["train"]
    except DataError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data.path: {path} cannot be read as {container}: {first}") from e
    for i, rec in enumerate(ds):
        yield f"{path} (row {i})", dict(rec)


def read_rows(path: Path, fmt: str, key: str = "data.path") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each row of ``path``: ``where`` names the file and line or row."""
    container = container_of(path, fmt)
    if container == "hf_disk" and not path.is_dir():
        raise DataError(f"{key}: {path} is not a folder; data.format=hf_disk reads a datasets save_to_disk folder")
    if container != "hf_disk" and path.is_dir():
        raise DataError(f"{key}: {path} is a folder; set data.format=hf_disk for a datasets save_to_disk folder")
    if container != "hf_disk" and not path.is_file():
        raise DataError(f"{key}: file not found: {path}")
    if container == "text":
        return _text_rows(path)
    if container == "jsonl":
        return _jsonl_rows(path)
    return _arrow_rows(path, container)


def kind_of(fmt: str, row: dict[str, Any], keys: Keys) -> str:
    """The kind of every row of a file whose first row is ``row``."""
    if fmt in KINDS:
        return fmt
    if fmt == "jsonl":
        return "text"
    if keys.messages in row:
        return "chat"
    if keys.prompt in row and keys.response in row:
        return "prompt_response"
    return "text"


_HOW = {
    "text": "set data.text_key to the field that holds the text",
    "chat": "set data.messages_key, or data.format to the file's kind",
    "prompt_response": "set data.prompt_key / data.response_key, or data.format to the file's kind",
}


def _string_field(row: dict[str, Any], key: str, where: str, kind: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        got = "missing" if key not in row else f"a {type(value).__name__}"
        raise DataError(f"{where}: expected a string field '{key}' ({got}); {_HOW[kind]}")
    return value


def _messages(row: dict[str, Any], keys: Keys, where: str) -> tuple[tuple[str, str], ...]:
    msgs = row.get(keys.messages)
    if not isinstance(msgs, list) or not msgs:
        got = "missing" if keys.messages not in row else "not a non-empty list"
        raise DataError(
            f"{where}: expected a field '{keys.messages}' with a list of {{role, content}} messages ({got}); "
            f"{_HOW['chat']}"
        )
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {keys.messages}[{j}] is not an object with string 'role' and 'content'")
        out.append((m["role"], m["content"]))
    if not any(role == "assistant" for role, _ in out):
        raise DataError(f"{where}: {keys.messages} has no 'assistant' message, so nothing to learn")
    return tuple(out)


def to_sample(row: dict[str, Any], kind: str, keys: Keys, where: str) -> Sample:
    if kind == "chat":
        return Sample("chat", messages=_messages(row, keys, where))
    if kind == "prompt_response":
        prompt = _string_field(row, keys.prompt, where, kind)
        return Sample(kind, prompt=prompt, response=_string_field(row, keys.response, where, kind))
    return Sample("text", text=_string_field(row, keys.text, where, kind))


def read_samples(
    path: Path, fmt: str, keys: Keys, want_kind: str | None = None, key: str = "data.path"
) -> list[Sample]:
    """The samples of ``path``, all of one kind (``want_kind`` when given: an eval file must
    hold what the training file holds)."""
    samples: list[Sample] = []
    kind = None
    for where, row in read_rows(path, fmt, key):
        if kind is None:
            kind = kind_of(fmt, row, keys)
            if want_kind is not None and kind != want_kind:
                raise DataError(
                    f"{key}: {path} holds {kind} rows, the training data {want_kind} rows; give an eval file of "
                    "the same kind (data.eval_path), or use data.eval_fraction"
                )
        sample = to_sample(row, kind, keys, where)
        if sample.kind != "text" or sample.text.strip():
            samples.append(sample)
    if not samples:
        raise DataError(f"{key}: {path} holds no text")
    return samples
