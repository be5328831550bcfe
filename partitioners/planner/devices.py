"""The device search of ``optimal``: which devices run stages, in which order.

Branch and bound over device sequences. A node is a prefix of devices (a data owner first)
with the cut search's frontier after it (:class:`~partitioners.planner.cuts.CutSearch`):
its labels' bounds only grow as stages are added, and what the stages still to come take
at least (:meth:`DeviceSearch.tail`: the layers left at their fastest, the busiest stage on
the devices left, the next cut, the slowest wire the layers left need and the round trip of
the cuts left, :mod:`partitioners.planner.bounds`) is added to them, so a node whose
smallest such bound is not below the best step found is cut off with everything under it;
so is a label whose every completion is (inside the cut search). Devices that cannot be told apart
(the same kind, memory, speed and zone, and no link of their own) are interchangeable: a
node tries one of each class. Children are tried in the order of their bounds, so a good
plan is found early and prunes the rest.

Each complete sequence hands its best-ranked plans to be checked (``check``). When the
node budget runs out, the nodes left unexpanded keep their bounds: no plan under them
steps faster than the smallest (``open_low``); so do they past the deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from partitioners.planner.bounds import PoolBounds
from partitioners.planner.cuts import CutArrays, CutChoice, CutSearch, Frontier, Tail, completed, rounds_of
from partitioners.planner.request import IDENTICAL_FIELDS, PlanRequest
from partitioners.planner.tables import CostTables

LARGE_POOL = 16  # past this many devices left, tail bounds take the whole pool (computed once)


def device_class(req: PlanRequest, name: str) -> tuple:
    """What a device is to the planner: its figures, zone and data ownership; a device with
    links of its own (a pair entry) is a class alone."""
    topo = req.topology
    d = topo.device(name)
    own_links = any(name in (e.a, e.b) for e in topo.links.pairs)
    return (*(getattr(d, f) for f in IDENTICAL_FIELDS), d.zone, d.owns_data, name if own_links else "")


def _everywhere(tail: Tail, n: int) -> Tail:
    """``tail`` computed at every position once, the first time it is asked, then looked up."""
    full: list[tuple[np.ndarray, ...]] = []

    def at(bs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not full:
            full.append(tuple(np.broadcast_to(x, (n + 1,)) for x in tail(np.arange(n + 1))))
        f, b, busiest, w, trip = full[0]
        return f[bs], b[bs], busiest[bs], w[bs], trip[bs]

    return at


@dataclass
class FoundSequence:
    """A complete device sequence and the smallest bound of its plans."""

    devices: list[str]
    lower_ms: float


class DeviceSearch:
    """``pool``: the devices to search over (default: the request's); ``bounds`` leaves out
    the devices and links that cannot take part in a plan faster than the best step
    (:mod:`partitioners.planner.bounds`)."""

    def __init__(
        self,
        req: PlanRequest,
        tables: CostTables,
        check: Callable[[list[str], list[CutChoice] | CutArrays], None],
        step: Callable[[], float],
        top: int,
        max_nodes: int,
        deadline: float = float("inf"),
        bounds: PoolBounds | None = None,
        pool: list[str] | None = None,
    ):
        self.req, self.tables = req, tables
        self.check, self.step, self.top = check, step, top
        self.nodes_left = max_nodes
        self.deadline = deadline  # time.monotonic() past which no node is expanded
        self.open_low = float("inf")
        self.sequences: list[FoundSequence] = []
        self.pool = list(pool if pool is not None else req.pool)
        self.bounds = bounds or PoolBounds(req, tables, self.pool)
        self.classes: dict[tuple, list[str]] = {}
        for d in self.pool:
            self.classes.setdefault(device_class(req, d), []).append(d)
        self.rest = self._rest_table()
        self._cache: dict[tuple, np.ndarray] = {}
        self._fast: dict[float, list[str]] = {}
        self._tails: dict[tuple, Tail] = {}

    def _rest_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Per cut position, the least forward and backward time the layers after it take:
        each layer at its fastest on any device of the pool, under any of its options."""
        f_min = np.min([self.bounds.f[d] for d in self.pool], axis=0)
        b_min = np.min([self.bounds.b[d] for d in self.pool], axis=0)
        tail_f = np.concatenate([np.cumsum(f_min[::-1])[::-1], [0.0]])
        tail_b = np.concatenate([np.cumsum(b_min[::-1])[::-1], [0.0]])
        return tail_f, tail_b

    def _free(self, prefix: list[str]) -> list[str]:
        """The devices the stages after ``prefix`` may run on (with ``label_privacy`` the
        data owner's last stage too)."""
        step = self.step()
        if step not in self._fast:  # the devices fast enough alone, once per best step
            self._fast = {step: [d for d in self.pool if self.bounds.device_ms(d) < step]}
        placed = set(prefix)
        out = [d for d in self._fast[step] if d not in placed]
        if self.req.label_privacy and prefix:
            out.append(prefix[0])
        return out

    def tail(self, prefix: list[str], free: int, least: int = 1) -> Tail:
        """:meth:`_tail`, once per prefix (and best step): a node, each of its children's
        cuts and each child's own bound ask for the same one."""
        key = (tuple(prefix), free, least, self.step())
        if key not in self._tails:
            self._tails[key] = _everywhere(self._tail(prefix, free, least), self.req.n)
        return self._tails[key]

    def _tail(self, prefix: list[str], free: int, least: int) -> Tail:
        """What the at most ``free`` stages after ``prefix`` take at least, per position of
        the cut after it (:func:`~partitioners.planner.cuts.completed`): the layers left at
        their fastest; the busiest of those stages at least :meth:`PoolBounds.tail_stage_ms`
        on the devices left; the next cut at least the cheapest wire from the last device to
        one of them, and some cut at least :meth:`PoolBounds.crossing_ms` (the round trip
        grows by one of the two, and the slowest wire is at least the larger); and where
        few devices are left, each of the at least ``least`` cuts still to come at least the
        cheapest round trip between two of them (or from the last device)."""
        M = self.req.num_micro_batches
        tail_f, tail_b = self.rest
        devs = self._free(prefix)
        if not devs:
            none = np.full(self.req.n + 1, np.inf)
            return lambda bs: (none[bs], none[bs], none[bs], none[bs], none[bs])
        w = min(self.bounds.wire_ms(prefix[-1], d) for d in devs) / M  # per micro-batch, either way
        k = max(free, 1)
        last = prefix[-1]
        if len(devs) > LARGE_POOL:  # the whole pool instead of what is left (more devices: below), once
            everyone = np.arange(self.req.n + 1)
            if ("busiest", k) not in self._cache:
                self._cache[("busiest", k)] = self.bounds.tail_stage_ms(everyone, self.pool, k)
            if ("crossing", last) not in self._cache:
                self._cache[("crossing", last)] = self.bounds.crossing_ms(last, self.pool, everyone)
            lam, cross = self._cache[("busiest", k)], self._cache[("crossing", last)]

            def after(bs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
                f, b = tail_f[bs], tail_b[bs]
                return f, b, np.maximum(lam[bs], (f + b) / k), np.maximum(w, cross[bs] / M), 0.0 * f

            return after

        hop = self.bounds.hop_ms(last, devs) / M  # per micro-batch, both ways
        n = self.req.n

        def exact(bs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            f, b = tail_f[bs], tail_b[bs]
            busiest = np.maximum(self.bounds.tail_stage_ms(bs, devs, k), (f + b) / k)
            crossing = self.bounds.crossing_ms(last, devs, bs) / M  # some cut's slower wire
            return f, b, busiest, np.maximum(w, crossing), np.where(bs < n, least * hop, 0.0)

        return exact

    def node_low(self, frontier: Frontier, free: int, prefix: list[str], S: int | None = None, to: str = "") -> float:
        """A bound below every plan that extends this frontier (``prefix`` placed) with at
        most ``free`` more stages (:meth:`tail`); ``to``: the next stage's device, whose cut
        from the last device is then known."""
        if not len(frontier):
            return float("inf")
        M, schedule = self.req.num_micro_batches, self.req.schedule
        pos = frontier.pos
        f, b, busiest, w, trip = self.tail(prefix, free, free if S else 1)(pos)  # looked up per label
        if to:
            w = np.maximum(w, self.tables.link_table(prefix[-1], to)[pos].max(axis=1))
        d0, d1, d2, back0 = frontier.nums[:4]
        rounds = rounds_of(schedule, M, S)
        low = completed(schedule, M, rounds, d0, d1, d2, f, b, w, busiest, trip, back0)
        return float(low.min())

    def run(self) -> None:
        req = self.req
        owners = [d for d in self.pool if req.topology.device(d).owns_data]
        extra = 1 if req.label_privacy else 0
        longest = min(req.n, len(self.pool) + extra)
        # under 1F1B a stage's memory depends on how many stages follow: one search per length,
        # up to the micro-batches' count; past it one search for every longer length at once
        # (its memory as the fewest stages hold, one round: a bound), whose sequences are then
        # listed at their own length (``sequences``)
        lengths: list[tuple[int | None, bool]] = [(None, False)]
        if req.schedule == "1f1b":
            cutoff = min(longest, req.num_micro_batches + 1 + extra)
            lengths = [(S, False) for S in range(1 + extra, cutoff + 1)]
            lengths += [(cutoff + 1, True)] if longest > cutoff else []
        for S, at_least in lengths:
            for owner in owners:
                search = CutSearch(req, self.tables, S, at_least)
                start = search.start()
                if not req.label_privacy and S in (None, 1):
                    self._close(search, [], start, owner, 0)
                if S == 1 or req.n < 2:
                    continue
                left = S - 1 if S is not None else 1
                mid = search.stage(start, 0, owner, None, False, self.step(), stages_left=min(left, req.n - 1))
                if mid:
                    self._node(search, [owner], mid, S)

    def _children(self, used: list[str]) -> list[str]:
        """One unused device of each class, where the bounds let it follow the last device."""
        step, b = self.step(), self.bounds
        out = []
        for members in self.classes.values():
            free = [d for d in members if d not in used]
            if free and b.device_ms(free[0]) < step and b.wire_ms(used[-1], free[0]) < step:
                out.append(free[0])
        return out

    def _close(self, search: CutSearch, prefix: list[str], frontier: Frontier, dev: str, s: int) -> None:
        """``dev`` runs the last stage after ``prefix``: a complete sequence."""
        seq = [*prefix, dev]
        last = search.stage(frontier, s, dev, prefix[-1] if prefix else None, True, self.step())
        lows, rows = search.finals(last, seq)
        if not len(lows):
            return
        self.sequences.append(FoundSequence(seq, float(lows[0])))
        if search.at_least:  # relaxed labels: the plans are listed again at their own length
            return
        top = np.nonzero(lows[: self.top] < self.step())[0]
        if len(top):
            self.check(seq, search.arrays(lows[top], rows[top], last))

    def _node(self, search: CutSearch, prefix: list[str], mid: Frontier, S: int | None) -> None:
        """``mid``: the frontier with every device of ``prefix`` placed (none of them the
        last stage). Close the sequence with one more device (the owner, for a U), then grow
        it by one device of each class, the most promising first."""
        req = self.req
        s = len(prefix)  # the next stage's index
        fixed = S is not None and not search.at_least  # the length, else at least S or any
        # stages still to come: all of them when the length is fixed, else at most every device left
        free = S - len(prefix) if fixed and S is not None else len(self.pool) - len(prefix) + req.label_privacy
        R = S if fixed else None  # for 1F1B's rounds
        low = self.node_low(mid, free, prefix, R)
        if low >= self.step():
            return
        if self.nodes_left <= 0 or time.monotonic() > self.deadline:
            self.open_low = min(self.open_low, low)
            return
        self.nodes_left -= 1
        kids = self._children(prefix)
        if S is None or S == s + 1 or (search.at_least and s + 1 >= S):
            for d in [prefix[0]] if req.label_privacy else kids:
                self._close(search, prefix, mid, d, s)
        if fixed and S is not None and s + 1 >= S:
            return
        # stages after the next one (each needs a layer): all of them, or at least one
        left = S - s - 1 if fixed and S is not None else max(S - s - 1, 1) if S is not None else 1
        if s + 1 + left > req.n:
            return
        grown = []
        for d in kids:
            if self.node_low(mid, free, prefix, R, to=d) >= self.step():  # its cut alone is too slow
                continue
            after = self.tail([*prefix, d], free - 1, free - 1 if fixed else 1)
            nxt = search.stage(mid, s, d, prefix[-1], False, self.step(), stages_left=left, tail=after)
            if nxt:
                grown.append((self.node_low(nxt, free - 1, [*prefix, d], R), d, nxt))
        grown.sort(key=lambda x: x[0])
        for child_low, d, nxt in grown:
            if child_low < self.step():
                self._node(search, [*prefix, d], nxt, S)
