"""How long each action of a step took, and where the time went.

On a CPU: host wall time. On a GPU, where an action returns once its kernels are queued,
CUDA events on the compute stream give each action's span on the device (a receive: the
stream waiting for its data; the step's one wait is at the end).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from partitioners.schedule import Action, ActionKind

_COMPUTE = (ActionKind.F, ActionKind.B, ActionKind.STEP)


@dataclass
class StepTimes:
    """A step's seconds: compute (forwards, backwards, STEP's own work and what precedes the
    first action: the batch, zeroed gradients), the forwards and backwards alone, and
    communication (transfers, and STEP's waits for sends and collectives)."""

    compute_s: float = 0.0
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    comm_s: float = 0.0
    trace: list[list[Any]] | None = field(default=None)


class ActionTimer:
    """Times a step's actions. With ``trace``, each action's ``[kind, mb, start ms, end ms]`` on
    the wall clock (ms since the epoch: comparable across workers on one host); on a GPU the
    device spans placed on the wall clock at a synchronisation when the step begins. ``STEP``'s
    span in the trace is its own compute, after its waits."""

    def __init__(self, gpu: bool, trace: bool):
        self.gpu = gpu
        self.trace: list[list[Any]] | None = [] if trace else None
        # per action: the action, host s, wait s, start and end events, start and end wall ns
        self.rows: list[tuple[Action, float, float, Any, Any, int, int]] = []
        self.prep_s = 0.0  # host work before the first action (the batch, zeroed gradients)
        self.ref: Any = None  # on a GPU with trace: the event recorded at the step's synchronised start
        if gpu and trace:
            torch.cuda.synchronize()
            self.ref_ns = time.time_ns()
            self.ref = self._event()

    @staticmethod
    def _event() -> Any:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def start(self, act: Action) -> None:
        self._t0, self._wall0 = time.perf_counter(), time.time_ns()
        timed = act.kind in _COMPUTE or self.ref is not None
        self._ev0 = self._event() if self.gpu and timed else None

    def end(self, act: Action, wait_s: float = 0.0) -> None:
        """``wait_s``: the part of the action's host time spent waiting on others."""
        host_s = time.perf_counter() - self._t0
        ev1 = self._event() if self._ev0 is not None else None
        self.rows.append((act, host_s, wait_s, self._ev0, ev1, self._wall0, time.time_ns()))

    def durations(self) -> list[tuple[ActionKind, float, float]]:
        """Per action: kind, seconds, seconds of it spent waiting; fills ``trace``."""
        if self.gpu and self.rows and self.rows[-1][4] is not None:
            self.rows[-1][4].synchronize()
        out = []
        for act, host_s, wait_s, ev0, ev1, wall0, wall1 in self.rows:
            dt = ev0.elapsed_time(ev1) / 1e3 if ev0 is not None else host_s
            wait_s = min(wait_s, dt)
            out.append((act.kind, dt, wait_s))
            if self.trace is not None:
                if self.ref is not None:
                    start = self.ref_ns / 1e6 + self.ref.elapsed_time(ev0)
                    end = start + dt * 1e3
                else:
                    start, end = wall0 / 1e6, wall1 / 1e6
                if act.kind == ActionKind.STEP:
                    start = end - (dt - wait_s) * 1e3
                self.trace.append([act.kind, act.mb, start, end])
        return out

    def summary(self) -> StepTimes:
        """The step's times by kind: a compute action's waits count as communication."""
        times = StepTimes(compute_s=self.prep_s)
        for kind, dt, wait in self.durations():
            if kind in _COMPUTE:
                times.compute_s += dt - wait
                times.comm_s += wait
                if kind == ActionKind.F:
                    times.fwd_s += dt
                elif kind == ActionKind.B:
                    times.bwd_s += dt
            else:
                times.comm_s += dt
        times.trace = self.trace
        return times
