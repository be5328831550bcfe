"""A stage's ``STEP``: sum what is shared, clip by the global norm over every stage, step.

Tied embed/head weights have a copy on the data owner and on every replica of the loss stage:
their gradients are summed over the ``ends`` group. A replicated stage's replicas sum their
gradients over their group (DeepSpeed does it for an offloaded stage). The global gradient
norm is a float64 sum of squares per stage, all-reduced over the world, with each tied weight
and each replicated stage counted once, as the unsplit model counts them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch

from splitlearn.optim import clip_coefficient, sum_of_squares
from splitlearn.stage.fedavg import CLIENT, SERVER, FedAvg


def all_reduce_via_host(group: Any, t: torch.Tensor) -> None:
    """Sum ``t`` over a gloo group in place, through host memory when ``t`` is on a GPU."""
    if t.is_cuda:
        host = t.cpu()
        group.all_reduce(host)
        t.copy_(host)
    else:
        group.all_reduce(t)


def all_reduce_flat(group: Any, grads: list[torch.Tensor]) -> None:
    """Sum ``grads`` over ``group``, flattened into one buffer per call."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_via_host(group, flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class OptimizerStep:
    """What ``STEP`` does on one worker. ``engine``: DeepSpeed's, on an offloaded stage."""

    def __init__(
        self,
        optimizer: Any,
        engine: Any,
        tied: dict[str, torch.nn.Parameter],
        groups: Any,
        replica: int,
        num_replicas: int,
        is_last: bool,
        world_size: int,
        max_grad_norm: float,
        fed: FedAvg | None = None,
    ):
        self.optimizer, self.engine, self.tied, self.groups = optimizer, engine, tied, groups
        self.replica, self.num_replicas, self.is_last = replica, num_replicas, is_last
        self.world_size, self.max_grad_norm = world_size, max_grad_norm
        self.fed = fed  # a federated client's or the server's part in FedAvg

    def __call__(self, params: Iterable[torch.nn.Parameter], step: int = 0, tokens: int = 0) -> tuple[float, float]:
        """Reduce, clip, step. Returns the global gradient norm and the seconds spent in the
        collectives (waiting for the other workers, mostly). ``tokens``: a federated client's
        label tokens in this step (its FedAvg weight)."""
        if self.fed is not None:
            return self._federated(list(params), step, tokens)
        t_sync = time.perf_counter()
        for p in self.tied.values():  # the data owner's copy and every loss-stage replica's share
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_via_host(self.groups.ends, p.grad)
        sync = time.perf_counter() - t_sync
        if self.engine is not None:
            # the replicas' reduced gradients are in DeepSpeed's fp32 partitions, disjoint
            # across replicas: each contributes its own partition to the global norm
            from splitlearn import zero

            grads = zero.grad_partitions(self.engine)
            local = sum_of_squares(grads)
        else:
            grads, local, reduce_s = self._local_norm([p for p in params if p.grad is not None])
            sync += reduce_s
        if self.world_size > 1:
            t_sync = time.perf_counter()
            self.groups.world.all_reduce(local)
            sync += time.perf_counter() - t_sync
        norm = float(local.sqrt())
        coef = clip_coefficient(norm, self.max_grad_norm)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        (self.engine if self.engine is not None else self.optimizer).step()
        return norm, sync

    def _local_norm(self, params: list[torch.nn.Parameter]) -> tuple[list[torch.Tensor], torch.Tensor, float]:
        """This worker's gradients (summed over the replicas), its share of the squared norm,
        and the seconds the replicas' sum took. ``params``: those with a gradient."""
        grads: list[torch.Tensor] = [p.grad for p in params if p.grad is not None]
        tied_ids = {id(p) for p in self.tied.values()}
        reduce_s = 0.0
        if self.num_replicas > 1:
            t_sync = time.perf_counter()
            all_reduce_flat(
                self.groups.replicas, [g for p, g in zip(params, grads, strict=True) if id(p) not in tied_ids]
            )
            reduce_s = time.perf_counter() - t_sync
        # Count a tied weight once (on the first stage), as the unsplit model does, and a
        # replicated stage's gradients once (on its first replica).
        skip = tied_ids if (self.is_last and self.tied) else set()
        local = sum_of_squares(g for p, g in zip(params, grads, strict=True) if id(p) not in skip)
        if self.replica > 0:
            local = torch.zeros_like(local)
        return grads, local, reduce_s

    def _federated(self, params: list[torch.nn.Parameter], step: int, tokens: int) -> tuple[float, float]:
        """The STEP of a federated client (its front summed through the server, or its own
        under local steps) or of the server (which serves the sum besides its own step). Under
        local steps each client clips by the norm of the model it trains: its own front's
        gradients and the shared stages' (the other clients' shares are left out of the sum)."""
        fed = self.fed
        assert fed is not None and self.engine is None and not self.tied, "checked in prepare()"
        if fed.sequential:
            return self._sequential(params, step)
        t_sync = time.perf_counter()
        grads = [p.grad for p in params if p.grad is not None]
        own = None
        if fed.role == CLIENT:
            fed.gradients(grads, tokens)
            local = sum_of_squares(grads)
            if fed.local_steps or self.replica > 0:  # a client's own share, or counted once (client 0)
                own, local = (local if fed.local_steps else None), torch.zeros_like(local)
        else:
            _, local, _ = self._local_norm([p for p in params if p.grad is not None])
            if not fed.local_steps:
                fed.serve("fedavg-aggregate")
        if self.world_size > 1:
            self.groups.world.all_reduce(local)
        if own is not None:
            local = local + own
        norm = float(local.sqrt())
        coef = clip_coefficient(norm, self.max_grad_norm)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        self.optimizer.step()
        if fed.role == CLIENT:
            fed.weights([p for p in params if p.requires_grad], step)
        elif fed.local_steps and fed.round_ends(step):
            fed.serve("fedavg-aggregate")
        return norm, time.perf_counter() - t_sync

    def _sequential(self, params: list[torch.nn.Parameter], step: int) -> tuple[float, float]:
        """The STEP of sequential split learning: the client whose turn it is and the shared
        stages clip by the global norm and step (the other clients, idle, add nothing and keep
        their fronts); then the front is handed on to the next client through the server."""
        fed = self.fed
        assert fed is not None
        t_sync = time.perf_counter()
        turn = fed.role == SERVER or fed.rank == fed.turn(step)
        if fed.role == SERVER:
            grads, local, _ = self._local_norm([p for p in params if p.grad is not None])
        else:
            grads = [p.grad for p in params if p.grad is not None]
            local = sum_of_squares(grads if turn else [])  # float64, as every rank's share
        if self.world_size > 1:
            self.groups.world.all_reduce(local)
        norm = float(local.sqrt())
        coef = clip_coefficient(norm, self.max_grad_norm)
        if turn:
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
            self.optimizer.step()
        fed.hand_on([p for p in params if p.requires_grad], self.optimizer, step)
        return norm, time.perf_counter() - t_sync
