"""Measure what leaves the data owner at each candidate cut of a run's model.

The owner's model is the run's (its ``model`` section and seed: random init or a local
checkpoint), optionally fine-tuned ``privacy.finetune_steps`` steps on the private data with
the owner's configured method (full, frozen, LoRA) in one process, which computes what the
pipeline computes. The attacker knows the *initial* weights (the public checkpoint, or the
seeded init) and public text, not the fine-tuned weights nor the private data.

For each number of blocks ``k`` the owner keeps (0 .. ``privacy.max_owner_blocks``):

- front: the owner runs ``embed, block_0 .. block_{k-1}`` and sends the activation; attacks
  (a) nearest neighbour and (b) learned inversion (:mod:`splitlearn.privacy.attacks`);
- tail (U-shape): the owner runs ``block_{n-k} .. block_{n-1}, head`` on the cloud's
  activation and sends back the gradient; attack (c) recovers the labels from it.

With ``noise_scale`` s > 0 (a measurement setting for ``bench/privacy.py``; the runtime
adds no noise: it did not measurably lower recovery, see the README) the owner adds Gaussian noise of standard deviation
``s * rms`` (the tensor's root mean square per position) to each activation and gradient it
sends; the attacker knows the mechanism and trains its decoder on equally noisy activations.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from splitlearn.config import LoadedConfig
from splitlearn.data import load_dataset, synth_corpus, tokenize
from splitlearn.models.build import build_model
from splitlearn.models.chain import IGNORE_INDEX, Segment, count_items, cut, num_blocks
from splitlearn.privacy.attacks import (
    InverterBudget,
    invert,
    labels_from_gradients,
    nearest_tokens,
    recovery,
    train_inverter,
)

EVAL_ROWS = 16  # private rows the attacks are scored on
PUBLIC_DOCS = 400  # generated public documents the attacker trains its decoder on


@dataclass
class CutLeak:
    """Recovery rates with ``owner_blocks`` blocks on the owner (front: after the embedding;
    tail: before the head); None where not measured."""

    owner_blocks: int
    nearest: float | None = None  # attack (a) on the front cut's activations
    learned: float | None = None  # attack (b) on the front cut's activations
    label: float | None = None  # attack (c) on the gradient the U's tail sends back

    @property
    def tokens(self) -> float:
        """The front cut's token recovery: the better of the attacks."""
        return max(x for x in (self.nearest, self.learned, 0.0) if x is not None)


