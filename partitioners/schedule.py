"""Schedules as data: per stage, the ordered actions of one training step.

The workers execute these lists and a simulator can replay them, so both see one truth.
Actions name a micro-batch; transfers are explicit so that a list can be checked for
matching sends and receives before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cluster.tables import render_table


class ActionKind(StrEnum):
    """What one action of a stage's list does. A ``StrEnum``: an action prints, compares and
    serialises (traces, JSON) as its plain name."""

    F = "F"  # forward of one micro-batch
    B = "B"  # backward of one micro-batch
    SEND_ACT = "SEND_ACT"  # activation to the next stage
    RECV_ACT = "RECV_ACT"  # activation from the previous stage
    SEND_GRAD = "SEND_GRAD"  # gradient to the previous stage
    RECV_GRAD = "RECV_GRAD"  # gradient from the next stage
    SEND_LABELS = "SEND_LABELS"  # the step's labels, from the data owner to the loss stage
    RECV_LABELS = "RECV_LABELS"
    STEP = "STEP"  # reduce shared gradients, clip, optimizer step


# short names for the kinds, as the schedules and the simulator write them
F, B, STEP = ActionKind.F, ActionKind.B, ActionKind.STEP
SEND_ACT, RECV_ACT = ActionKind.SEND_ACT, ActionKind.RECV_ACT
SEND_GRAD, RECV_GRAD = ActionKind.SEND_GRAD, ActionKind.RECV_GRAD
SEND_LABELS, RECV_LABELS = ActionKind.SEND_LABELS, ActionKind.RECV_LABELS


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    mb: int = -1  # micro-batch, -1 for whole-step actions

    def __str__(self) -> str:
        return str(self.kind) if self.mb < 0 else f"{self.kind}{self.mb}"


Schedule = list[list[Action]]


class ScheduleError(ValueError):
    """A schedule that would deadlock or compute the wrong thing (an internal invariant)."""


def _stage_mb_actions(stage: int, num_stages: int, mb: int, part: str) -> list[Action]:
    last = num_stages - 1
    out: list[Action] = []
    if part == "fwd":
        if stage > 0:
            out.append(Action(RECV_ACT, mb))
        out.append(Action(F, mb))
        if stage < last:
            out.append(Action(SEND_ACT, mb))
    else:
        if stage < last:
            out.append(Action(RECV_GRAD, mb))
        out.append(Action(B, mb))
        if stage > 0:
            out.append(Action(SEND_GRAD, mb))
    return out


def _with_labels(stage: int, num_stages: int, actions: list[Action]) -> list[Action]:
    if num_stages == 1:
        return actions
    if stage == 0:
        return [Action(SEND_LABELS), *actions]
    if stage == num_stages - 1:
        return [Action(RECV_LABELS), *actions]
    return actions


def sequential(num_stages: int, num_micro_batches: int) -> Schedule:
    """One micro-batch at a time through the whole pipeline: F and B of micro-batch m on
    every stage before micro-batch m+1 starts. No overlap, no bubble accounting: the
    baseline the pipelined schedules are measured against."""
    sched = []
    for s in range(num_stages):
        acts: list[Action] = []
        for m in range(num_micro_batches):
            acts += _stage_mb_actions(s, num_stages, m, "fwd")
            acts += _stage_mb_actions(s, num_stages, m, "bwd")
        acts.append(Action(STEP))
        sched.append(_with_labels(s, num_stages, acts))
    return sched


def gpipe(num_stages: int, num_micro_batches: int) -> Schedule:
    """GPipe: every stage runs all its forwards, then all its backwards (same order), so it
    holds the activations of all M micro-batches at once."""
    sched = []
    for s in range(num_stages):
        acts: list[Action] = []
        for m in range(num_micro_batches):
            acts += _stage_mb_actions(s, num_stages, m, "fwd")
        for m in range(num_micro_batches):
            acts += _stage_mb_actions(s, num_stages, m, "bwd")
        acts.append(Action(STEP))
        sched.append(_with_labels(s, num_stages, acts))
    return sched


def one_f_one_b(num_stages: int, num_micro_batches: int) -> Schedule:
    """1F1B (PipeDream-Flush): stage s warms up with S-s-1 forwards, then alternates one
    forward and one backward, then drains the remaining backwards. It holds at most S-s
    micro-batches' activations, against GPipe's M."""
    sched = []
    for s in range(num_stages):
        warmup = min(num_stages - s - 1, num_micro_batches)
        acts: list[Action] = []
        for m in range(warmup):
            acts += _stage_mb_actions(s, num_stages, m, "fwd")
        for i in range(num_micro_batches - warmup):
            acts += _stage_mb_actions(s, num_stages, warmup + i, "fwd")
            acts += _stage_mb_actions(s, num_stages, i, "bwd")
        for m in range(num_micro_batches - warmup, num_micro_batches):
            acts += _stage_mb_actions(s, num_stages, m, "bwd")
        acts.append(Action(STEP))
        sched.append(_with_labels(s, num_stages, acts))
    return sched


SCHEDULES = {"sequential": sequential, "gpipe": gpipe, "1f1b": one_f_one_b}


def replica_pairs(src_replicas: int, dst_replicas: int, num_micro_batches: int) -> list[tuple[int, int]]:
    """The (sending replica, receiving replica) pairs of a cut between a stage on
    ``src_replicas`` replicas and the next on ``dst_replicas``: micro-batch m goes from
    replica ``m % src_replicas`` to replica ``m % dst_replicas`` (gradients back the same way)."""
    return sorted({(m % src_replicas, m % dst_replicas) for m in range(max(num_micro_batches, 1))})


def replica_actions(actions: list[Action], replica: int, num_replicas: int) -> list[Action]:
    """The action list of replica ``replica`` of a stage on ``num_replicas`` replicas: the
    stage's list kept to the micro-batches ``m % num_replicas == replica``, with every
    whole-step action (``STEP``, labels) kept. Activations of micro-batch m come from, and
    gradients go back to, the neighbour's replica ``m % R`` of that neighbour; before its
    ``STEP`` each replica all-reduces its gradients with the others."""
    if not 0 <= replica < num_replicas:
        raise ValueError(f"replica {replica} of {num_replicas}")
    return [a for a in actions if a.mb < 0 or a.mb % num_replicas == replica]


def peak_in_flight(actions) -> int:
    """The most micro-batches whose forward has run and whose backward has not, over one
    action list (one stage's, or one replica's): what the stage holds activations for."""
    now = most = 0
    for a in actions:
        if a.kind == F:
            now += 1
            most = max(most, now)
        elif a.kind == B:
            now -= 1
    return most


def build(name: str, num_stages: int, num_micro_batches: int) -> Schedule:
    sched = SCHEDULES[name](num_stages, num_micro_batches)
    validate(sched, num_micro_batches)
    return sched


def validate(sched: Schedule, num_micro_batches: int) -> None:
    """Every micro-batch runs forward then backward once per stage; each send has its receive
    on the neighbouring stage in the same order; one STEP ends each list."""
    n = len(sched)
    for s, acts in enumerate(sched):
        for m in range(num_micro_batches):
            fi = [i for i, a in enumerate(acts) if a == Action(F, m)]
            bi = [i for i, a in enumerate(acts) if a == Action(B, m)]
            if len(fi) != 1 or len(bi) != 1 or fi[0] > bi[0]:
                raise ScheduleError(f"stage {s}: micro-batch {m} needs one F before one B")
        if not acts or acts[-1] != Action(STEP) or acts.count(Action(STEP)) != 1:
            raise ScheduleError(f"stage {s}: the list must end with its only STEP")
    pairs = ((SEND_ACT, RECV_ACT, 1), (SEND_GRAD, RECV_GRAD, -1))
    for send, recv, direction in pairs:
        for s in range(n):
            t = s + direction
            if not 0 <= t < n:
                if any(a.kind == send for a in sched[s]):
                    raise ScheduleError(f"stage {s}: {send} has no neighbour to go to")
                continue
            sent = [a.mb for a in sched[s] if a.kind == send]
            got = [a.mb for a in sched[t] if a.kind == recv]
            if sent != got:
                raise ScheduleError(f"stage {s} -> {t}: {send} order {sent} != {recv} order {got}")


def format_grid(sched: Schedule) -> str:
    """A table with one row per stage and one column per action slot (0, 1, ...: the
    position in the stage's list); a shorter list leaves its last cells empty."""
    slots = max((len(acts) for acts in sched), default=0)
    header = ("stage", *(str(i) for i in range(slots)))
    rows = [(str(s), *(str(a) for a in acts), *([""] * (slots - len(acts)))) for s, acts in enumerate(sched)]
    return render_table(header, rows, numeric=("stage",))
