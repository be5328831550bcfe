"""Giving one segment's tensors real storage, and their random initial values.

A model is first built on the meta device (structure, no memory). A segment ``[start,
stop)`` of its chain then owns a known set of parameters and buffers
(:func:`segment_tensor_names`): those of its chain layers' modules, the family's shared
parameter-free helpers (the rotary embedding), and, when it holds the head, the embedding
weight tied to the head. Only those get storage (:func:`materialize`); the rest stays on meta
and :class:`~splitlearn.models.chain.Segment` drops it.

Random init (:func:`seeded_init`) runs the family's own ``_init_weights`` on each module, in
transformers' order, under a CPU generator seeded from ``(seed, the module's qualified
name)``: a module's values do not depend on which other modules were built, so every segment
holds exactly the tensors the whole model built the same way holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from splitlearn.errors import ModelError
from splitlearn.models.chain import tied_parameter_names
from splitlearn.models.families import adapter_of, get_path

TiedPairs = list[tuple[str, str]]  # (embed-side name, head-side name) of each tied parameter


def chain_module_paths(model: nn.Module, start: int, stop: int) -> list[str]:
    """Dotted paths of the modules chain layers ``[start, stop)`` own, plus the family's shared
    parameter-free helpers every segment keeps."""
    ad = adapter_of(model)
    n = ad.num_blocks(model)
    if not (0 <= start < stop <= n + 2):
        raise ModelError(f"segment [{start}, {stop}) is outside the chain of {n + 2} layers")
    paths: list[str] = list(ad.embed_paths) if start == 0 else []
    paths += [f"{ad.blocks_path}.{i - 1}" for i in range(max(start, 1), min(stop, n + 1))]
    if stop == n + 2:
        paths += list(ad.head_paths)
    paths += list(ad.shared_paths)
    return [p for p in paths if get_path(model, p) is not None]


def _under(name: str, paths: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in paths)


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def segment_tensor_names(model: nn.Module, start: int, stop: int, pairs: TiedPairs) -> list[str]:
    """The parameters and buffers segment ``[start, stop)`` materialises. Head-side names of
    tied parameters are left out (they are pointed at the embed-side tensor afterwards); a
    segment with the head materialises the embed-side tensor of each tie."""
    paths = chain_module_paths(model, start, stop)
    heads = {h for _, h in pairs}
    names = list(dict.fromkeys(name for name, _ in _tensors(model) if _under(name, paths) and name not in heads))
    if stop == num_chain(model):
        names += [e for e, _ in pairs if e not in names]
    return names


def num_chain(model: nn.Module) -> int:
    return adapter_of(model).num_blocks(model) + 2


def check_coverage(model: nn.Module) -> None:
    """Every tensor of the model belongs to some chain layer (else no segment would build it):
    a guard for families registered by users."""
    paths = chain_module_paths(model, 0, num_chain(model))
    left = [name for name, _ in _tensors(model) if not _under(name, paths)]
    if left:
        raise ModelError(
            f"model: {len(left)} tensor(s) belong to no chain layer ({', '.join(left[:3])}); the family "
            "adapter's embed_paths, blocks_path, head_paths and shared_paths must cover every module"
        )


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    mod, attr = _owner(model, name)
    t = mod._parameters[attr] if attr in mod._parameters else mod._buffers[attr]
    assert t is not None, name
    return t


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter (keeping its ``requires_grad``) or a buffer (keeping whether it is
    persistent) by ``value``."""
    mod, attr = _owner(model, name)
    if attr in mod._parameters:
        old = mod._parameters[attr]
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
        mod._parameters[attr] = value
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise KeyError(name)


def untie(model: nn.Module, pairs: TiedPairs) -> None:
    """Give each head-side tied parameter its own meta tensor (so initialising or loading the
    head cannot write into the embedding); :func:`retie` joins them again."""
    for _, h in pairs:
        set_tensor(model, h, nn.Parameter(torch.empty_like(get_tensor(model, h), device="meta")))


def retie(model: nn.Module, pairs: TiedPairs) -> None:
    """Point each head-side tied parameter at the embed-side one (real or meta), so every
    segment sees the tie (:func:`~splitlearn.models.chain.tied_parameter_names`)."""
    for e, h in pairs:
        set_tensor(model, h, get_tensor(model, e))


