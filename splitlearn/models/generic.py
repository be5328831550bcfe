"""Any decoder-only ``*ForCausalLM`` as the chain ``embed, block_0…, head``, run by the family's own code.

No hand-written knowledge of a family: :class:`GenericAdapter` finds the model's list of
decoder layers (the ``ModuleList`` of ``num_hidden_layers`` modules under its base model),
and runs the model's own ``forward`` with each decoder layer replaced by a recorder
(:class:`_Recorder`) that notes what the family passes it and runs nothing:

- the **context** of a forward is what the family's forward passes each decoder layer
  besides the hidden state: its attention mask (causal, sliding, by ``layer_types``), rotary
  embeddings, ALiBi, position ids, ... built by the family's own code from the padding mask;
- the **embed** layer is whatever the family computes before its first decoder layer, from
  the token ids: the embedding, its multipliers (Gemma's ``sqrt(hidden)``, Granite's
  ``embedding_multiplier``), learned positions, embedding dropout (Starcoder2), norms (BLOOM);
- a **block** is the decoder layer called with exactly those arguments;
- the **head** is whatever the family computes after its last decoder layer: the model's own
  ``forward`` runs again with the recorders, and the input of the first module it calls after
  the layers is replaced by the hidden state, so the final norm, LM head, logit scaling
  (Cohere, Granite) and soft-capping (Gemma-2) are the family's own.

Which modules the embed and head layers own (to drop them from other segments) is found
the same way, once per model, on a parameter-free meta copy: the modules its forward calls
before the first decoder layer belong to the embed layer, those after the last to the head;
parameter-free ones (rotary embeddings, dropout) are shared by every segment. A segment
without the embed layer runs the family's forward from zero input embeddings; the embedding
modules it does not hold are replaced by :class:`ShapeStub`, which returns zeros of the shape
the real module would return (learned position tables, BLOOM's embedding norm).
"""

from __future__ import annotations

import copy
import inspect
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from splitlearn.errors import ModelError
from splitlearn.models.families import Context, FamilyAdapter, get_path


def _config(model: nn.Module) -> Any:
    """``model.config`` (typed ``Any``: which fields it has depends on the family)."""
    return model.config


class _StopForward(Exception):
    """Raised by the last recorder a forward needs: the rest of the model is not run."""


@dataclass
class Calls:
    """What one run of the family's forward passed its decoder layers."""

    args: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # positional, after the hidden state
    kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)
    first_input: torch.Tensor | None = None  # the hidden state entering the first layer: the embedding
    hidden_shape: tuple[int, ...] = ()
    done: bool = False  # the last decoder layer was called
    tuple_out: bool = False  # the family's layers return a tuple (hidden state first), not a tensor
    on_layer: Callable[[int], None] | None = None  # told each layer's index as it is called


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during one forward: records its arguments and
    returns a fresh zero tensor of the first layer's input shape (whatever the family does
    with a layer's output, tuple or tensor, the next recorder ignores it)."""

    def __init__(self, index: int, last: int, calls: Calls, stop_at: int | None):
        super().__init__()
        self.index, self.last, self.calls, self.stop_at = index, last, calls, stop_at

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if self.index == 0:
            self.calls.first_input = hidden
            self.calls.hidden_shape = tuple(hidden.shape)
        self.calls.args[self.index] = rest
        self.calls.kwargs[self.index] = kwargs
        if self.calls.on_layer is not None:
            self.calls.on_layer(self.index)
        if self.index == self.last:
            self.calls.done = True
        if self.stop_at is not None and self.index >= self.stop_at:
            raise _StopForward
        zeros = torch.zeros(self.calls.hidden_shape, dtype=hidden.dtype, device=hidden.device)
        return (zeros,) if self.calls.tuple_out else zeros


class ShapeStub(nn.Module):
    """A module a segment does not hold but the family's forward still calls (a learned
    position table, an embedding norm): returns zeros of the shape and dtype the module would
    return, worked out by running a parameter-free meta copy of it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._meta = [meta_copy(module)]  # a list: not a submodule, so no parameters here

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        device = next((a.device for a in [*args, *kwargs.values()] if torch.is_tensor(a)), None)
        out = self._meta[0](*_to_meta(args), **_to_meta(kwargs))
        return _zeros_like_on(out, device)


def _to_meta(v: Any) -> Any:
    if torch.is_tensor(v):
        return v.to("meta")
    if isinstance(v, tuple | list):
        return type(v)(_to_meta(x) for x in v)
    if isinstance(v, dict):
        return {k: _to_meta(x) for k, x in v.items()}
    return v


def _zeros_like_on(v: Any, device: torch.device | None) -> Any:
    if torch.is_tensor(v):
        return torch.zeros(v.shape, dtype=v.dtype, device=device)
    if isinstance(v, tuple | list):
        return type(v)(_zeros_like_on(x, device) for x in v)
    return v


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every parameter and buffer an empty meta tensor (nothing is
    copied, so a large module costs nothing)."""
    memo: dict[int, Any] = {}
    for t in [*module.parameters(), *module.buffers()]:
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


