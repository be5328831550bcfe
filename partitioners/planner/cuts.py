"""The cuts (and stage methods) of one device sequence: a dynamic programme over (stage,
cut) that keeps every label no other beats, exact for the schedule's lower bound.

A label summarises the stages placed so far in a few numbers from which the bound of every
completion follows (:func:`value`), each one only growing as stages are added, so a label
another beats in every number can be dropped:

- ``sequential``: ``X = sum M (F + act) + (M - 1) (B + grad)`` and ``K = B_s + max(K +
  grad, O_s)``; the step is ``X + K``, the closed form of
  :mod:`partitioners.planner.objective` (exact when nothing is shared);
- ``gpipe``: the round trip so far (with stage 0's optimizer step), the slowest forward
  resource and the slowest backward resource: ``total + (M - 1) (maxF + maxB)``, the
  forward and backward flow shops, exact unless a later stage's optimizer step ends after
  stage 0's;
- ``1f1b``: the round trip so far, the largest ``path before s + M (F_s + B_s)`` and the
  slowest wire: ``max(that, total + (M - 1) wire)``, a bound (1F1B has no closed form;
  :func:`partitioners.planner.objective.lower_bound`).

With ``label_privacy`` the data owner runs the first and the last stage: a label also
carries the owner's first-stage work, memory and host memory, for the last stage to add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from partitioners.costmodel import StageMethod
from partitioners.planner.request import PlanRequest
from partitioners.planner.tables import CostTables

# label fields: three numbers of the schedule's bound, the owner's first stage (U-shape:
# its work, device bytes, host bytes), back-pointer (stage, start, previous label, option)
_D0, _D1, _D2, _OWN, _FMEM, _FHOST, _PREV = range(7)


@dataclass
class CutChoice:
    lower_ms: float  # the schedule's bound (exact where the objective's closed form is)
    bounds: list[int]
    opts: list[StageMethod]


def value(schedule: str, M: int, d0, d1, d2):
    """The bound of a label's numbers (scalars or arrays)."""
    if schedule == "sequential":
        return d0 + d1
    if schedule == "gpipe":
        return d0 + (M - 1) * (d1 + d2)
    return np.maximum(d1, d0 + (M - 1) * d2)


def _extend(schedule: str, M: int, s: int, lab: tuple, F, B, Op, la: float, lg: float):
    """The numbers after one more stage (arrays over its possible ends)."""
    d0, d1, d2 = lab[_D0], lab[_D1], lab[_D2]
    if schedule == "sequential":
        n0 = d0 + M * (F + la) + (M - 1) * (B + lg)
        n1 = B + (Op if s == 0 else np.maximum(d1 + lg, Op))
        return n0, n1, np.zeros_like(F)
    if schedule == "gpipe":
        if s == 0:
            return F + B + Op, F, B
        return d0 + F + B + la + lg, np.maximum(np.maximum(d1, F), la), np.maximum(np.maximum(d2, B), lg)
    if s == 0:
        return F + B + Op, M * (F + B) + Op, np.zeros_like(F)
    base = d0 + la + lg
    return base + F + B, np.maximum(d1, base + M * (F + B)), np.full_like(F, max(d2, la, lg))


