"""FedAvg of the clients' fronts, through the server (split-federated runs, :mod:`splitlearn.federation`).

The clients (the replicas of stage 0, one per data owner) never exchange tensors with each
other: each sends its update to the server (the first replica of stage 1, a cloud worker that
sees every client's activations anyway) over the ``fedavg`` group, the server sums the
clients' updates in client order and sends the sum back to each.

- ``rounds_every == 1``: every step the clients' gradients are summed before clipping and
  the step. Each loss is already divided by the whole step's label tokens (all clients'), so
  the sum is the sample-weighted average of the clients' gradients: centralised training on
  the union of the clients' batches.
- ``rounds_every == k > 1``: each client steps its own front on its own gradient (scaled by
  the number of clients, making it its own batch's mean when the clients' batches hold equal
  label tokens, as packed text does), and after every k-th step (and the last) the fronts'
  trainable weights are averaged, weighted by the label tokens each client trained on since
  the last round.
- sequential split learning: the client whose turn it was hands its front (trainable weights
  and the optimizer's state, so that the next client continues exactly where it stopped) to
  the next client, through the server (:meth:`FedAvg.hand_on`).
"""

from __future__ import annotations

from typing import Any

import torch

CLIENT, SERVER = "client", "server"


class FedAvg:
    """One worker's part in the averaging: a client's or the server's."""

    def __init__(
        self,
        role: str,
        group: Any,
        transport: Any,
        server: int,
        clients: list[int],
        rounds_every: int,
        steps: int,
        rank: int = -1,
        sequential: bool = False,
    ):
        self.role, self.group, self.transport = role, group, transport
        self.server, self.clients, self.rank = server, clients, rank
        self.rounds_every, self.steps = rounds_every, steps
        self.sequential = sequential
        self.tokens = 0.0  # a client's label tokens since the last round
        self.sent: list[tuple[str, torch.Tensor, int]] = []  # (kind, tensor, destination) for the audit

    @property
    def local_steps(self) -> bool:
        return self.rounds_every > 1

    def round_ends(self, step: int) -> bool:
        return (step + 1) % self.rounds_every == 0 or step + 1 == self.steps

    # -- the exchange --------------------------------------------------------------------
    def _client_sum(self, flat: torch.Tensor, kind: str) -> torch.Tensor:
        """Send ``flat`` to the server; the clients' sum it sends back."""
        self.transport.send(flat, self.server, self.group)
        self.sent.append((kind, flat, self.server))
        total, _ = self.transport.recv(self.server, self.group)
        self.transport.wait_sends()
        return total.to(flat.device, flat.dtype)

    def serve(self, kind: str) -> None:
        """The server: receive every client's tensor, sum them in client order, send the sum back."""
        total: torch.Tensor | None = None
        for c in self.clients:
            t, _ = self.transport.recv(c, self.group)
            total = t if total is None else total + t
        assert total is not None
        for c in self.clients:
            self.transport.send(total, c, self.group)
            self.sent.append((kind, total, c))
        self.transport.wait_sends()

    # -- a client's step -----------------------------------------------------------------
    def gradients(self, grads: list[torch.Tensor], labels_tokens: int) -> None:
        """Before clipping: the clients' summed gradients (every step), or this client's own
        scaled to its batch's mean (local steps)."""
        self.tokens += labels_tokens
        if self.local_steps:
            for g in grads:
                g.mul_(len(self.clients))
            return
        # the server expects one message from each client, even from a front with nothing to train
        flat = torch.cat([g.reshape(-1).float() for g in grads]) if grads else torch.zeros(1)
        total = self._client_sum(flat, "fedavg-gradient")
        offset = 0
        for g in grads:
            g.copy_(total[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    @torch.no_grad()
    def weights(self, params: list[torch.nn.Parameter], step: int) -> None:
        """After the step, at a round's end (local steps only): the fronts' trainable weights
        averaged, weighted by the label tokens each client trained on in the round."""
        if not self.local_steps or not self.round_ends(step):
            return
        weight = max(self.tokens, 1.0)
        parts = [p.detach().reshape(-1).double().cpu() * weight for p in params]
        flat = torch.cat([*parts, torch.tensor([weight], dtype=torch.float64)])
        total = self._client_sum(flat, "fedavg-weights")
        avg = total[:-1] / total[-1]
        offset = 0
        for p in params:
            p.copy_(avg[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        self.tokens = 0.0

    # -- sequential split learning ---------------------------------------------------------
    def turn(self, step: int) -> int:
        """The rank of the client whose turn ``step`` is."""
        return self.clients[step % len(self.clients)]

    @torch.no_grad()
    def hand_on(self, params: list[torch.nn.Parameter], optimizer: Any, step: int) -> None:
        """After ``step``: its client sends its front to the server, which sends it on to the
        next step's client; that client takes the weights and the optimizer's state (also
        after the last step: the next client holds the newest front, and writes it)."""
        src, dst = self.turn(step), self.turn(step + 1)
        if src == dst:
            return
        if self.role == SERVER:
            t, _ = self.transport.recv(src, self.group)
            self.transport.send(t, dst, self.group)
            self.sent.append(("handoff", t, dst))
            self.transport.wait_sends()
        elif self.rank == src:
            parts = [x.reshape(-1).float().cpu() for p in params for x in _front(p, optimizer)]
            flat = torch.cat(parts) if parts else torch.zeros(0)  # a frozen front: nothing to hand on
            self.transport.send(flat, self.server, self.group)
            self.sent.append(("handoff", flat, self.server))
            self.transport.wait_sends()
        elif self.rank == dst:
            flat, _ = self.transport.recv(self.server, self.group)
            offset = 0
            for p in params:
                state = optimizer.state[p]
                if not state:  # never stepped here: torch's AdamW state, filled below
                    state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                for x in _front(p, optimizer):
                    x.copy_(flat[offset : offset + x.numel()].view_as(x).to(x.dtype))
                    offset += x.numel()
            assert offset == flat.numel(), "the clients' fronts differ"

    def take_sent(self) -> list[tuple[str, torch.Tensor, int]]:
        out, self.sent = self.sent, []
        return out


def _front(p: torch.nn.Parameter, optimizer: Any) -> list[torch.Tensor]:
    """A trainable weight and its AdamW state (``step``, moments), in one fixed order."""
    state = getattr(optimizer, "state", {}).get(p, {})
    return [p.data, *(state[k] for k in ("step", "exp_avg", "exp_avg_sq") if k in state)]
