"""Local Hugging Face checkpoints read by segment: only the keys of one segment's layers.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Checkpoint keys are mapped to the model's tensor names
with transformers' own renaming rules (``embed_out.`` → ``lm_head.`` for GPT-NeoX, legacy
names) and its base-model prefix rule (a checkpoint of the base model: ``h.0.attn…`` for
``transformer.h.0.attn…``). A segment reads its keys one tensor at a time, in the stored
dtype or cast to the one asked for, so a worker never holds more than its segment.

``splitlearn shard`` writes one directory per stage of a plan (:func:`write_stage_dirs`): the
config and only that stage's tensors, with a ``splitlearn-stage.json`` that says which chain
layers it holds, so a device receives and stores only its segment.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitlearn.errors import ModelError
from splitlearn.fsio import atomic_write
from splitlearn.models.chain import tied_parameter_names
from splitlearn.models.materialize import (
    TiedPairs,
    get_tensor,
    init_nonpersistent,
    materialize,
    num_chain,
    retie,
    segment_tensor_names,
    set_tensor,
    untie,
)

STAGE_MARKER = "splitlearn-stage.json"  # in a per-stage directory: which chain layers it holds
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _pretrained(model: nn.Module) -> Any:
    """The model as a transformers ``PreTrainedModel`` (its class attributes, untyped here)."""
    return model


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Checkpoint key → the file that holds it."""
    from safetensors import safe_open

    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{index}: not a safetensors index (no weight_map): {e}") from e
        files = {k: path / f for k, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise ModelError(f"{index}: lists {f.name}, which is not in {path}")
        return files
    single = path / SINGLE
    if not single.is_file():
        raise ModelError(f"model.path: no {SINGLE} or {INDEX} in '{path}' (only safetensors checkpoints are read)")
    try:
        with safe_open(str(single), framework="pt", device="cpu") as f:
            return {k: single for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ModelError(f"{single}: cannot be read as safetensors ({e})") from e


def key_mapping(model: nn.Module, keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """(model tensor name → checkpoint key, the checkpoint keys that name no tensor). A
    checkpoint that needs a weight conversion (fused or split tensors) is refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(_pretrained(model))
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta_state = model.state_dict()  # both names of a tie
    prefix = _pretrained(model).base_model_prefix
    out: dict[str, str] = {}
    unused: list[str] = []
    for key in keys:
        new, conv = rename_source_key(key, renamings, converters, prefix, meta_state)
        if new not in meta_state and key in meta_state:
            new, conv = rename_source_key(key, [], [], prefix, meta_state)
        if conv is not None:
            raise ModelError(f"model.path: checkpoint key {key} needs a weight conversion, which splitlearn cannot do")
        if new in meta_state:
            if new in out:
                raise ModelError(f"model.path: checkpoint keys {out[new]} and {key} both give {new}")
            out[new] = key
        else:
            unused.append(key)
    return out, unused


def _ignorable(model: nn.Module, key: str) -> bool:
    """Keys old checkpoints carry that no current model has (causal masks, rotary tables)."""
    patterns = [
        *(_pretrained(model)._keys_to_ignore_on_load_unexpected or []),
        r"rotary_emb\.inv_freq",
        r"(^|\.)position_ids$",
    ]
    return any(re.search(p, key) for p in patterns)


def _header(file: Path) -> tuple[int, dict[str, Any]]:
    """A safetensors file's header: where its data starts, and each tensor's entry (parsed once
    per version of the file)."""
    st = file.stat()
    return _parse_header(file, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _parse_header(file: Path, mtime_ns: int, size: int) -> tuple[int, dict[str, Any]]:
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return 8 + n, json.loads(fh.read(n))


def _chunks(file: Path, key: str, row_bytes: int, rows: int) -> Iterator[bytes]:
    """The stored bytes of tensor ``key``, ``rows`` rows of ``row_bytes`` at a time, read with
    ``os.pread`` at the offsets the header gives (safetensors' own slicing read the whole
    tensor at every slice, measured at 1B)."""
    start, entries = _header(file)
    begin, end = entries[key]["data_offsets"]
    step = max(1, rows) * row_bytes
    with open(file, "rb") as fh:
        for offset in range(start + begin, start + end, step):
            yield os.pread(fh.fileno(), min(step, start + end - offset), offset)


def _stored_equal(files: dict[str, Path], k1: str, k2: str) -> bool:
    """Whether two stored tensors hold the same bytes (dtype and shape included), compared a
    chunk at a time."""
    e1, e2 = _header(files[k1])[1][k1], _header(files[k2])[1][k2]
    if (e1["dtype"], e1["shape"]) != (e2["dtype"], e2["shape"]):
        return False
    chunk = _CHUNK_BYTES
    return all(a == b for a, b in zip(_chunks(files[k1], k1, chunk, 1), _chunks(files[k2], k2, chunk, 1), strict=True))


def _ties(model: nn.Module, files: dict[str, Path], to_key: dict[str, str], path: Path) -> TiedPairs:
    """The ties that hold for this checkpoint, as transformers decides them: the embed-side
    key gives the tensor, else the head-side one; both stored and different: not tied. A
    per-stage directory says which ties held in the checkpoint it was cut from."""
    marker = path / STAGE_MARKER
    held = json.loads(marker.read_text()).get("tied") if marker.is_file() else None
    pairs = []
    for e, h in tied_parameter_names(model):
        if held is not None and [e, h] not in held:
            continue
        e_in, h_in = e in to_key, h in to_key
        if e_in and h_in and not _stored_equal(files, to_key[e], to_key[h]):
            continue
        if h_in and not e_in:
            to_key[e] = to_key[h]
        pairs.append((e, h))
    return pairs


def _check_stage_dir(path: Path, start: int, stop: int) -> None:
    marker = path / STAGE_MARKER
    if not marker.is_file():
        return
    held = json.loads(marker.read_text())
    if not (held["start"] <= start and stop <= held["stop"]):
        raise ModelError(
            f"{marker}: this directory holds chain layers [{held['start']}, {held['stop']}) (stage "
            f"{held['stage']} of the plan it was sharded for), but this stage runs [{start}, {stop}); "
            "point model.path at the directory sharded for this stage, or shard again with this plan"
        )


_CHUNK_BYTES = 16 << 20  # a tensor cast while read is read in row chunks of about this size


def _read(f: Any, file: Path, key: str, name: str, like: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Tensor ``key`` of an open safetensors file, checked against the model's ``like`` and in
    ``dtype`` (None: as stored). A tensor to cast is read in row chunks into its final storage,
    so a stored copy of the whole tensor never sits beside the cast one."""
    sl = f.get_slice(key)
    shape, want = tuple(sl.get_shape()), tuple(like.shape)
    if shape != want:
        raise ModelError(f"{file}: {key} has shape {shape}, the model's {name} has {want}")
    stored = _SAFETENSORS_DTYPES.get(sl.get_dtype())
    if like.is_floating_point() and stored is None:
        raise ModelError(
            f"{file}: {key} is stored as {sl.get_dtype()}, which the model's {name} cannot be trained from "
            f"(it takes {', '.join(_SAFETENSORS_DTYPES)}); a quantized checkpoint must be dequantized first "
            "(save it with transformers in bf16 or fp32)"
        )
    if dtype is None or stored is None or not stored.is_floating_point or stored == dtype or not shape:
        t = f.get_tensor(key)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t
    out = torch.empty(shape, dtype=dtype)
    _read_rows_into(file, key, stored, out)
    return out


def _read_rows_into(file: Path, key: str, stored: torch.dtype, out: torch.Tensor) -> None:
    """Fill ``out`` with tensor ``key`` of a safetensors file, cast from ``stored``, about
    :data:`_CHUNK_BYTES` of rows at a time."""
    row_bytes = max(1, out[0].numel() * stored.itemsize)
    rows = max(1, _CHUNK_BYTES // row_bytes)
    i = 0
    for raw in _chunks(file, key, row_bytes, rows):
        k = len(raw) // row_bytes
        out[i : i + k] = torch.frombuffer(bytearray(raw), dtype=stored).view(k, *out.shape[1:])
        i += k
    assert i == out.shape[0], f"{file}: {key}: {i} rows read, {out.shape[0]} expected"


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def load_segment(
    model: nn.Module,
    path: Path,
    start: int,
    stop: int,
    dtype: torch.dtype | None,
    device: str | torch.device = "cpu",
) -> None:
    """Read segment ``[start, stop)`` of the meta ``model`` from the checkpoint at ``path``, in
    place: only its keys, in their stored dtype (``dtype=None``) or cast one by one, each moved
    to ``device`` as soon as it is read (a GPU stage never holds its segment in host memory). Its
    non-persistent buffers are computed. A key the segment needs that no file holds, or a
    shape that differs, is a :class:`ModelError` naming the file and key."""
    from safetensors import safe_open

    _check_stage_dir(path, start, stop)
    files = checkpoint_files(path)
    to_key, unused = key_mapping(model, list(files))
    strange = [k for k in unused if not _ignorable(model, k)]
    if strange:
        import logging

        logging.getLogger(__name__).warning(
            "%s: %d checkpoint key(s) name no tensor of the model, e.g. %s", path, len(strange), strange[0]
        )
    pairs = _ties(model, files, to_key, path)
    untie(model, tied_parameter_names(model))
    names = segment_tensor_names(model, start, stop, pairs)
    persistent = set(model.state_dict())
    missing = [k for k in names if k in persistent and k not in to_key]
    if missing:
        where = path / (INDEX if (path / INDEX).is_file() else SINGLE)
        raise ModelError(
            f"{where}: no tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f", which chain layers [{start}, {stop}) need"
        )
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in names:
        if name in persistent:
            by_file[files[to_key[name]]].append(name)
    for file, items in by_file.items():
        # pread: each tensor is read into memory of its own (a memory map would keep the stored
        # copy resident beside the cast one while the file is open)
        with safe_open(str(file), framework="pt", device="cpu", backend="pread") as f:
            for name in items:
                t = _read(f, file, to_key[name], name, get_tensor(model, name), dtype)
                set_tensor(model, name, t.to(device))
    rest = [k for k in names if k not in persistent]
    materialize(model, rest, device)
    init_nonpersistent(model, rest)
    retie(model, pairs)


def write_stage_dirs(model: nn.Module, path: Path, ranges: list[tuple[int, int]], out: Path) -> list[dict[str, Any]]:
    """One directory per stage under ``out`` (``stage_<i>``): the source's config files, its
    keys for the stage's chain layers (as stored: names and dtype unchanged) and a
    :data:`STAGE_MARKER`. ``model``: the source's model on the meta device. Returns, per
    stage, its directory, its keys' count and bytes."""
    from safetensors import safe_open

    files = checkpoint_files(path)
    to_key, _ = key_mapping(model, list(files))
    pairs = _ties(model, files, to_key, path)
    n = num_chain(model)
    if ranges[0][0] != 0 or ranges[-1][1] != n:
        raise ModelError(f"the plan's stages cover [{ranges[0][0]}, {ranges[-1][1]}) of a chain of {n} layers")
    rows = []
    for stage, (start, stop) in enumerate(ranges):
        names = [k for k in segment_tensor_names(model, start, stop, pairs) if k in to_key]
        keys = sorted({to_key[k] for k in names})
        tensors: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = defaultdict(list)
        for k in keys:
            by_file[files[k]].append(k)
        for file, items in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                tensors.update({k: f.get_tensor(k) for k in items})
        d = out / f"stage_{stage}"
        d.mkdir(parents=True, exist_ok=True)
        for extra in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            if (path / extra).is_file():
                atomic_write(d / extra, functools.partial(shutil.copyfile, path / extra))
        atomic_write(d / SINGLE, functools.partial(_save_tensors, tensors))
        marker = {
            "stage": stage,
            "start": start,
            "stop": stop,
            "num_chain": n,
            "tied": [list(p) for p in pairs],
            "source": str(path.resolve()),
        }
        atomic_write(d / STAGE_MARKER, json.dumps(marker, indent=2))
        rows.append(
            {"stage": stage, "dir": str(d), "keys": len(keys), "bytes": sum(t.nbytes for t in tensors.values())}
        )
        del tensors
    return rows