def best_cuts(
    req: PlanRequest,
    tables: CostTables,
    seq: list[str],
    bound: float,
    top: int = 1,
    prune: bool = True,
    max_labels: int = 0,
) -> list[CutChoice] | None:
    """Up to ``top`` choices of cuts and methods for ``seq`` with the smallest bound below
    ``bound``, smallest first (empty: nothing fits, or nothing beats ``bound``). Every option
    of every stage is tried for each of its layer ranges. ``prune`` off keeps every label
    below ``bound``, not only those no other beats: every plan of the sequence whose bound
    is below ``bound`` (the bound ranks plans; the step may rank them otherwise); None when
    a stage has more than ``max_labels`` (0: no limit)."""
    S, n, M = len(seq), req.n, req.num_micro_batches
    schedule = req.schedule
    ushape = req.label_privacy and S > 1
    frontier: dict[int, list[tuple]] = {0: [(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None)]}
    for s in range(S):
        nxt: dict[int, list[tuple]] = {}
        dev = seq[s]
        cap, hcap = tables.capacity(dev), tables.host_capacity(dev)
        last = s == S - 1
        opts = tables.options(s, dev)
        parts = [tables.parts(dev, o) for o in opts]
        memtabs = [tables.dev_table(dev, tables.inflight(s, S), o) for o in opts]
        hostcums = [tables.host_cum(dev, o) for o in opts]
        hi = n if last else n - (S - s - 1)
        for a, labels in frontier.items():
            lo = n if last else a + 1
            if lo > hi:
                continue
            bs = np.arange(lo, hi + 1)
            la, lg = tables.link(seq[s - 1], dev, a) if s > 0 else (0.0, 0.0)
            for k in range(len(opts)):
                f, bw, o = parts[k]
                F, B, Op = f[bs] - f[a], bw[bs] - bw[a], o[bs] - o[a]
                mem = memtabs[k][a, bs]
                host = hostcums[k][bs] - hostcums[k][a]
                for lab in labels:
                    if ushape and last:
                        ok = (lab[_FMEM] + mem <= cap) & (lab[_FHOST] + host <= hcap)
                    else:
                        ok = (mem <= cap) & (host <= hcap)
                    n0, n1, n2 = _extend(schedule, M, s, lab, F, B, Op, la, lg)
                    low = value(schedule, M, n0, n1, n2)
                    own = M * (F + B) + Op
                    if ushape and last:
                        low = np.maximum(low, lab[_OWN] + own)
                    keep = np.nonzero(ok & (low < bound))[0]
                    if not len(keep):
                        continue
                    first = ushape and s == 0
                    for i in keep.tolist():
                        prev = (s, a, lab, k)
                        if first:
                            new = (
                                float(n0[i]),
                                float(n1[i]),
                                float(n2[i]),
                                float(own[i]),
                                float(mem[i]),
                                float(host[i]),
                                prev,
                            )
                        else:
                            new = (float(n0[i]), float(n1[i]), float(n2[i]), lab[_OWN], lab[_FMEM], lab[_FHOST], prev)
                        nxt.setdefault(int(bs[i]), []).append(new)
        # the last stage's labels are final: ranked by their whole bound (with the owner's term)
        dims = 6 if ushape else 3
        frontier = {b: _prune(labs, dims) for b, labs in nxt.items()} if prune and not last else nxt
        if max_labels and sum(len(v) for v in frontier.values()) > max_labels:
            return None
        if not frontier:
            return []
    out = []
    for lab in frontier.get(n, []):
        low = float(value(schedule, M, lab[_D0], lab[_D1], lab[_D2]))
        if ushape:
            # the owner's two stages one after the other: the last one's work from its range
            _, a, _, k = lab[_PREV]
            f_last, b_last, o_last = tables.fbo(seq[-1], a, n, tables.options(S - 1, seq[-1])[k])
            low = max(low, lab[_OWN] + M * (f_last + b_last) + o_last)
        out.append((low, lab))
    out.sort(key=lambda x: x[0])
    choices = []
    for low, lab in out[:top]:
        cuts, chosen = [], []
        while lab[_PREV] is not None:
            s, a, lab, k = lab[_PREV]
            cuts.append(a)
            chosen.append(tables.options(s, seq[s])[k])
        choices.append(CutChoice(low, sorted({*cuts, n}), chosen[::-1]))
    return choices


def _prune(labels: list[tuple], dims: int) -> list[tuple]:
    """Drop the labels another beats (or equals) in each of the first ``dims`` numbers."""
    labels.sort(key=lambda x: x[:dims])
    out: list[tuple] = []
    if dims == 2 or all(lab[_D2] == 0.0 for lab in labels) and dims == 3:
        best = math.inf  # sorted by D0: keep those with a strictly smaller D1
        for lab in labels:
            if lab[_D1] < best:
                out.append(lab)
                best = lab[_D1]
        return out
    for lab in labels:
        if not any(all(o[i] <= lab[i] for i in range(dims)) for o in out):
            out.append(lab)
    return out
