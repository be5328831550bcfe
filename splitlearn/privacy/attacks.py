"""The attacks a curious peer can run on what the data owner sends: real computations on
tensors, each returning its guess of the private tokens (or labels).

- :func:`nearest_tokens` (attack *a*): each activation at the cut, centred per position over
  the batch, matched by cosine to the rows of the known (public, initial) input embedding,
  centred too. At an embedding-only cut the activation *is* an embedding row (plus, for
  learned positions, the position's row, which the centring removes).
- :func:`train_inverter` / :func:`invert` (attack *b*): a small decoder (per position: norm,
  MLP, vocabulary logits) that the attacker trains on public text pushed through the known
  initial weights of the owner's layers, within a stated budget of steps.
- :func:`labels_from_gradients` (attack *c*): the gradient the owner's tail stage (U-shape)
  sends back for the cloud's last activation. The cloud, holding the tail's initial weights,
  computes the label-free part of that gradient itself (the softmax term), and matches the
  rest, position by position, against the rows of the known output embedding.

Recovery is the share of valid (non-padding) positions whose token the attack gets exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def recovery(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """The share of positions (``mask`` true) where ``pred`` equals ``truth``."""
    hit = pred == truth
    if mask is not None:
        m = mask.bool()
        return float(hit[m].float().mean()) if bool(m.any()) else 0.0
    return float(hit.float().mean())


def _centred(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` (batch, seq, dim) less its mean over the batch at each position (valid rows only)."""
    x = x.float()
    if mask is None:
        return x - x.mean(dim=0, keepdim=True)
    w = mask.float().unsqueeze(-1)
    mean = (x * w).sum(0, keepdim=True) / w.sum(0, keepdim=True).clamp_min(1.0)
    return x - mean


def nearest_tokens(
    acts: torch.Tensor, embedding: torch.Tensor, mask: torch.Tensor | None = None, chunk: int = 4096
) -> torch.Tensor:
    """Attack (a): the vocabulary row nearest (cosine) to each activation (batch, seq, dim),
    both centred; ``embedding`` is (vocab, dim). Returns token ids (batch, seq)."""
    h = F.normalize(_centred(acts, mask).reshape(-1, acts.shape[-1]), dim=-1)
    e = embedding.float()
    e = F.normalize(e - e.mean(dim=0, keepdim=True), dim=-1)
    out = torch.empty(h.shape[0], dtype=torch.long)
    for i in range(0, h.shape[0], chunk):
        out[i : i + chunk] = (h[i : i + chunk].to(e.device) @ e.T).argmax(-1).cpu()
    return out.reshape(acts.shape[:2])


class Inverter(nn.Module):
    """Attack (b)'s decoder: per position, norm, a two-layer MLP, vocabulary logits; the
    attacker's model of the inverse of the owner's layers."""

    def __init__(self, dim: int, vocab: int, width: int = 0):
        super().__init__()
        width = width or 2 * dim
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.GELU(), nn.Linear(width, vocab))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


@dataclass
class InverterBudget:
    """What the attacker spends on attack (b): AdamW steps over public sequences."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0


def train_inverter(
    activations: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    public_ids: torch.Tensor,
    public_mask: torch.Tensor | None,
    vocab: int,
    budget: InverterBudget,
) -> Inverter:
    """Attack (b): fit an :class:`Inverter` that maps ``activations(ids, mask)`` (the owner's
    layers with the weights the attacker knows) back to ``ids``, on public rows."""
    gen = torch.Generator().manual_seed(budget.seed)
    with torch.no_grad():
        probe = activations(public_ids[:1], None if public_mask is None else public_mask[:1])
    dev = probe.device
    inv = Inverter(probe.shape[-1], vocab).to(dev)
    opt = torch.optim.AdamW(inv.parameters(), lr=budget.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(budget.steps, 1))
    n = public_ids.shape[0]
    for _ in range(budget.steps):
        rows = torch.randint(0, n, (min(budget.batch_size, n),), generator=gen)
        ids = public_ids[rows]
        mask = None if public_mask is None else public_mask[rows]
        with torch.no_grad():
            h = activations(ids, mask).float()
        target = ids.to(dev) if mask is None else ids.masked_fill(~mask.bool(), -100).to(dev)
        loss = F.cross_entropy(inv(h).reshape(-1, vocab), target.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return inv.eval()


@torch.no_grad()
def invert(inv: Inverter, acts: torch.Tensor) -> torch.Tensor:
    """Attack (b)'s guess of the tokens behind ``acts`` (batch, seq, dim)."""
    dev = next(inv.parameters()).device
    return inv(acts.float().to(dev)).argmax(-1).cpu()


def labels_from_gradients(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    tail: Callable[[torch.Tensor], torch.Tensor],
    unembedding: torch.Tensor,
    num_items: int,
) -> torch.Tensor:
    """Attack (c): the labels behind ``grad``, the gradient of the loss (a sum over positions
    divided by ``num_items``) with respect to ``hidden``, the activation the cloud sent to
    the owner's tail. ``tail(hidden)`` gives the logits with the weights the cloud knows.

    The gradient is ``(J^T p - J^T onehot(y)) / num_items``; the cloud computes the first
    term from its copy of the tail, and the rest at position ``t`` points along the output
    row of label ``y[t + 1]``. Returns (batch, seq) guesses; position 0 is not guessed (its
    label carries no loss) and is returned as -1."""
    h = hidden.detach().float().requires_grad_(True)
    logits = tail(h).float()
    p = torch.softmax(logits, dim=-1).detach()
    free = (p[:, :-1] * logits[:, :-1]).sum() / num_items
    (g_free,) = torch.autograd.grad(free, h)
    residual = (g_free - grad.float()) * num_items  # J^T onehot(y), position t for label t + 1
    w = unembedding.float().to(residual.device)
    scores = residual[:, :-1] @ w.T
    guess = scores.argmax(-1).cpu()
    return torch.cat([torch.full((guess.shape[0], 1), -1, dtype=torch.long), guess], dim=1)