@dataclass(frozen=True)
class Layout:
    """Where a family's pieces live, as dotted paths from the ``*ForCausalLM`` object."""

    blocks_path: str
    embed_paths: tuple[str, ...]
    head_paths: tuple[str, ...]
    shared_paths: tuple[str, ...]
    after_blocks: str  # the first module the forward calls after the last decoder layer
    embed_dim: int  # the last dimension of ``inputs_embeds``
    tuple_out: bool  # the decoder layers return a tuple, hidden state first


def _blocks_path(model: nn.Module) -> str:
    """The path of the model's decoder layers: the ``ModuleList`` of ``num_hidden_layers``
    modules nearest the root (the longest one when the config does not say)."""
    want = getattr(_config(model), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    exact = [(name, m) for name, m in lists if len(m) == want]
    pool = exact or lists
    if not pool:
        raise ModelError(f"model family '{_config(model).model_type}': no list of decoder layers found")
    return min(pool, key=lambda nm: (nm[0].count("."), -len(nm[1])))[0]


def _siblings(model: nn.Module, blocks_path: str) -> Iterator[tuple[str, nn.Module]]:
    """Every module beside the path from the root to the decoder layers: candidates for the
    embed layer, the head and the shared helpers."""
    parts = blocks_path.split(".")
    node, prefix = model, ""
    for depth in range(len(parts)):
        for name, child in node.named_children():
            if name != parts[depth]:
                yield prefix + name, child
        node = getattr(node, parts[depth])
        prefix += parts[depth] + "."


def _own_tensors(model: nn.Module, blocks_path: str) -> tuple[list[str], list[str]]:
    """Parameters and buffers held directly by the modules on the path to the decoder layers
    (GPTBigCode's causal-mask buffer): (parameter names, buffer names)."""
    params: list[str] = []
    buffers: list[str] = []
    node, prefix = model, ""
    for part in blocks_path.split("."):
        params += [prefix + n for n, _ in node.named_parameters(recurse=False)]
        buffers += [prefix + n for n, _ in node.named_buffers(recurse=False)]
        node, prefix = getattr(node, part), prefix + part + "."
    return params, buffers


def _forward_kwargs(model: nn.Module, meta: bool = False) -> dict[str, Any]:
    """Keywords every run of the family's forward gets: no KV cache, no router logits (the
    router auxiliary loss is carried by :mod:`splitlearn.models.router`). On the meta device
    a cache is asked for, and dropped from what the layers get (:func:`_no_cache_objects`):
    without one, transformers' mask code looks for packed sequences in the position ids'
    values, which meta tensors do not have."""
    params = inspect.signature(type(model).forward).parameters
    out: dict[str, Any] = {"use_cache": meta} if "use_cache" in params else {}
    if "output_router_logits" in params:
        out["output_router_logits"] = False
    return out


def _no_cache_objects(calls: Calls) -> None:
    from transformers.cache_utils import Cache

    for i, kwargs in calls.kwargs.items():
        calls.kwargs[i] = {k: (None if isinstance(v, Cache) else v) for k, v in kwargs.items()}
        calls.args[i] = tuple(None if isinstance(v, Cache) else v for v in calls.args[i])


@contextmanager
def evaluating(model: nn.Module, active: bool) -> Iterator[list[bool]]:
    """Every module of the model in eval mode for the duration when ``active`` (each gets its
    own mode back): a segment running the family's forward for its context only must draw no
    random numbers (the embedding dropout of zero embeddings), so that its dropout masks are
    those of the unsplit model. Yields a one-item list: set it False once the modes were
    restored early (:meth:`GenericAdapter.head` does, where the head's own code starts)."""
    modes = [(m, m.training) for m in model.modules()] if active else []
    switch = [bool(modes)]
    for m, _ in modes:
        m.training = False
    try:
        yield switch
    finally:
        if switch[0]:
            restore(modes)


def restore(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, was in modes:
        m.training = was


@contextmanager
def recording(model: nn.Module, blocks_path: str, calls: Calls, stop_at: int | None) -> Iterator[None]:
    """Every decoder layer replaced by a :class:`_Recorder` for the duration."""
    blocks = get_path(model, blocks_path)
    saved = list(blocks)
    for i in range(len(blocks)):
        blocks[i] = _Recorder(i, len(saved) - 1, calls, stop_at)
    try:
        yield
    finally:
        for i, m in enumerate(saved):
            blocks[i] = m


def discover(model: nn.Module) -> Layout:
    """The layout of a causal LM, from one forward of a meta copy of it with its decoder
    layers replaced by recorders: the order in which its other modules are called."""
    meta = meta_copy(model)
    blocks_path = _blocks_path(meta)
    candidates = dict(_siblings(meta, blocks_path))
    errors: list[Exception] = []
    for tuple_out in (False, True):  # what the family's layers return: try a tensor, then a tuple
        order: list[str] = []
        marks: dict[int, int] = {}  # layer index -> calls to other modules before it
        calls = Calls(tuple_out=tuple_out, on_layer=_marking(order, marks))
        hooks = [m.register_forward_pre_hook(_noting(order, name)) for name, m in candidates.items()]
        ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
        try:
            with recording(meta, blocks_path, calls, None):
                meta(input_ids=ids, **_forward_kwargs(meta, meta=True))
            break
        except Exception as err:
            errors.append(err)
        finally:
            for h in hooks:
                h.remove()
    else:
        first = errors[0]
        line = str(first).splitlines()[0] if str(first) else ""
        raise ModelError(
            f"model family '{_config(meta).model_type}': its forward cannot be run layer by layer "
            f"({type(first).__name__}: {line}); register a FamilyAdapter for it (see the README)"
        ) from first
    n = len(get_path(meta, blocks_path))
    if len(marks) != n:
        raise ModelError(
            f"model family '{_config(meta).model_type}': its forward called {len(marks)} of its {n} decoder "
            "layers; register a FamilyAdapter for it (see the README)"
        )
    return _classify(model, meta, candidates, order, marks[0], marks[n - 1], blocks_path, tuple_out)


def _marking(order: list[str], marks: dict[int, int]) -> Callable[[int], None]:
    def mark(index: int) -> None:
        marks.setdefault(index, len(order))

    return mark


def _noting(order: list[str], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any) -> None:
        order.append(name)

    return hook


def _classify(
    model: nn.Module,
    meta: nn.Module,
    candidates: dict[str, nn.Module],
    order: list[str],
    first: int,
    last: int,
    blocks_path: str,
    tuple_out: bool,
) -> Layout:
    """Modules with parameters called before the first decoder layer: the embed layer's;
    after the last: the head's; parameter-free ones: shared."""
    before, between, after = order[:first], order[first:last], order[last:]
    called = set(order)
    owns = {name: any(True for _ in m.parameters()) for name, m in candidates.items()}
    inside = [n for n in dict.fromkeys(between) if owns[n]]
    if inside:
        raise ModelError(
            f"model family '{_config(meta).model_type}': its forward calls {inside[0]} between its decoder "
            "layers; register a FamilyAdapter for it (see the README)"
        )
    embed = [n for n in dict.fromkeys(before) if owns[n]]
    head = [n for n in dict.fromkeys(after) if owns[n] and n not in embed]
    shared = [n for n in candidates if not owns[n] and n in called]
    # modules with parameters the forward never calls: the head holds them (they are saved and loaded)
    head += [n for n in candidates if owns[n] and n not in called]
    params, buffers = _own_tensors(meta, blocks_path)
    head += params
    shared += buffers
    if not after:
        raise ModelError(f"model family '{_config(meta).model_type}': its forward calls nothing after its layers")
    emb = model.get_input_embeddings()  # type: ignore[operator]  # a PreTrainedModel method
    return Layout(
        blocks_path=blocks_path,
        embed_paths=tuple(embed),
        head_paths=tuple(head),
        shared_paths=tuple(shared),
        after_blocks=after[0],
        embed_dim=int(emb.weight.shape[-1]),
        tuple_out=tuple_out,
    )


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, Layout] = weakref.WeakKeyDictionary()


def layout_of(model: nn.Module) -> Layout:
    """The model's :class:`Layout`, found once per model object."""
    if model not in _LAYOUTS:
        _LAYOUTS[model] = discover(model)
    return _LAYOUTS[model]


class GenericAdapter(FamilyAdapter):
    """Any decoder-only causal LM, by running its own forward (see the module's doc)."""

    meta_native = True

    def __init__(self, layout: Layout, lora_targets: tuple[str, ...]):
        self.layout = layout
        self.blocks_path = layout.blocks_path  # type: ignore[misc]  # instance values of the base's ClassVars
        self.embed_paths = layout.embed_paths  # type: ignore[misc]
        self.head_paths = layout.head_paths  # type: ignore[misc]
        self.shared_paths = layout.shared_paths  # type: ignore[misc]
        self.lora_targets = lora_targets  # type: ignore[misc]

    def stub(self, module: nn.Module) -> nn.Module | None:
        return ShapeStub(module)

    # -- the chain's pieces ----------------------------------------------------------------
    def prepare(
        self,
        model: nn.Module,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        embed: bool,
        dtype: torch.dtype,
        last: int | None = None,
    ) -> tuple[Context, torch.Tensor]:
        """One run of the family's forward up to decoder layer ``last`` (every layer when
        None): the context of each layer, and the embedding of ``x`` when ``embed`` (``x``
        the token ids), else ``x`` itself (the hidden state)."""
        calls = Calls(tuple_out=self.layout.tuple_out)
        if embed:
            inputs: dict[str, Any] = {"input_ids": x}
        else:
            zero = torch.zeros((), dtype=dtype, device=x.device)
            inputs = {"inputs_embeds": zero.expand(x.shape[0], x.shape[1], self.layout.embed_dim)}
        stop = self.num_blocks(model) - 1 if last is None else last
        base = cast(Any, model).base_model  # PreTrainedModel.base_model
        on_meta = x.device.type == "meta"
        try:
            with evaluating(model, not embed), recording(model, self.blocks_path, calls, stop):
                base(attention_mask=attention_mask, **inputs, **_forward_kwargs(base, on_meta))
        except _StopForward:
            pass
        if on_meta:
            _no_cache_objects(calls)
        ctx = Context(attention_mask, torch.empty(0), {"calls": calls})
        if not embed:
            return ctx, x
        assert calls.first_input is not None, "the forward reached no decoder layer"
        return ctx, calls.first_input

    def context(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> Context:
        return self.prepare(model, hidden, attention_mask, False, hidden.dtype)[0]

    def embed(self, model: nn.Module, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.prepare(model, input_ids, ctx.attention_mask, True, torch.float32, last=0)[1]

    def block(self, model: nn.Module, index: int, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
        calls: Calls = ctx.masks["calls"]
        return self.blocks(model)[index](hidden, *calls.args[index], **calls.kwargs[index])

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The family's forward after its last decoder layer, on ``hidden``: the logits. The
        forward runs from zero input embeddings with every decoder layer recorded, not run;
        the first module it calls after them gets ``hidden`` as its input."""
        target = get_path(model, self.layout.after_blocks)
        calls = Calls(tuple_out=self.layout.tuple_out)
        modes = [(m, m.training) for m in model.modules()]  # restored where the head's own code starts
        restored = [False]

        def swap(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not calls.done:
                return None
            calls.done = False  # once
            restore(modes)  # the head's own dropout, if any, as in the unsplit model
            restored[0] = True
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        embeds = zero.expand(hidden.shape[0], hidden.shape[1], self.layout.embed_dim)
        handle = target.register_forward_pre_hook(swap, with_kwargs=True)
        try:
            with evaluating(model, True) as switch, recording(model, self.blocks_path, calls, None):
                out = model(inputs_embeds=embeds, **_forward_kwargs(model, hidden.device.type == "meta"))
                switch[0] = not restored[0]
        finally:
            handle.remove()
        return out.logits


def lora_targets_for(model: nn.Module, layout: Layout) -> tuple[str, ...]:
    """peft's default LoRA targets for the family, else the linear layers of the first decoder
    layer's attention."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as targets
    except ImportError:  # pragma: no cover - peft is a dependency
        targets = {}
    known = targets.get(_config(model).model_type)
    if known:
        return tuple(known)
    block = get_path(model, layout.blocks_path)[0]
    names = {
        name.rsplit(".", 1)[-1]
        for name, m in block.named_modules()
        if isinstance(m, nn.Linear) and ("attn" in name or "attention" in name)
    }
    return tuple(sorted(names))


def generic_adapter(model: nn.Module) -> GenericAdapter:
    layout = layout_of(model)
    return GenericAdapter(layout, lora_targets_for(model, layout))
