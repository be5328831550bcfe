"""Runs one stage's action list for a step: a table from action kind to handler.

The list comes from :mod:`partitioners.schedule` (the simulator replays the same lists).
Each handler works on a small per-step :class:`StepState` (what this step has received,
computed and sent so far) and returns the seconds of its time spent waiting on other
workers. A failing action is logged with the stage's whole list and the action marked, and
raised as :class:`~splitlearn.errors.StageFailed` naming the stage, device, step and action.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from partitioners.schedule import Action, ActionKind
from splitlearn.errors import StageFailed
from splitlearn.models.chain import count_items
from splitlearn.optim import lr_at, set_lr
from splitlearn.stage.timing import ActionTimer

if TYPE_CHECKING:
    from splitlearn.stage.worker import StageWorker

log = logging.getLogger(__name__)


@dataclass
class StepState:
    """What one step has received, computed and sent so far, by micro-batch."""

    step: int
    batch: dict[str, Any] | None  # the data owner's rows for the step
    labels: torch.Tensor | None  # the step's labels (the data owner's, or received by the loss stage)
    num_items: int | None = None  # label tokens in the whole step: each loss is divided by it
    inputs: dict[int, Any] = field(default_factory=dict)
    masks: dict[int, torch.Tensor | None] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    grads_in: dict[int, torch.Tensor] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=lambda: {"next": 0, "prev": 0, "labels": 0})
    transfers: list[dict[str, Any]] = field(default_factory=list)  # runtime.audit_transport: what was sent where
    loss_total: float = 0.0
    grad_norm: float = 0.0


Handler = Callable[[StepState, Action], float]


class Executor:
    """Executes a prepared, connected worker's actions (see :class:`~splitlearn.stage.worker.StageWorker`)."""

    def __init__(self, worker: StageWorker):
        assert worker.groups is not None, "init_dist() first"
        self.w, self.groups = worker, worker.groups
        self.rows = worker.run.train.batch_size // worker.num_micro_batches  # rows per micro-batch
        # DeepSpeed's gradient-accumulation boundary: this list's last backward
        self.last_backward = next((a for a in reversed(worker.actions) if a.kind == ActionKind.B), None)
        self.handlers: dict[ActionKind, Handler] = {
            ActionKind.SEND_LABELS: self._send_labels,
            ActionKind.RECV_LABELS: self._recv_labels,
            ActionKind.RECV_ACT: self._recv_act,
            ActionKind.F: self._forward,
            ActionKind.SEND_ACT: self._send_act,
            ActionKind.RECV_GRAD: self._recv_grad,
            ActionKind.B: self._backward,
            ActionKind.SEND_GRAD: self._send_grad,
            ActionKind.STEP: self._step,
        }

    def _autocast(self) -> AbstractContextManager[Any]:
        # a DeepSpeed engine autocasts by its own config (zero.ds_config), and would switch an
        # outer autocast off on CUDA
        if self.w.run.train.dtype == "bf16" and self.w.engine is None:
            return torch.autocast(self.w.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def run(self, step: int) -> dict[str, Any]:
        """Execute the actions for ``step``; return the step's metrics."""
        w = self.w
        t0 = time.perf_counter()
        actions = w.actions
        if w.sequential and w.is_first:  # a client's turn, or only the hand-on of the front (in STEP)
            turn = step % w.num_replicas == w.replica
            actions = actions if turn else [a for a in actions if a.kind == ActionKind.STEP]
            batch = w.batches.batch(step // w.num_replicas) if turn else None  # its own batches in order
        else:
            batch = w.batches.batch(step) if w.is_first else None
        state = StepState(step, batch, batch["labels"] if batch is not None else None)
        set_lr(w.optimizer, lr_at(step, w.run.train))
        if w.engine is None:
            w.optimizer.zero_grad(set_to_none=False)  # gradients persist: steady memory
        timer = ActionTimer(w.device.type == "cuda", w.run.runtime.trace)
        # the batch and the zeroed gradients are the step's work too (a CPU stage's zeroing of
        # a large embedding's gradient takes milliseconds): counted as compute, outside any action
        timer.prep_s = time.perf_counter() - t0
        if w.run.runtime.prepost_receives:
            w.transport.prepost([(src, self.groups.link(w.rank, src)) for src in self._peers(actions, step)])
        for i, act in enumerate(actions):
            timer.start(act)
            try:
                waited = self.handlers[act.kind](state, act)
            except Exception as e:
                grid = " ".join(str(a) for a in actions)
                log.error("stage %d actions: %s  <-- ERROR HERE at %s (#%d)", w.stage, grid, act, i)
                raise StageFailed(w.stage, w.device_name, step, str(act), f"{type(e).__name__}: {e}") from e
            timer.end(act, waited)
        return self._metrics(state, timer)

    def _metrics(self, state: StepState, timer: ActionTimer) -> dict[str, Any]:
        w = self.w
        times = timer.summary()
        links = {}
        tag = f"{w.stage}" if w.num_replicas == 1 else f"{w.stage}.{w.replica}"
        if not w.is_last:
            links[f"{tag}->{w.stage + 1}"] = state.sent["next"]
        if not w.is_first:
            links[f"{tag}->{w.stage - 1}"] = state.sent["prev"]
        if state.sent["labels"]:
            links[f"0->{w.num_stages - 1} (labels)"] = state.sent["labels"]
        out = {
            "stage": w.stage,
            "replica": w.replica,
            "device": w.device_name,
            "compute_s": times.compute_s,
            "fwd_s": times.fwd_s,
            "bwd_s": times.bwd_s,
            "micro_batches": w.num_forwards if state.batch is not None or not w.is_first else 0,
            "comm_s": times.comm_s,
            "bytes_sent": links,
            "loss": state.loss_total if w.is_last else None,
            "grad_norm": state.grad_norm,
            "tokens": int(state.batch["input_ids"].numel()) if state.batch is not None else None,
        }
        if times.trace is not None:
            out["trace"] = times.trace
        if w.run.runtime.audit_transport:
            out["transfers"] = state.transfers
        return out

    def _audit(self, state: StepState, kind: str, t: torch.Tensor | None, dst: int, mb: int | None = None) -> None:
        """Record one tensor this worker sends (``runtime.audit_transport``): its kind, dtype,
        shape, its micro-batch (for one micro-batch's tensor), and the stages and devices at
        both ends."""
        w = self.w
        if t is None or not w.run.runtime.audit_transport:
            return
        state.transfers.append(
            {
                "kind": kind,
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "src_stage": w.stage,
                "src_device": w.device_name,
                "dst_stage": w.layout.stage_of(dst),
                "dst_device": w.layout.device_of(dst),
                "mb": mb,
                "step": state.step,
            }
        )

    # -- handlers: each returns the seconds of its time spent waiting on other workers -------
    def _send_labels(self, state: StepState, act: Action) -> float:
        """Every replica of the loss stage gets the step's labels."""
        assert state.labels is not None
        for dst in self.w.layout.stage_ranks(self.w.num_stages - 1):
            state.sent["labels"] += self.w.transport.send(state.labels, dst, self.groups.ends)
            self._audit(state, "labels", state.labels, dst)
        return 0.0

    def _client_rank(self, stage: int, mb: int, step: int) -> int:
        """The rank that handles micro-batch ``mb`` of ``stage``: under sequential split
        learning every micro-batch of the clients' stage is the client whose turn it is."""
        w = self.w
        if w.sequential and stage == 0:
            return w.layout.offsets[0] + step % w.layout.replicas[0]
        return w.layout.rank_of(stage, mb)

    def _recv_labels(self, state: StepState, act: Action) -> float:
        w = self.w
        if not w.federated or w.sequential:
            state.labels, _ = w.transport.recv(self._client_rank(0, 0, state.step), self.groups.ends)
            return 0.0
        # each client's labels; micro-batch m is client m % N's local micro-batch m // N
        own = [w.transport.recv(r, self.groups.ends)[0] for r in w.layout.stage_ranks(0)]
        n, rows = len(own), self.rows
        state.labels = torch.cat(
            [own[m % n][(m // n) * rows : (m // n + 1) * rows] for m in range(w.num_micro_batches)]
        )
        return 0.0

    def _peer(self, act: Action, step: int) -> int:
        """The rank a receive of an activation or a gradient comes from."""
        w = self.w
        if act.kind == ActionKind.RECV_ACT:
            return self._client_rank(w.stage - 1, act.mb, step)
        return w.layout.rank_of(w.stage + 1, act.mb)

    def _peers(self, actions: list[Action], step: int) -> list[int]:
        """Where the step's activations and gradients come from, in the order it takes them."""
        return [self._peer(a, step) for a in actions if a.kind in (ActionKind.RECV_ACT, ActionKind.RECV_GRAD)]

    def _recv_act(self, state: StepState, act: Action) -> float:
        src = self._peer(act, state.step)
        x, mask = self.w.transport.recv(src, self.groups.link(self.w.rank, src))
        state.inputs[act.mb] = x.requires_grad_(True)
        state.masks[act.mb] = mask
        return 0.0

    def _forward(self, state: StepState, act: Action) -> float:
        w, m, rows = self.w, act.mb, self.rows
        if w.is_first:
            assert state.batch is not None
            # a splitfed client's own rows: its micro-batches in turn
            local = m // w.num_replicas if w.federated and not w.sequential else m
            sl = slice(local * rows, (local + 1) * rows)
            state.inputs[m] = state.batch["input_ids"][sl].to(w.device)
            bm = state.batch["attention_mask"]
            state.masks[m] = None if bm is None else bm[sl].to(w.device)
        lab = None
        if w.is_last:
            assert state.labels is not None
            if state.num_items is None:
                state.num_items = count_items(state.labels)
            lab = state.labels[m * rows : (m + 1) * rows].to(w.device)
        with self._autocast():
            fwd = w.engine if w.engine is not None else w.segment
            state.outputs[m] = fwd(state.inputs[m], state.masks[m], lab, state.num_items)
        if w.is_last:
            state.loss_total += float(state.outputs[m].detach())
        return 0.0

    def _send_act(self, state: StepState, act: Action) -> float:
        w, m = self.w, act.mb
        dst = w.layout.rank_of(w.stage + 1, m)
        state.sent["next"] += w.transport.send(
            state.outputs[m], dst, self.groups.link(w.rank, dst), w.codec_out, state.masks[m]
        )
        self._audit(state, "activation", state.outputs[m], dst, m)
        self._audit(state, "padding-mask", state.masks[m], dst, m)
        return 0.0

    def _recv_grad(self, state: StepState, act: Action) -> float:
        src = self._peer(act, state.step)
        state.grads_in[act.mb], _ = self.w.transport.recv(src, self.groups.link(self.w.rank, src))
        return 0.0

    def _backward(self, state: StepState, act: Action) -> float:
        w = self.w
        out = state.outputs.pop(act.mb)
        grad = None if w.is_last else state.grads_in.pop(act.mb)
        if w.engine is not None:
            self._ds_backward(out, grad, last=act == self.last_backward)
        elif out.requires_grad:  # a frozen first stage has nothing to differentiate
            out.backward(grad)
        return 0.0

    def _ds_backward(self, out: torch.Tensor, grad: torch.Tensor | None, last: bool) -> None:
        """Backward of one micro-batch through DeepSpeed. A stage without a loss of its own
        differentiates ``sum(out * grad)``, whose gradient with respect to ``out`` is exactly
        ``grad``. The sum over micro-batches is the step's gradient (each loss is already
        divided by the whole batch's token count), so DeepSpeed must not divide by its
        accumulation steps, and its average over the replicas is undone by multiplying by
        their count (which the gradient sent back to the previous stage divides out)."""
        engine = self.w.engine
        engine.set_gradient_accumulation_boundary(last)
        target = out if grad is None else (out * grad.to(out.dtype)).sum()
        engine.backward(target * self.w.num_replicas, scale_wrt_gas=False)

    def _send_grad(self, state: StepState, act: Action) -> float:
        w, m = self.w, act.mb
        x = state.inputs.pop(m)
        dst = self._client_rank(w.stage - 1, m, state.step)
        grad = x.grad if w.engine is None else x.grad / w.num_replicas  # see _ds_backward
        state.sent["prev"] += w.transport.send(grad, dst, self.groups.link(w.rank, dst), w.codec_in)
        self._audit(state, "gradient", grad, dst, m)
        return 0.0

    def _step(self, state: StepState, act: Action) -> float:
        """Wait for this step's sends, then reduce, clip and step (:mod:`splitlearn.stage.optim_step`)."""
        t_wait = time.perf_counter()
        self.w.transport.wait_sends()
        waited = time.perf_counter() - t_wait
        w = self.w
        tokens = count_items(state.labels) if w.federated and w.is_first and state.labels is not None else 0
        state.grad_norm, collectives_s = w.optimizer_step(w.segment.parameters(), state.step, tokens)
        if w.fed is not None:  # what FedAvg sent: the client's update, or the server's sum
            for kind, t, dst in w.fed.take_sent():
                self._audit(state, kind, t, dst)
        ends = {0, self.w.num_stages - 1} - {self.w.stage}
        for p in self.w.tied.values():  # a tied weight's gradient is summed with the other end's
            for dst in (r for s in ends for r in self.w.layout.stage_ranks(s)):
                self._audit(state, "tied-gradient", p.grad, dst)
        return waited + collectives_s
