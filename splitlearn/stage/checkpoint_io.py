"""A stage's checkpoint files: its tensors and optimizer state by parameter name, and its export.

Each stage writes ``stage_<i>.safetensors`` (the model's own names; LoRA adapters under
peft's names) and ``stage_<i>.optim.safetensors`` (``optim/<name>/<key>`` and the RNG
state). Loading goes by name, so a checkpoint written by any plan loads into any other.
A split-federated run's clients (the replicas of stage 0) hold one front (every checkpoint
is at a round's end, where the fronts are averaged) but, under local steps, each its own
optimizer state: each client also writes ``stage_0.client-<device>.optim.safetensors``, and loads it when the
checkpoint has it (a client that was absent when it was written, rejoining, takes the first
client's, ``stage_0.optim.safetensors``). Under sequential split learning the client that
holds the newest front writes the stage, and every client loads it. Every read checks names and shapes first (:meth:`StageCheckpoint.check`), so the driver can
ask every stage before any loads: a checkpoint is taken whole or not at all.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from splitlearn.checkpoint import CheckpointError, sha256
from splitlearn.fsio import atomic_write
from splitlearn.models.methods import (
    adapter_state_dict,
    checkpoint_params,
    checkpoint_tensors,
    merged_state_dict,
)

if TYPE_CHECKING:
    from splitlearn.stage.worker import StageWorker


class Shards:
    """A checkpoint's tensors by key, each file opened once (closed with ``stack``)."""

    def __init__(self, found: dict[str, tuple[Path, str]], stack: ExitStack):
        from safetensors import safe_open

        self._open = lambda path: stack.enter_context(safe_open(str(path), framework="pt"))
        self.found: dict[str, tuple[Path, str]] = found
        self.handles: dict[Path, Any] = {}

    def _file(self, key: str) -> tuple[Any, str]:
        path, k = self.found[key]
        if path not in self.handles:
            self.handles[path] = self._open(path)
        return self.handles[path], k

    def shape(self, key: str) -> tuple[int, ...]:
        f, k = self._file(key)
        return tuple(f.get_slice(k).get_shape())

    def get(self, key: str) -> torch.Tensor:
        f, k = self._file(key)
        return f.get_tensor(k)

    def check_shapes(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Every parameter's shape in the checkpoint (read from the files' headers) is the
        plan's model's (a ZeRO-3 parameter's whole shape is its ``ds_shape``)."""
        for name, p in params.items():
            shape = self.shape(name)
            want = tuple(getattr(p, "ds_shape", p.shape))
            if shape != want:
                raise CheckpointError(f"{self.found[name][0]}: {name} has shape {shape}, the plan's model has {want}")


def _index(directory: str, files: list[str], params: dict[str, torch.nn.Parameter]) -> dict[str, tuple[Path, str]]:
    """Where each of this stage's tensors is in the checkpoint's files."""
    from safetensors import safe_open

    d = Path(directory)
    want = set(params) | {f"optim/{n}" for n in params}
    found: dict[str, tuple[Path, str]] = {}
    for fname in files:
        path = d / fname
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    base = key if not key.startswith("optim/") else "optim/" + key[6:].rsplit("/", 1)[0]
                    if base in want or key.startswith("rng/"):
                        found.setdefault(key, (path, key))
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from e
    missing = [n for n in params if n not in found]
    if missing:
        raise CheckpointError(f"{d}: no tensor for {missing[0]} (and {len(missing) - 1} more) in any shard")
    return found


CLIENT_PREFIX = "stage_0.client-"


def client_optim_file(device: str) -> str:
    """A federated client's own optimizer and RNG state in a checkpoint."""
    return f"{CLIENT_PREFIX}{device}.optim.safetensors"


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


class StageCheckpoint:
    """Checkpoint I/O of one prepared stage worker: its segment, and its optimizer's state
    (DeepSpeed's engine's on an offloaded stage)."""

    def __init__(self, worker: StageWorker):
        self.w = worker

    def named_params(self) -> dict[str, torch.nn.Parameter]:
        """Parameters by checkpoint name (model's own names; LoRA adapters by peft's names;
        compactly stored frozen weights left out: they are rebuilt from the model's source)."""
        return checkpoint_params(self.w.segment.model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This segment's tensors under the model's own names, shared tensors once; LoRA
        adapters under peft's names. A ZeRO-3 stage's weights are gathered over its replicas
        (every replica takes part)."""
        tensors = checkpoint_tensors(self.w.segment.model)
        if self.w.engine is not None and self.w.offload == "params":
            from splitlearn import zero

            tensors.update(zero.full_params(self.named_params()))
        return tensors

    def save(self, directory: str) -> dict[str, Any]:
        """Write this stage's tensors and its optimizer and RNG state, by parameter name, each
        file atomically; return the files with their sizes and SHA-256 for the manifest."""
        w = self.w
        d = Path(directory)
        optim: dict[str, torch.Tensor] = {}
        weights = None
        if w.engine is not None:  # gathered over the replica group: every replica takes part
            from splitlearn import zero

            params = self.named_params()
            state = zero.get_state(w.engine, params)
            optim = {k: v for k, v in state.items() if k.startswith("optim/")}
            weights = {**checkpoint_tensors(w.segment.model), **{k: v for k, v in state.items() if k in params}}
        # replicas hold the same tensors: the first one writes them; a splitfed client under
        # local steps also its own optimizer state (with the gradients averaged every step the
        # clients' states are the same); under sequential split learning the client holding
        # the newest front (the next turn's: it was handed on) writes the clients' stage
        client = w.federated and w.is_first and not w.sequential and w.run.federation.rounds_every > 1
        writer = w.replica == (w.steps_done % w.num_replicas if w.sequential and w.is_first else 0)
        if not writer and not client:
            return {"stage": w.stage, "replica": w.replica, "device": w.device_name, "files": []}
        d.mkdir(parents=True, exist_ok=True)
        if w.engine is None:
            for name, p in self.named_params().items():
                for key, value in w.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        optim[f"optim/{name}/{key}"] = value.detach().cpu().contiguous().clone()
        optim["rng/torch"] = torch.get_rng_state()
        if w.device.type == "cuda":
            optim["rng/cuda"] = torch.cuda.get_rng_state()
        files = []
        todo = [(client_optim_file(w.device_name), optim)] if client else []
        if writer:
            todo += [
                (f"stage_{w.stage}.safetensors", weights if weights is not None else self.state_dict()),
                (f"stage_{w.stage}.optim.safetensors", optim),
            ]
        for name, tensors in todo:
            _save_safetensors(d / name, tensors, {"stage": str(w.stage), "device": w.device_name})
            files.append({"name": name, "bytes": (d / name).stat().st_size, "sha256": sha256(d / name)})
        return {"stage": w.stage, "replica": w.replica, "device": w.device_name, "files": files}

    def _files(self, files: list[str]) -> list[str]:
        """The checkpoint's files this worker reads: a federated client its own optimizer
        file first (when there is one), no other client's; any other stage no client's."""
        w = self.w
        own = client_optim_file(w.device_name) if w.federated and w.is_first else None
        shared = [f for f in files if not f.startswith(CLIENT_PREFIX)]
        return ([own] if own in files else []) + shared

    def check(self, directory: str, files: list[str]) -> int:
        """What :meth:`load` checks, changing nothing."""
        params = self.named_params()
        found = _index(directory, self._files(files), params)
        with ExitStack() as stack:
            Shards(found, stack).check_shapes(params)
        return len(params)

    def load(self, directory: str, files: list[str]) -> int:
        """Load this stage's parameters and optimizer state by name from a checkpoint written
        by any plan. A name missing from every file or a shape that differs is a
        CheckpointError naming the file."""
        w = self.w
        params = self.named_params()
        found = _index(directory, self._files(files), params)
        with ExitStack() as stack:
            shards = Shards(found, stack)
            shards.check_shapes(params)
            if w.engine is not None:
                from splitlearn import zero

                zero.set_state(w.engine, params, lambda key: shards.get(key) if key in found else None)
            else:
                with torch.no_grad():
                    for name, p in params.items():
                        p.copy_(shards.get(name))
                        prefix = f"optim/{name}/"
                        state = {k[len(prefix) :]: shards.get(k).to(p.device) for k in found if k.startswith(prefix)}
                        if state:
                            w.optimizer.state[p] = state
            if "rng/torch" in found:
                torch.set_rng_state(shards.get("rng/torch"))
            if "rng/cuda" in found and w.device.type == "cuda":
                torch.cuda.set_rng_state(shards.get("rng/cuda"))
        return len(params)

    def export(self, directory: str, merge: bool) -> dict[str, Any]:
        """The stage's LoRA adapters (peft's names, returned: they are small) and, with
        ``merge``, its shard of the merged model written to ``directory`` as
        ``model-<i>-of-<n>.safetensors`` (LoRA deltas added to the base weights)."""
        w = self.w
        out: dict[str, Any] = {
            "stage": w.stage,
            "lora_modules": list(w.adapted),
            "adapter": adapter_state_dict(w.segment.model),
        }
        if merge:
            d = Path(directory)
            d.mkdir(parents=True, exist_ok=True)
            state = merged_state_dict(w.segment.model)
            name = f"model-{w.stage + 1:05d}-of-{w.num_stages:05d}.safetensors"
            _save_safetensors(d / name, state, {"format": "pt"})
            out.update(merged_file=name, merged_keys=sorted(state), merged_bytes=(d / name).stat().st_size)
        return out