def materialize(model: nn.Module, names: list[str], device: str | torch.device = "cpu") -> None:
    """Uninitialised storage for each named meta tensor (same dtype, shape, ``requires_grad``);
    a tensor shared under several names stays shared."""
    memo: dict[int, torch.Tensor] = {}
    for name in names:
        t = get_tensor(model, name)
        if t.device.type != "meta":
            continue
        if id(t) not in memo:
            new = torch.empty_like(t, device=device)
            memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        set_tensor(model, name, memo[id(t)])


def move_real(model: nn.Module, device: str | torch.device) -> None:
    """Move every tensor that has storage to ``device``, one at a time (meta ones stay); a
    tensor shared under several names stays shared."""
    memo: dict[int, torch.Tensor] = {}
    for name, t in list(_tensors(model)):
        if t.device.type == "meta" or t.device == torch.device(device):
            continue
        if id(t) not in memo:
            moved = t.detach().to(device)
            memo[id(t)] = nn.Parameter(moved, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else moved
        set_tensor(model, name, memo[id(t)])


def meta_tensor_names(module: nn.Module) -> list[str]:
    return [name for name, t in _tensors(module) if t.device.type == "meta"]


def module_seed(seed: int, name: str) -> int:
    """The seed of one module's initial values: a function of the run's seed and its name."""
    digest = hashlib.sha256(f"splitlearn-init:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_init(model: nn.Module, seed: int) -> None:
    """The family's ``_init_weights`` on every module with a real tensor under it, children
    before parents and with transformers' dispatch to nested pretrained sub-models, each module
    under the CPU generator seeded by :func:`module_seed`. The CPU RNG state is restored; no
    CUDA generator is touched."""
    from transformers import PreTrainedModel
    from transformers import initialization as hf_init

    order: list[tuple[str, nn.Module, Callable[[nn.Module], Any]]] = []

    def walk(prefix: str, module: nn.Module, init: Callable[[nn.Module], Any]) -> None:
        for child_name, child in module.named_children():
            child_init = child._init_weights if isinstance(child, PreTrainedModel) else init
            walk(f"{prefix}.{child_name}" if prefix else child_name, child, child_init)
        order.append((prefix, module, init))

    walk("", model, model._init_weights)  # type: ignore[arg-type]  # a PreTrainedModel's method
    state = torch.get_rng_state()
    try:
        with torch.no_grad(), hf_init.guard_torch_init_functions():
            for name, module, init in order:
                if any(t.device.type != "meta" for _, t in _tensors(module)):
                    torch.default_generator.manual_seed(module_seed(seed, name))
                    init(module)
    finally:
        torch.set_rng_state(state)


def init_nonpersistent(model: nn.Module, names: list[str]) -> None:
    """Compute non-persistent buffers (rotary ``inv_freq``) with the family's ``_init_weights``
    on their owning modules, every other tensor of those modules protected by transformers'
    ``_is_hf_initialized`` flag (as ``from_pretrained`` does after loading)."""
    from transformers import initialization as hf_init

    owners = {name.rpartition(".")[0] for name in names}
    with torch.no_grad(), hf_init.guard_torch_init_functions():
        for path in owners:
            mod = model.get_submodule(path)
            flagged = []
            for k, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
                if f"{path}.{k}" not in names and t is not None:
                    t._is_hf_initialized = True  # type: ignore[attr-defined]  # transformers' flag
                    flagged.append(t)
            model._init_weights(mod)  # type: ignore[operator]  # a PreTrainedModel's method
            for t in flagged:
                del t._is_hf_initialized  # type: ignore[attr-defined]


def random_segment(model: nn.Module, seed: int, start: int, stop: int) -> None:
    """Materialise and initialise, in place, the tensors of segment ``[start, stop)`` of a meta
    model; as the whole model built the same way has them, and tied as it ties them."""
    pairs = tied_parameter_names(model)
    names = segment_tensor_names(model, start, stop, pairs)
    # untied while initialising, the head's (Linear) init cannot overwrite the embedding: as
    # in transformers, a tied weight has the embedding's initial values
    untie(model, pairs)
    materialize(model, names)
    seeded_init(model, seed)
    retie(model, pairs)
