"""Optimizer, learning-rate schedule and clipping: one definition for the stage workers and
for the single-process reference that the tests compare them with."""

from __future__ import annotations

import math
from typing import Any

import torch

from partitioners.profile import sum_of_squares  # the STEP's norm, timed by the profile as it runs


class NoOptimizer:
    """The optimizer of a stage with nothing to train (every weight frozen): no state, no step."""

    def __init__(self) -> None:
        self.state: dict = {}
        self.param_groups: list[dict] = []

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


class MasterAdamW:
    """AdamW whose state is fp32 for 16-bit trainable weights: an fp32 master copy of each
    such weight and fp32 moments. The 16-bit weight is the master rounded after every step;
    a gradient is upcast one parameter at a time, so the step's extra memory is one
    parameter's worth. fp32 parameters (e.g. LoRA adapters kept in fp32) are their own master.

    The math is ``torch.optim.AdamW``'s (decoupled decay, bias correction, ``eps`` added to
    the corrected root), so an fp32 model steps identically with either optimizer. ``state``
    is keyed by the model's parameters, as torch's is, with ``master`` beside the moments:
    checkpoints save and load it by name like any optimizer state."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        lr: float,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.params = params
        self.param_groups: list[dict[str, Any]] = [
            {"params": params, "lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        ]
        self.state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def _state(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        st = self.state.setdefault(p, {})
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in st:
                st[key] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if p.dtype != torch.float32 and "master" not in st:
            st["master"] = p.detach().float()
        return st

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in self.params:
            if p.grad is None:
                continue
            st = self._state(p)
            master = st.get("master", p)
            grad = p.grad.float()
            st["step"] += 1
            step = float(st["step"])
            master.mul_(1 - lr * wd)
            st["exp_avg"].lerp_(grad, 1 - beta1)
            st["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            del grad
            denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            master.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - beta1**step))
            del denom
            if master is not p:
                p.copy_(master)


def make_optimizer(params, train_cfg: Any) -> torch.optim.Optimizer | MasterAdamW | NoOptimizer:
    """AdamW over the parameters that require gradients (frozen and LoRA-base weights get
    no optimizer state); :class:`NoOptimizer` when there are none. Under ``bf16-master`` the
    state is fp32 (:class:`MasterAdamW`); otherwise torch's AdamW keeps it in the weights'
    dtype (``bf16-pure``: bf16 moments), fused where :func:`fused_adamw_supported` (CPU and
    CUDA stages), else one tensor at a time."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        return NoOptimizer()
    if train_cfg.dtype == "bf16-master":
        return MasterAdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    fused = fused_adamw_supported(trainable)
    return torch.optim.AdamW(
        trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, fused=fused or None, foreach=False
    )


FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def fused_adamw_supported(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused AdamW can step ``params``: one device (CPU or CUDA), floating
    weights. Fused is one kernel per tensor with no temporaries: on a CPU stage it steps 3-6x
    faster than the one-tensor-at-a-time loop, whose temporaries are fresh pages under the
    workers' malloc settings (docs/decisions.md, "Fused AdamW on CPU stages"); in fp32 it
    computes what the loop computes to the last bits (bf16 weights: it updates in fp32 and
    rounds once, the loop rounds every operation)."""
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(p.dtype in FUSED_DTYPES for p in params)
    )


def lr_at(step: int, train_cfg: Any) -> float:
    """Linear warm-up over ``warmup_steps``, then ``lr_schedule``: constant, or linear or
    cosine decay to 0 at ``steps`` (the shapes of transformers' ``get_linear_schedule_with_warmup``
    and ``get_cosine_schedule_with_warmup``; written here as one pure function of the step so
    that every stage and the single-process reference compute the same rate without a
    scheduler object to checkpoint)."""
    warm = train_cfg.warmup_steps
    if warm and step < warm:
        return train_cfg.lr * (step + 1) / warm
    schedule = getattr(train_cfg, "lr_schedule", "constant")
    if schedule == "constant":
        return train_cfg.lr
    progress = min(1.0, (step - warm) / max(1, train_cfg.steps - warm))
    if schedule == "linear":
        return train_cfg.lr * (1.0 - progress)
    return train_cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer | MasterAdamW | NoOptimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """The factor torch's ``clip_grad_norm_`` applies, from an already reduced norm."""
    if max_norm <= 0 or not math.isfinite(total_norm):
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def reference_step(model, batch, train_cfg, opt, step: int) -> tuple[float, float]:
    """One step of the unsplit model on one process: the behaviour split training matches."""
    from splitlearn.models.chain import causal_lm_loss, count_items

    set_lr(opt, lr_at(step, train_cfg))
    opt.zero_grad(set_to_none=True)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    num_items = count_items(labels)
    mbs = train_cfg.micro_batches
    size = ids.shape[0] // mbs
    total = 0.0
    for m in range(mbs):
        sl = slice(m * size, (m + 1) * size)
        logits = model(input_ids=ids[sl], attention_mask=None if mask is None else mask[sl]).logits
        loss = causal_lm_loss(logits, labels[sl], num_items)
        loss.backward()
        total += float(loss.detach())
    params = [p for p in model.parameters() if p.grad is not None]
    norm = math.sqrt(float(sum_of_squares(p.grad for p in params)))
    coef = clip_coefficient(norm, train_cfg.max_grad_norm)
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    opt.step()
    return total, norm
