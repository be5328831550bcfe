"""Checkpoints on the driver's side: layout, manifest, validation, retention.

Layout of a run directory::

    checkpoints/
      step_00000040/              after 40 completed steps
        stage_0.safetensors       stage 0's tensors under the model's own parameter names
        stage_0.optim.safetensors its optimizer state by parameter name, and its RNG state
        ...
        manifest.json             written last (fsio.atomic_write): whole or absent

A checkpoint counts only when its manifest exists and every file it lists has the size
and SHA-256 the manifest records. Tensors are stored by parameter name, not by stage, so a
checkpoint can be loaded into a different plan (after a re-plan). Everything is read with
safetensors: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitlearn.errors import UserError
from splitlearn.fsio import atomic_write

log = logging.getLogger("splitlearn")

FORMAT = "splitlearn-checkpoint/2"
MANIFEST = "manifest.json"


class CheckpointError(UserError):
    """A checkpoint cannot be used; the message names the file."""


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Checkpoint:
    path: Path
    step: int  # completed steps: training resumes at this step index
    manifest: dict[str, Any]

    @property
    def files(self) -> list[str]:
        return [f["name"] for shard in self.manifest["shards"] for f in shard["files"]]


def write_manifest(directory: Path, step: int, shards: list[dict[str, Any]], extra: dict[str, Any]) -> Checkpoint:
    manifest = {"format": FORMAT, "step": step, "shards": shards, **extra}
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2))
    return Checkpoint(directory, step, manifest)


def validate(directory: Path) -> Checkpoint:
    """The checkpoint in ``directory`` if it is whole, else a CheckpointError naming the file."""
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: missing (the checkpoint was not finished)")
    try:
        manifest = json.loads(mpath.read_text())
        step = int(manifest["step"])
        shards = manifest["shards"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: not a checkpoint manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for shard in shards:
        for f in shard["files"]:
            p = directory / f["name"]
            if not p.is_file():
                raise CheckpointError(f"{p}: listed in the manifest but missing")
            size = p.stat().st_size
            if size != f["bytes"]:
                raise CheckpointError(f"{p}: {size} bytes, the manifest says {f['bytes']} (truncated or rewritten)")
            if sha256(p) != f["sha256"]:
                raise CheckpointError(f"{p}: content does not match the manifest's SHA-256")
    return Checkpoint(directory, step, manifest)


def candidates(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, newest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True)


def latest(run_dir: Path, skip: set[Path] | None = None, on_skip=None) -> Checkpoint | None:
    """The newest whole checkpoint; broken ones are reported (naming the file: logged, and
    passed to ``on_skip(directory, error)``) and skipped."""
    for d in candidates(run_dir):
        if skip and d in skip:
            continue
        try:
            return validate(d)
        except CheckpointError as e:
            log.warning("checkpoint skipped: %s; falling back to the previous one", e)
            if on_skip is not None:
                on_skip(d, e)
    return None


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` whole checkpoints; drop older ones and unfinished leftovers
    older than the newest whole one."""
    whole = []
    for d in candidates(run_dir):
        if (d / MANIFEST).is_file():  # cheap: the full check runs when a checkpoint is loaded
            whole.append(d)
        elif whole:  # an unfinished directory older than a whole checkpoint is garbage
            shutil.rmtree(d, ignore_errors=True)
    for d in whole[keep:]:
        shutil.rmtree(d, ignore_errors=True)