@dataclass
class PrivacyReport:
    key: str  # what was measured (model, seed, method, steps, noise, budget): the cache key
    what: dict[str, Any]
    rows: list[CutLeak]
    num_blocks: int
    seconds: float = 0.0

    def row(self, owner_blocks: int) -> CutLeak | None:
        return next((r for r in self.rows if r.owner_blocks == owner_blocks), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivacyReport:
        d = dict(d)
        d["rows"] = [CutLeak(**r) for r in d["rows"]]
        return cls(**d)


@dataclass
class MeasureSettings:
    max_owner_blocks: int = 4
    finetune_steps: int = 0
    noise_scale: float = 0.0
    attacks: tuple[str, ...] = ("nearest", "learned", "label")
    budget: InverterBudget = field(default_factory=InverterBudget)
    eval_rows: int = EVAL_ROWS


def add_noise(t: torch.Tensor, scale: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """``t`` plus Gaussian noise of ``scale`` times its root mean square per position."""
    if scale <= 0:
        return t
    rms = t.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.device)
    return (t.float() + scale * rms * noise).to(t.dtype)


def tail_logits(seg: Segment, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The logits a tail segment (its blocks, then the head) computes from hidden state ``h``."""
    model, ad = seg.model, seg.adapter
    if seg.block_ids:
        ctx, h = ad.prepare(model, h, mask, False, h.dtype, seg.block_ids[-1])
        for i in seg.block_ids:
            out = ad.block(model, i, h, ctx)
            h = out[0] if isinstance(out, tuple) else out
    return ad.head(model, h)


def _table(model: nn.Module, output: bool = False) -> torch.Tensor:
    """The input (or output) embedding matrix of a Hugging Face model, detached."""
    hf: Any = model
    layer = hf.get_output_embeddings() if output else hf.get_input_embeddings()
    return layer.weight.detach()


def _labels(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)


def finetune(model: nn.Module, cfg: LoadedConfig, ids: torch.Tensor, mask: torch.Tensor | None, steps: int) -> None:
    """``steps`` of AdamW on the private rows with the owner's configured method, in place."""
    from splitlearn import method_policy
    from splitlearn.models.methods import apply_methods

    run = cfg.run
    n = num_blocks(model)
    method = method_policy.policy(run).for_stage(0, cfg.topology.data_owner.tier)
    apply_methods(model, [(0, n + 2, method)], method_policy.lora_spec(run), run.train.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or steps <= 0:
        return
    opt = torch.optim.AdamW(params, lr=run.train.lr, weight_decay=run.train.weight_decay)
    whole = cut(model, 0, n + 2)
    gen = torch.Generator().manual_seed(run.train.seed)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, ids.shape[0], (min(run.train.batch_size, ids.shape[0]),), generator=gen)
        m = None if mask is None else mask[rows]
        loss = whole(ids[rows], m, _labels(ids[rows], m))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def front(model: nn.Module, k: int) -> Segment:
    """A copy of ``model``'s embedding and first ``k`` blocks."""
    return cut(copy.deepcopy(model), 0, k + 1)


def measure_front(
    k: int, owner: nn.Module, known: nn.Module, data: dict[str, Any], s: MeasureSettings
) -> tuple[float | None, float | None]:
    """Attacks (a) and (b) on the activation the owner sends after ``k`` blocks."""
    ids, mask, pub_ids, pub_mask = data["ids"], data["mask"], data["pub_ids"], data["pub_mask"]
    gen = torch.Generator().manual_seed(1000 + k)
    with torch.no_grad():
        acts = add_noise(front(owner, k)(ids, mask), s.noise_scale, gen)
    valid = None if mask is None else mask.bool()
    nearest = learned = None
    if "nearest" in s.attacks:
        table = _table(known)
        nearest = recovery(nearest_tokens(acts, table, mask), ids, valid)
    if "learned" in s.attacks:
        seg = front(known, k)

        def activations(x: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
            return add_noise(seg(x, m), s.noise_scale, gen)

        inv = train_inverter(activations, pub_ids, pub_mask, data["vocab"], s.budget)
        learned = recovery(invert(inv, acts), ids, valid)
    return nearest, learned


def measure_tail(k: int, owner: nn.Module, known: nn.Module, data: dict[str, Any], s: MeasureSettings) -> float:
    """Attack (c) on the gradient the owner's U-shaped tail (``k`` blocks and the head) sends back."""
    ids, mask = data["ids"], data["mask"]
    n = num_blocks(owner)
    a = n + 1 - k  # the tail's first chain index
    labels = _labels(ids, mask)
    items = count_items(labels)
    with torch.no_grad():
        hidden = cut(copy.deepcopy(owner), 0, a)(ids, mask)
    h = hidden.detach().requires_grad_(True)
    loss = cut(copy.deepcopy(owner), a, n + 2)(h, mask, labels, items)
    (grad,) = torch.autograd.grad(loss, h)
    grad = add_noise(grad, s.noise_scale, torch.Generator().manual_seed(2000 + k))
    tail = cut(copy.deepcopy(known), a, n + 2)
    unembed = _table(known, output=True)
    guess = labels_from_gradients(grad, hidden, lambda x: tail_logits(tail, x, mask), unembed, items)
    valid = labels != IGNORE_INDEX
    valid[:, 0] = False
    return recovery(guess, labels, valid)


def measure(cfg: LoadedConfig, s: MeasureSettings, key: str, what: dict[str, Any]) -> PrivacyReport:
    """Every candidate cut's recovery rates for the run ``cfg`` (see the module's docstring)."""
    t0 = time.perf_counter()
    run = cfg.run
    torch.manual_seed(run.train.seed)
    ds, tok = load_dataset(run.data, cfg.resolve_path)
    pub = tokenize(
        synth_corpus(PUBLIC_DOCS, seed=run.train.seed + 7919).split("\n\n"),
        tok,
        run.data.seq_len,
        run.data.packing is not False,  # null: text rows are packed
        source="public text",
    )
    known = build_model(run.model, run.train.seed).eval()
    owner = copy.deepcopy(known)
    finetune(owner, cfg, ds.input_ids, ds.attention_mask, s.finetune_steps)
    rows = torch.arange(min(s.eval_rows, ds.num_rows))
    data = {
        "ids": ds.input_ids[rows],
        "mask": None if ds.attention_mask is None else ds.attention_mask[rows],
        "pub_ids": pub.input_ids,
        "pub_mask": pub.attention_mask,
        "vocab": int(_table(known).shape[0]),
    }
    n = num_blocks(known)
    out = []
    for k in range(min(s.max_owner_blocks, n - 1) + 1):
        row = CutLeak(k)
        if {"nearest", "learned"} & set(s.attacks):
            row.nearest, row.learned = measure_front(k, owner, known, data, s)
        if "label" in s.attacks:
            row.label = measure_tail(k, owner, known, data, s)
        out.append(row)
    return PrivacyReport(key, what, out, n, round(time.perf_counter() - t0, 2))


def noisy(fn: Callable[[torch.Tensor], torch.Tensor], scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: add_noise(fn(x), scale)
