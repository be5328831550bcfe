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
- ``1f1b``: the round trip so far (without stage 0's optimizer step), the largest of the
  terms each stage fixes when it is placed (``path before s + M (F_s + B_s)``, and for its
  cut ``path before + M act + drained grad + F_s + B_s``) and the slowest wire: ``max(that,
  total + (M - 1) wire, rounds total)``, a bound (1F1B has no closed form;
  :func:`partitioners.planner.objective.lower_bound`). ``rounds``: stage 0 holds at most
  ``S`` micro-batches, so micro-batch ``m + S`` starts after micro-batch ``m`` has come back:
  ``(M - 1) // S + 1`` round trips one after the other, then stage 0's backwards of the
  micro-batches left (a fourth number: they depend on stage 0's range). ``drained``: stage ``s`` runs its
  last ``min(S - s - 1, M - 1) + 1`` backwards after the last activation arrived, and their
  gradients cross the wire back one after another
  (:func:`partitioners.planner.objective.drained`); where that wire is slow (a data owner
  behind a thin uplink) this is what the step is.

With ``label_privacy`` the data owner runs the first and the last stage: a label also
carries the owner's first-stage work, memory and host memory, for the last stage to add.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from partitioners.costmodel import StageMethod
from partitioners.planner.objective import drained
from partitioners.planner.request import PlanRequest
from partitioners.planner.tables import CostTables


@dataclass
class CutChoice:
    lower_ms: float  # the schedule's bound (exact where the objective's closed form is)
    bounds: list[int]
    opts: list[StageMethod]


def value(schedule: str, M: int, d0, d1, d2, rounds: int = 1, back0=0.0):
    """The bound of a label's numbers (scalars or arrays); ``rounds``: 1F1B's round trips
    one after the other on stage 0 (:func:`rounds_of`), then ``back0``: stage 0's backwards
    of the micro-batches left after the last round (:func:`back_rounds`)."""
    if schedule == "sequential":
        return d0 + d1
    if schedule == "gpipe":
        return d0 + (M - 1) * (d1 + d2)
    return np.maximum(np.maximum(d1, d0 + (M - 1) * d2), rounds * d0 + back0)


def completed(schedule: str, M: int, rounds: int, d0, d1, d2, f, b, w, busiest, trip=0.0, back0=0.0, finite=False):
    """A bound below every completion of a label (scalars or arrays): the layers left take
    at least ``f`` forward and ``b`` backward per micro-batch, the next cut at least ``w``
    either way, and the busiest of the stages left at least ``busiest`` per micro-batch
    (:meth:`partitioners.planner.bounds.PoolBounds.tail_stage_ms`); the cuts left at least
    ``trip`` both ways together (under 1F1B: the round trip); 0 each where nothing is
    left; inf where the devices left cannot hold the layers left (any of them inf).
    ``back0``: the label's fourth number (:func:`value`). ``finite``: the caller left out
    every end where one of the tail figures is inf (:func:`_finite_ends`)."""
    gone = False if finite else np.isinf(busiest) | np.isinf(w) | np.isinf(f) | np.isinf(b)  # none left holds them
    if np.any(gone):  # (0 there, so that no inf meets a 0 factor)
        f, b, busiest, w, trip = (np.where(gone, 0.0, x) for x in (f, b, busiest, w, trip))
    if schedule == "sequential":
        low = value(schedule, M, d0 + M * f + (M - 1) * (b + w), d1, d2)
    elif schedule == "gpipe":
        n0 = d0 + f + b + w  # the slowest forward and backward resources: the wire is one of them
        low = n0 + (M - 1) * np.maximum(np.maximum(d1 + d2, w), busiest)
    else:
        trip = np.maximum(w, trip)  # the cuts left, both ways: at least one way of one of them
        low = value(
            schedule, M, d0 + f + b + trip, np.maximum(d1, d0 + w + M * busiest), np.maximum(d2, w), rounds, back0
        )
    return np.where(gone, np.inf, low) if np.any(gone) else low


# the layers after each end of a stage: least forward, least backward, the busiest stage's
# least forward and backward, the next cut's least transfer either way, and the cuts left's
# least transfers both ways together (each per end)
Tail = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def back_rounds(schedule: str, M: int, rounds: int, num_stages: int | None) -> int:
    """Under 1F1B, how many of stage 0's backwards follow its last round trip: ``M - 1 - (R -
    1) S`` with ``R = rounds`` (``M - 1`` where the rounds are one: ``S >= M``). Times stage
    0's backward, a label's fourth number (0 for the other schedules, or an unknown
    length). The term of :func:`partitioners.planner.objective.lower_bound` for stage 0."""
    if schedule != "1f1b" or not num_stages:
        return 0
    return M - 1 - (rounds - 1) * num_stages if rounds > 1 else M - 1


def rounds_of(schedule: str, M: int, num_stages: int | None) -> int:
    """Under 1F1B stage 0 holds at most ``S`` micro-batches: micro-batch ``m + S`` starts
    after micro-batch ``m``'s whole round trip, so ``(M - 1) // S + 1`` round trips follow one
    another (the term of :func:`partitioners.planner.objective.lower_bound` for stage 0)."""
    if schedule != "1f1b" or not num_stages:
        return 1
    return (M - 1) // num_stages + 1


def held_back(M: int, K: int, before, beyond, B):
    """1F1B: a stage holds at most ``K = S - s`` micro-batches, so every ``K``-th one waits
    for the round trip beyond it (at least ``beyond``, the stage's own forward and backward
    included): ``(M - 1) // K + 1`` of them one after the other, after the path ``before``
    it, then the backwards of the micro-batches left (the term of
    :func:`partitioners.planner.objective.lower_bound`). It needs the round trip still to
    come, so a label cannot carry it: it only drops labels (with the completion bound)."""
    r = (M - 1) // K
    return before + (r + 1) * beyond + (M - 1 - r * K) * B


def _extend(schedule: str, M: int, s: int, lab: tuple, F, B, Op, la, lg, drain: int = 1) -> tuple:
    """The numbers after one more stage (arrays over its possible ends); ``drain``: 1F1B's
    gradients the stage sends back after its last forward (at least; :func:`drained`)."""
    d0, d1, d2 = lab  # each an array over the labels, (labels, 1): the results are (labels, ends)
    if schedule == "sequential":
        n0 = d0 + M * (F + la) + (M - 1) * (B + lg)
        n1 = B + (Op if s == 0 else np.maximum(d1 + lg, Op))
        return n0, n1, 0.0 * n0
    if schedule == "gpipe":
        if s == 0:
            return F + B + Op + 0.0 * d0, F + 0.0 * d0, B + 0.0 * d0
        return d0 + F + B + la + lg, np.maximum(np.maximum(d1, F), la), np.maximum(np.maximum(d2, B), lg)
    if s == 0:  # the round trip without the optimizer step (the rounds term repeats it)
        return F + B + 0.0 * d0, M * (F + B) + Op + 0.0 * d0, 0.0 * (F + d0)
    base = d0 + la + lg
    n1 = np.maximum(np.maximum(d1, base + M * (F + B)), d0 + M * la + drain * lg + F + B)
    return base + F + B, n1, np.maximum(np.maximum(d2, la), lg) + 0.0 * F


# a label's numbers (rows of :attr:`Frontier.nums`): the three of the schedule's bound, then
# the owner's first stage (U-shape: its work, device bytes, host bytes)
_BACK0, _OWN, _FMEM, _FHOST = 3, 4, 5, 6


@dataclass
class Frontier:
    """The labels after some stages, one column each: the layers they place (where the next
    stage starts), their numbers, and the way back to their plan: the label of the previous
    frontier each extends and the option its last stage takes. Arrays, so that a stage
    extends every label at once and nothing runs per label in Python."""

    pos: np.ndarray  # int, per label
    nums: np.ndarray  # (7, labels): _D0, _D1, _D2, _BACK0, _OWN, _FMEM, _FHOST
    prev: Frontier | None = None  # the frontier before the last stage (None: nothing placed)
    row: np.ndarray | None = None  # per label, its label in ``prev``
    opt: np.ndarray | None = None  # per label, its last stage's option index
    stage: int = -1  # the last stage's index

    def __len__(self) -> int:
        return len(self.pos)

    def take(self, keep: np.ndarray) -> Frontier:
        """The labels ``keep`` (indices or a mask) only."""
        assert self.row is not None and self.opt is not None
        return Frontier(self.pos[keep], self.nums[:, keep], self.prev, self.row[keep], self.opt[keep], self.stage)


class CutSearch:
    """The cut search one stage at a time: a :class:`Frontier` holds the labels after the
    stages placed so far. :func:`best_cuts` runs it over a whole device sequence;
    the device search (:mod:`partitioners.planner.devices`) extends one frontier per prefix
    of devices, so that sequences sharing a prefix share its work.

    ``num_stages`` is the sequence's length when the memory of a stage depends on it (1F1B:
    a stage holds ``S - s`` micro-batches), else None (any length); with ``at_least`` it is
    the least length, and the labels bound every longer sequence too (each stage at the
    fewest micro-batches in flight it can hold, one 1F1B round): a relaxation whose plans
    the caller must list again at their own length."""

    def __init__(self, req: PlanRequest, tables: CostTables, num_stages: int | None, at_least: bool = False):
        self.req, self.tables = req, tables
        self.S = num_stages
        self.at_least = at_least  # ``num_stages`` or more: a relaxation (less memory, one round)
        self.n, self.M = req.n, req.num_micro_batches
        self.schedule = req.schedule
        self.ushape = req.label_privacy
        self.rounds = 1 if at_least else rounds_of(self.schedule, self.M, num_stages)
        self.back0 = back_rounds(self.schedule, self.M, self.rounds, num_stages)

    def start(self) -> Frontier:
        return Frontier(np.zeros(1, int), np.zeros((7, 1)))

    def stage(
        self,
        frontier: Frontier,
        s: int,
        dev: str,
        prev: str | None,
        last: bool,
        bound: float,
        prune: bool = True,
        stages_left: int = 0,
        tail: Tail | None = None,
    ) -> Frontier:
        """The frontier after stage ``s`` on ``dev`` (``prev`` runs stage ``s - 1``): every
        layer range and option that fits, below ``bound``; the last stage ends the chain.
        ``stages_left``: stages still to come after this one (each needs a layer); ``tail``:
        what the stages after it take at least (:func:`completed`), so that a label none of
        whose completions can beat ``bound`` is dropped."""
        tables, n, M, schedule = self.tables, self.n, self.M, self.schedule
        ushape = self.ushape and (s > 0 or not last)
        cap, hcap = tables.capacity(dev), tables.host_capacity(dev)
        opts = tables.options(s, dev)
        # the sequence's length, or the least it can have (1F1B: the fewest micro-batches
        # in flight, the fewest gradients drained: both only grow with the length)
        length = s + 1 + stages_left if self.S is None else self.S
        if self.at_least:
            length = max(length, s + 1 + stages_left)
        inflight = tables.inflight(s, length)
        drain = drained(length, s, M) if s else 1
        hi = n if last else n - stages_left
        # every label that leaves this stage a layer, with each end its stage can reach
        rows_in = np.arange(len(frontier)) if last else np.nonzero(frontier.pos < hi)[0]
        if not len(rows_in):
            return self._empty(frontier, s)
        A = frontier.pos[rows_in]
        cols = frontier.nums[:, rows_in]
        links = tables.link_table(prev, dev) if prev is not None else np.zeros((n + 1, 2))
        lo = np.full(len(A), n) if last else A + 1  # the first end each label may take
        if s == 0 and not last:  # privacy: the owner's first stage keeps its minimum of layers
            lo = np.maximum(lo, self.req.min_owner_front)
        if ushape and last:  # and the U's last stage its minimum
            lo = np.where(n - A >= self.req.min_owner_tail, lo, n + 1)
        first = ushape and s == 0
        after = tail(np.arange(n + 1)) if tail is not None and not last else None
        ends_ok = None
        if after is not None:  # ends none of whose completions fit (a tail figure inf) are left out first
            lo, ends_ok = _finite_ends(after, lo)
        out_pos, out_nums, out_row, out_opt = [], [], [], []
        for k, o in enumerate(opts):
            rows, ends, a, F, B, Op = _option_pairs(tables, dev, inflight, o, A, lo, hi, ends_ok)
            mem = tables.dev_table(dev, inflight, o)[a, ends]
            host_c = tables.host_cum(dev, o)
            host = host_c[ends] - host_c[a] if ushape or host_c.any() else None  # None: no host bytes
            if ushape and last:
                ok = (cols[_FMEM][rows] + mem <= cap) & (cols[_FHOST][rows] + host <= hcap)
            else:
                ok = mem <= cap if host is None else (mem <= cap) & (host <= hcap)
            d = (cols[0][rows], cols[1][rows], cols[2][rows])
            n0, n1, n2 = _pairs(_extend(schedule, M, s, d, F, B, Op, links[a, 0], links[a, 1], drain), ok)
            back0 = self.back0 * B if s == 0 else cols[_BACK0][rows]
            own = M * (F + B) + Op if ushape else None
            if after is not None:  # the completions' bound: at least the labels' own (each term only grows)
                tf, tb, busy, w, trip = (x[ends] for x in after)
                low = completed(schedule, M, self.rounds, n0, n1, n2, tf, tb, w, busy, trip, back0, finite=True)
                if schedule == "1f1b" and self.S is not None and not self.at_least:
                    beyond = F + B + tf + tb + np.maximum(w, trip)  # the round trip from this stage on
                    low = np.maximum(low, held_back(M, self.S - s, n0 - F - B, beyond, B))
            else:
                low = value(schedule, M, n0, n1, n2, self.rounds, back0)
                if ushape and last:
                    low = np.maximum(low, cols[_OWN][rows] + own)
            keep = np.flatnonzero(ok & (low < bound))
            if not len(keep):
                continue
            if first:  # the owner's first stage: its work and memory, for the U's last stage
                assert own is not None and host is not None
                owner = np.stack([own[keep], mem[keep], host[keep]])
            else:
                owner = cols[_OWN:, rows[keep]]
            out_pos.append(ends[keep])
            out_nums.append(np.concatenate([np.stack([n0[keep], n1[keep], n2[keep], back0[keep]]), owner]))
            out_row.append(rows_in[rows[keep]])
            out_opt.append(np.full(len(keep), k))
        if not out_pos:
            return self._empty(frontier, s)
        nxt = Frontier(
            np.concatenate(out_pos), np.concatenate(out_nums, axis=1), frontier,
            np.concatenate(out_row), np.concatenate(out_opt), s,
        )  # fmt: skip
        # the last stage's labels are final: ranked by their whole bound (with the owner's term)
        return nxt.take(undominated(nxt.pos, nxt.nums[: 7 if ushape else 4])) if prune and not last else nxt

    @staticmethod
    def _empty(frontier: Frontier, s: int) -> Frontier:
        return Frontier(np.zeros(0, int), np.zeros((7, 0)), frontier, np.zeros(0, int), np.zeros(0, int), s)

    def finals(self, frontier: Frontier, seq: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The complete labels of ``seq``: their bounds, smallest first, and their indices."""
        S, n, M = len(seq), self.n, self.M
        rows = np.nonzero(frontier.pos == n)[0]
        nums = frontier.nums[:, rows]
        low = np.asarray(value(self.schedule, M, nums[0], nums[1], nums[2], self.rounds, nums[_BACK0]), float)
        if self.ushape and S > 1 and len(rows):
            # the owner's two stages one after the other: the last one's work from its range
            assert frontier.prev is not None and frontier.row is not None and frontier.opt is not None
            a = frontier.prev.pos[frontier.row[rows]]
            for k, o in enumerate(self.tables.options(S - 1, seq[-1])):
                f, b, op = self.tables.parts(seq[-1], o)
                on = frontier.opt[rows] == k
                work = nums[_OWN] + M * (f[n] - f[a] + b[n] - b[a]) + op[n] - op[a]
                low = np.where(on, np.maximum(low, work), low)
        order = np.argsort(low, kind="stable")
        return low[order], rows[order]

    def arrays(self, lows: np.ndarray, rows: np.ndarray, frontier: Frontier) -> CutArrays:
        """The plans of labels ``rows`` of ``frontier`` (bounds ``lows``) as arrays, each
        followed back to the first stage at once (:meth:`choice`, for many)."""
        starts, opts = [], []
        i = rows
        while frontier.prev is not None:
            assert frontier.row is not None and frontier.opt is not None
            opts.append(frontier.opt[i])
            i = frontier.row[i]
            frontier = frontier.prev
            starts.append(frontier.pos[i])
        K = len(rows)
        bounds = np.concatenate([np.stack(starts[::-1], axis=1), np.full((K, 1), self.n)], axis=1)
        return CutArrays(np.asarray(lows, float), bounds.astype(int), np.stack(opts[::-1], axis=1).astype(int))

    def choice(self, low: float, i: int, frontier: Frontier, seq: list[str]) -> CutChoice:
        """The plan of label ``i`` of ``frontier``, followed back to the first stage."""
        cuts, chosen = [], []
        while frontier.prev is not None:
            assert frontier.row is not None and frontier.opt is not None
            s, k, i = frontier.stage, int(frontier.opt[i]), int(frontier.row[i])
            frontier = frontier.prev
            cuts.append(int(frontier.pos[i]))
            chosen.append(self.tables.options(s, seq[s])[k])
        return CutChoice(float(low), sorted({*cuts, self.n}), chosen[::-1])


def best_cuts(
    req: PlanRequest,
    tables: CostTables,
    seq: list[str],
    bound: float,
    top: int = 1,
    prune: bool = True,
    max_labels: int = 0,
    tail: Callable[[list[str], int], Tail] | None = None,
) -> list[CutChoice] | None:
    """Up to ``top`` choices of cuts and methods for ``seq`` with the smallest bound below
    ``bound``, smallest first (empty: nothing fits, or nothing beats ``bound``). Every option
    of every stage is tried for each of its layer ranges. ``prune`` off keeps every label
    below ``bound``, not only those no other beats: every plan of the sequence whose bound
    is below ``bound`` (the bound ranks plans; the step may rank them otherwise); None when
    a stage has more than ``max_labels`` (0: no limit). ``tail(seq, s)``: what the stages
    after stage ``s`` take at least (labels that cannot beat ``bound`` are dropped early)."""
    S = len(seq)
    search = CutSearch(req, tables, S)
    frontier = search.start()
    for s in range(S):
        last = s == S - 1
        after = tail(seq, s) if tail is not None and not last else None
        frontier = search.stage(
            frontier, s, seq[s], seq[s - 1] if s else None, last, bound, prune, stages_left=S - s - 1, tail=after
        )
        if max_labels and len(frontier) > max_labels:
            return None
        if not len(frontier):
            return []
    lows, rows = search.finals(frontier, seq)
    return [
        search.choice(low, i, frontier, seq) for low, i in zip(lows[:top].tolist(), rows[:top].tolist(), strict=True)
    ]


def _pairs(numbers: tuple, like: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stage's three new numbers, each an array shaped as ``like`` (one per pair)."""
    if all(isinstance(x, np.ndarray) and x.shape == like.shape for x in numbers):
        return numbers
    a, b, c = np.broadcast_arrays(*numbers, like)[:3]
    return a, b, c


def _finite_ends(after: tuple, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The ends whose tail figures (:data:`Tail`, each over every end) are all finite: a
    label's first end moved up to the first such end, and a mask of them where some later
    end is not (None: all are). An end with an inf figure has every completion's bound inf
    (:func:`completed`), so it would be dropped anyway."""
    ok = np.isfinite(after[0] + after[1] + after[2] + after[3] + after[4])
    if not ok.any():
        return np.maximum(lo, len(ok)), None
    first = int(np.argmax(ok))
    return np.maximum(lo, first), None if ok[first:].all() else ok


def _option_pairs(
    tables: CostTables,
    dev: str,
    inflight: int,
    o: StageMethod,
    starts: np.ndarray,
    lo: np.ndarray,
    hi: int | np.ndarray,
    ends_ok: np.ndarray | None,
) -> tuple[np.ndarray, ...]:
    """A stage on ``dev`` under option ``o``: its (label row, end) pairs within the stage's
    reach (and, with ``ends_ok``, only ends some completion can follow), each pair's start
    and its forward, backward and optimizer times per micro-batch."""
    rows, ends = spans(lo, np.minimum(tables.reach(dev, inflight, o)[starts], hi))
    if ends_ok is not None:
        rows, ends = rows[ends_ok[ends]], ends[ends_ok[ends]]
    a = starts[rows]
    f, bw, op = tables.parts(dev, o)
    return rows, ends, a, f[ends] - f[a], bw[ends] - bw[a], op[ends] - op[a]


def spans(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every ``(row, end)`` with ``lo[row] <= end <= hi[row]``, as two flat arrays: a
    label's ends as far as its stage can reach, and no further (the searches compute on
    these pairs, not on every label against every end)."""
    counts = np.maximum(hi - lo + 1, 0)
    rows = np.repeat(np.arange(len(lo)), counts)
    first = np.cumsum(counts) - counts
    return rows, lo[rows] + np.arange(len(rows)) - first[rows]


WINDOW = 4  # each label is held against this many labels just before it (and two prefix bests)


def undominated(pos: np.ndarray, nums: np.ndarray) -> np.ndarray:
    """Indices of labels to keep: a label another of its position beats (or equals) in
    every number is dropped where one of a few candidates shows it, the rest are kept (a
    kept dominated label costs time, never a plan).

    Sorted by position, then the numbers in order, a label can only be beaten by one
    before it. The candidates: the ``WINDOW`` labels just before it, and those before it
    with the least second and the least third number (a prefix minimum of their ranks,
    all in arrays)."""
    L = len(pos)
    if L < 2:
        return np.arange(L)
    order = np.lexsort((*nums[::-1], pos))
    v, p = nums[:, order], pos[order]
    dominated = np.zeros(L, bool)
    for k in range(1, min(WINDOW, L - 1) + 1):  # each label against the one k before it (views, no copies)
        dominated[k:] |= (p[:-k] == p[k:]) & (v[:, :-k] <= v[:, k:]).all(axis=0)
    group = np.cumsum(np.r_[True, p[1:] != p[:-1]])  # 1, 2, ... per position, ascending
    offset = (group[-1] - group) * L  # earlier groups higher: a running minimum restarts per group
    for dim in (1, 2):
        ranked = np.lexsort((*[v[x] for x in range(len(v) - 1, -1, -1) if x != dim], v[dim]))
        rank = np.empty(L, int)
        rank[ranked] = np.arange(L)
        j = ranked[np.minimum.accumulate(offset + rank)[:-1] % L]  # the best up to the label before each
        dominated[1:] |= (p[j] == p[1:]) & (v[:, j] <= v[:, 1:]).all(axis=0)
    return np.sort(order[~dominated])


@dataclass
class CutArrays:
    """Plans of one sequence as arrays: per plan its bound, its stage bounds (``plans x
    (S + 1)``) and each stage's option index (``plans x S``)."""

    lower_ms: np.ndarray
    bounds: np.ndarray
    opts: np.ndarray

    def choice(self, i: int, tables: CostTables, seq: list[str]) -> CutChoice:
        opts = [tables.options(s, d)[int(k)] for s, (d, k) in enumerate(zip(seq, self.opts[i], strict=True))]
        return CutChoice(float(self.lower_ms[i]), [int(b) for b in self.bounds[i]], opts)


def every_cut(
    req: PlanRequest,
    tables: CostTables,
    seq: list[str],
    bound: float,
    max_labels: int,
    tail: Callable[[list[str], int], Tail] | None = None,
) -> CutArrays | None:
    """Every plan of ``seq`` (each device once: no U-shape) whose bound is below ``bound``,
    as arrays (:class:`CutArrays`): the labels of :class:`CutSearch` without pruning, one
    array each, so that nothing runs per plan in Python. None when a stage has more than
    ``max_labels`` of them."""
    assert len(set(seq)) == len(seq), "every_cut: a device runs one stage"
    S, n, M, schedule = len(seq), req.n, req.num_micro_batches, req.schedule
    rounds = rounds_of(schedule, M, S)
    back = back_rounds(schedule, M, rounds, S)
    P = np.zeros(1, int)
    D = np.zeros((4, 1))
    Hist = np.zeros((1, 1), int)
    Kopt = np.zeros((1, 0), int)
    for s, dev in enumerate(seq):
        last = s == S - 1
        hi = n if last else n - (S - s - 1)
        if not len(P):
            return CutArrays(np.zeros(0), np.zeros((0, S + 1), int), np.zeros((0, S), int))
        links = tables.link_table(seq[s - 1], dev) if s else np.zeros((n + 1, 2))
        cap, hcap = tables.capacity(dev), tables.host_capacity(dev)
        inflight = tables.inflight(s, S)
        drain = drained(S, s, M) if s else 1
        after = tail(seq, s)(np.arange(n + 1)) if tail is not None and not last else None
        # the first end each label may take (the last stage: only the whole model's end)
        lo = np.full(len(P), n) if last else P + 1
        if s == 0 and not last:  # privacy: the owner's first stage keeps its minimum of layers
            lo = np.maximum(lo, req.min_owner_front)
        ends_ok = None
        if after is not None:  # ends none of whose completions fit (a tail figure inf) are left out first
            lo, ends_ok = _finite_ends(after, lo)
        parts_p, parts_d, parts_h, parts_o = [], [], [], []
        for k, o in enumerate(tables.options(s, dev)):
            rows, ends, a, F, B, Op = _option_pairs(tables, dev, inflight, o, P, lo, hi, ends_ok)
            host_c = tables.host_cum(dev, o)
            ok = tables.dev_table(dev, inflight, o)[a, ends] <= cap
            if host_c.any():
                ok &= host_c[ends] - host_c[a] <= hcap
            d = (D[0][rows], D[1][rows], D[2][rows])
            la, lg = links[a, 0], links[a, 1]
            n0, n1, n2 = _pairs(_extend(schedule, M, s, d, F, B, Op, la, lg, drain), ok)
            back0 = back * B if s == 0 else D[3][rows]
            if after is not None:  # the completions' bound: at least the labels' own (each term only grows)
                tf, tb, busy, w, trip = (x[ends] for x in after)
                low = completed(schedule, M, rounds, n0, n1, n2, tf, tb, w, busy, trip, back0, finite=True)
                if schedule == "1f1b":
                    beyond = F + B + tf + tb + np.maximum(w, trip)
                    low = np.maximum(low, held_back(M, S - s, n0 - F - B, beyond, B))
            else:
                low = value(schedule, M, n0, n1, n2, rounds, back0)
            keep = np.flatnonzero(ok & (low < bound))
            rows, ends, n0, n1, n2, back0 = (x[keep] for x in (rows, ends, n0, n1, n2, back0))
            parts_p.append(ends)
            parts_d.append(np.stack([n0, n1, n2, back0]))
            parts_h.append(np.concatenate([Hist[rows], ends[:, None]], axis=1))
            parts_o.append(np.concatenate([Kopt[rows], np.full((len(rows), 1), k)], axis=1))
        P = np.concatenate(parts_p)
        D = np.concatenate(parts_d, axis=1)
        Hist = np.concatenate(parts_h)
        Kopt = np.concatenate(parts_o)
        if len(P) > max_labels:
            return None
    low = value(schedule, M, D[0], D[1], D[2], rounds, D[3])
    order = np.argsort(low, kind="stable")
    return CutArrays(low[order], Hist[order], Kopt[order])
