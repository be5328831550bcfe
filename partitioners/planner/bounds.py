"""Bounds that hold for every plan, whatever its devices, order and cuts: which devices and
links a plan stepping faster than a given step can use at all, and how fast the layers still
to place can go on the devices left. The device search (:mod:`partitioners.planner.devices`)
prunes with them.

Each rests on the simulator's rules (:mod:`partitioners.simulator`): a device runs its
actions one at a time, and a wire carries one transfer at a time. So, whatever else a plan
does,

- a device that runs a stage is busy for ``M`` forwards and backwards of at least one layer:
  the step is at least ``M`` times the device's cheapest layer;
- a cut between two devices puts ``M`` activations on one wire and ``M`` gradients on the
  other: the step is at least ``M`` times the slower of the two transfers of the smallest
  activation any cut sends;
- each cut still to come adds both its transfers to a micro-batch's round trip: at least the
  cheapest round trip between two of the devices left (:meth:`PoolBounds.hop_ms`);
- the layers after a cut need at least their fastest time on the devices left, and the
  busiest of those devices works at least ``lam`` per micro-batch, the smallest figure for
  which the devices left can take those layers: each at most ``lam`` of work (counted at the
  fastest device's speed, scaled by how much slower it is at best) and at most what fits its
  memory (:meth:`PoolBounds.tail_stage_ms`).

A device or link whose figure is not below the best step found can therefore be left out of
the search without losing a faster plan.
"""

from __future__ import annotations

import numpy as np

from partitioners.planner.cuts import Tail
from partitioners.planner.request import PlanRequest
from partitioners.planner.tables import CostTables

EXACT_DEVICES = 6  # up to this many devices left, the busiest stage's bound is solved exactly (else bisection)


def _least_lam(need: np.ndarray, inv: np.ndarray, cap: np.ndarray, k: int) -> np.ndarray:
    """Per position (a column of ``cap``): the smallest ``lam`` at which the ``k`` largest of
    ``min(lam inv[d], cap[d])`` sum to ``need`` (where they can: the caller checks). That sum
    is piecewise linear in ``lam``: it bends only where one device's line meets another's
    memory, ``lam = cap[e] / inv[d]`` (its own cap: where it stops growing; another's: where
    the ``k`` largest may change), so it is evaluated at those points and solved on the
    piece between the two that straddle ``need``."""
    m, P = cap.shape
    cand = cap[None, :, :] / inv[:, None, None] if k < m else cap / inv[:, None]
    cand = np.sort(
        np.where(np.isfinite(cand), cand, 0.0).reshape(-1, P), axis=0
    )  # (candidates, positions), ascending per position
    per = np.minimum(cand[:, None, :] * inv[None, :, None], cap[None, :, :])  # (candidates, devices, positions)
    if k == 1:  # the k largest: the largest, all but the least, or a partition
        held = per.max(axis=1)
    elif k == m - 1:
        held = per.sum(axis=1) - per.min(axis=1)
    elif k < m:
        held = (-np.partition(-per, k - 1, axis=1)[:, :k]).sum(axis=1)
    else:
        held = per.sum(axis=1)  # nondecreasing along the candidates
    j = (held < need[None, :]).sum(axis=0)  # the first candidate holding the need (<= its count: checked)
    j = np.minimum(j, len(cand) - 1)
    cols = np.arange(P)
    hi_lam, hi_held = cand[j, cols], held[j, cols]
    lo_lam = np.where(j > 0, cand[np.maximum(j - 1, 0), cols], 0.0)
    lo_held = np.where(j > 0, held[np.maximum(j - 1, 0), cols], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(hi_held > lo_held, (need - lo_held) / (hi_held - lo_held), 1.0)
    return lo_lam + np.clip(frac, 0.0, 1.0) * (hi_lam - lo_lam)


def stage_kinds(req: PlanRequest) -> set[int]:
    """Stage indices whose options cover every stage's: stage 0, stage 1 (any stage the
    policy names not), and those ``finetune.by_stage`` names."""
    return {0, 1, *(k for k in ((req.finetune.by_stage if req.finetune else {}) or {}) if k < req.n)}


class PoolBounds:
    """Per device its fastest forward and backward of each layer (over every option), its
    cheapest layer and the most layers' work it can hold; per pair of devices the slowest
    wire of their cheapest cut."""

    def __init__(self, req: PlanRequest, tables: CostTables, pool: list[str] | None = None):
        self.req, self.tables = req, tables
        self.M = req.num_micro_batches
        self.pool = list(pool if pool is not None else req.pool)
        kinds = stage_kinds(req)
        self.f: dict[str, np.ndarray] = {}  # per device: each layer's least forward (any option)
        self.b: dict[str, np.ndarray] = {}
        least: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # devices of one kind share theirs
        for d in self.pool:
            opts = tuple(o for s in kinds for o in tables.options(s, d))
            key = (tables.kind(d), opts)
            if key not in least:
                f = np.full(req.n, np.inf)
                b = np.full(req.n, np.inf)
                for o in opts:
                    pf, pb, _ = tables.parts(d, o)
                    f = np.minimum(f, np.diff(pf))
                    b = np.minimum(b, np.diff(pb))
                least[key] = f, b
            self.f[d], self.b[d] = least[key]
        self.cheapest = {d: float(np.min(self.f[d] + self.b[d])) if req.n else 0.0 for d in self.pool}
        # the reference: each layer at its fastest on any device of the pool
        fb = np.array([self.f[d] + self.b[d] for d in self.pool]) if self.pool else np.zeros((1, req.n))
        self.ref = fb.min(axis=0)
        self.ref_tail = np.concatenate([np.cumsum(self.ref[::-1])[::-1], [0.0]])  # [a] -> layers a.. at the reference
        # how much slower than the reference a device is at best, over the layers
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(self.ref > 0, fb / np.where(self.ref > 0, self.ref, 1.0), 1.0)
        self.slow = {d: float(ratio[i].min()) if req.n else 1.0 for i, d in enumerate(self.pool)}
        self.min_cut_bytes = min(tables.cut_bytes[: req.n - 1]) if req.n > 1 else 0.0
        self._wire: dict[tuple, float] = {}
        self._cap: dict[str, np.ndarray] = {}
        self._groups: dict[str, tuple] = {}
        # per set of devices left (and the last device, or the stages left): the bound at every position
        self._crossing: dict[tuple, np.ndarray] = {}
        self._busiest: dict[tuple, np.ndarray] = {}
        self._sig: dict[str, int] = {}  # per device, the id of its pace and capacity (:meth:`signature`)
        self._sig_ids: dict[tuple, int] = {}
        self._hop: dict[tuple, float] = {}

    # -- devices and links --------------------------------------------------------------

    def device_ms(self, d: str) -> float:
        """A bound below the step of every plan that runs a stage on ``d``."""
        return self.M * self.cheapest[d]

    def _link_key(self, u: str, v: str) -> tuple:
        gu, gv = self._group(u), self._group(v)
        if gu[0] == "device" or gv[0] == "device":  # a link of its own: this pair alone
            return (u, v)
        return (gu[1], gv[1], u == v)

    def wire_ms(self, u: str, v: str) -> float:
        """A bound below the step of every plan with a cut from ``u`` to ``v``: ``M``
        transfers on the slower of its two wires, of the smallest activation any cut sends."""
        pair = (u, v)
        if pair not in self._wire:
            key = self._link_key(u, v)
            if key not in self._wire:
                t, nbytes = self.tables, self.min_cut_bytes
                self._wire[key] = self.M * max(t.transfer_ms(u, v, nbytes), t.transfer_ms(v, u, nbytes))
            self._wire[pair] = self._wire[key]
        return self._wire[pair]

    def hop_ms(self, last: str, free: list[str]) -> float:
        """``M`` times the cheapest round trip (activation there, gradient back) of the
        smallest activation any cut sends between two devices of ``free``, or from
        ``last`` to one of them: below what each cut of a completion after ``last`` on
        ``free`` adds to the round trip (once per ``last`` and ``free``)."""
        key = (last, tuple(free))
        if key not in self._hop:
            t, nbytes = self.tables, self.min_cut_bytes
            pairs = [(u, v) for u in dict.fromkeys([last, *free]) for v in free if u != v or u == last]
            self._hop[key] = self.M * min(t.transfer_ms(u, v, nbytes) + t.transfer_ms(v, u, nbytes) for u, v in pairs)
        return self._hop[key]

    def usable(self, step: float) -> list[str]:
        """The devices a plan stepping below ``step`` may use: those whose cheapest layer
        allows it, reached from a data owner over links that allow it."""
        topo = self.req.topology
        ok = [d for d in self.pool if self.device_ms(d) < step]
        reached = [d for d in ok if topo.device(d).owns_data]
        seen = set(reached)
        todo = list(reached)
        while todo:
            u = todo.pop()
            for v in ok:
                if v not in seen and self.wire_ms(u, v) < step:
                    seen.add(v)
                    todo.append(v)
        return [d for d in self.pool if d in seen]

    def admits(self, seq: list[str], step: float) -> bool:
        """Whether a plan on ``seq`` may step below ``step`` by these bounds."""
        if any(self.device_ms(d) >= step for d in seq):
            return False
        return all(self.wire_ms(u, v) < step for u, v in zip(seq, seq[1:], strict=False) if u != v)

    def crossing_ms(self, last: str, free: list[str], positions: np.ndarray) -> np.ndarray:
        """Per position ``a``: a bound below ``M`` times the slowest wire of any completion
        after ``last`` on devices of ``free`` holding layers ``a..n-1``. The devices reached
        from ``last`` over wires of at most ``t`` (any number of hops) must hold those layers
        by memory, or some cut crosses a wire slower than ``t``: the bound is the smallest
        ``t`` whose reach holds them (inf: no reach does). Devices are taken by link group
        (a zone, or a device with links of its own); reaching one device of a group counts
        as reaching all of it (more memory: the bound stays below). Computed at every
        position once per ``last`` and ``free`` (the device search asks again and again)."""
        key = (last, tuple(free))
        if key not in self._crossing:
            self._crossing[key] = self._crossing_at(last, free, np.arange(self.req.n + 1))
        return self._crossing[key][positions]

    def _crossing_at(self, last: str, free: list[str], positions: np.ndarray) -> np.ndarray:
        need = self.ref_tail[positions] * (1 - 1e-9)
        groups: dict[tuple, list[str]] = {}
        for d in free:  # ``last`` itself (the U's owner again) is a group alone: no wire to itself
            groups.setdefault(("self", d) if d == last else self._group(d), []).append(d)
        names = list(groups)
        cap = {g: np.sum([self.capacity(d)[positions] for d in groups[g]], axis=0) for g in names}
        rep = {g: groups[g][0] for g in names}
        start = {g: self.wire_ms(last, rep[g]) for g in names}
        pair = {(g, h): self.wire_ms(rep[g], rep[h]) for g in names for h in names if g != h}
        out = np.full(len(positions), np.inf)
        for t in sorted({*start.values(), *pair.values()}):
            seen = {g for g in names if start[g] <= t}
            todo = list(seen)
            while todo:
                g = todo.pop()
                for h in names:
                    if h not in seen and pair[(g, h)] <= t:
                        seen.add(h)
                        todo.append(h)
            held = np.sum([cap[g] for g in seen], axis=0) if seen else np.zeros(len(positions))
            out = np.where(np.isinf(out) & (held >= need), t, out)
            if not np.isinf(out).any():
                break
        return np.where(need > 0, out, 0.0)

    def _group(self, d: str) -> tuple:
        if d not in self._groups:
            topo = self.req.topology
            own = any(d in (e.a, e.b) for e in topo.links.pairs)
            self._groups[d] = ("device", d) if own else ("zone", topo.device(d).zone)
        return self._groups[d]

    # -- the layers still to place ------------------------------------------------------

    def capacity(self, d: str) -> np.ndarray:
        """``[a]`` -> the most reference work (layers at the pool's fastest) of one layer
        range starting at ``a`` or later that fits ``d``'s memory under some option, with
        the fewest micro-batches in flight any stage holds (0 where none fits)."""
        if d not in self._cap:
            req, tables, n = self.req, self.tables, self.req.n
            inflight = self.M if req.schedule == "gpipe" else 1
            cum = np.concatenate([[0.0], np.cumsum(self.ref)])
            work = cum[None, :] - cum[:, None]  # [a, b] -> reference work of layers a..b-1
            fits = np.zeros((n + 1, n + 1), bool)
            for s in stage_kinds(req):
                for o in tables.options(s, d):
                    mem = tables.dev_table(d, inflight, o)
                    host = tables.host_cum(d, o)
                    fits |= (mem <= tables.capacity(d)) & ((host[None, :] - host[:, None]) <= tables.host_capacity(d))
            best = np.where(fits, work, 0.0).max(axis=1)
            self._cap[d] = np.maximum.accumulate(best[::-1])[::-1]
        return self._cap[d]

    def tail_stage_ms(self, positions: np.ndarray, free: list[str], stages: int) -> np.ndarray:
        """Per position ``a``: a bound below the busiest per-micro-batch forward and backward
        of any at most ``stages`` stages on distinct devices of ``free`` that run layers
        ``a..n-1`` (inf where they cannot hold them; 0 where nothing is left).

        A device ``d`` with a stage of reference work ``w`` works at least ``slow[d] w``, and
        ``w`` is at most ``capacity(d)``: if the busiest works ``lam``, the stages hold at most
        the sum over their devices of ``min(lam / slow[d], capacity(d))``, the ``stages``
        largest of them, which must reach the work left. The smallest such ``lam`` is found
        by bisection (rounded down: the bound stays below), at every position once per
        ``free`` and ``stages``."""
        key = (self.signature(free), stages)
        if key not in self._busiest:
            self._busiest[key] = self._busiest_at(np.arange(self.req.n + 1), free, stages)
        return self._busiest[key][positions]

    def signature(self, free: list[str]) -> tuple[int, ...]:
        """What :meth:`tail_stage_ms` reads of ``free``: per device its pace and its
        capacity (devices that agree on both count alike), in no order."""
        sig = self._sig
        for d in free:
            if d not in sig:
                figures = (self.slow[d], self.capacity(d).tobytes())
                sig[d] = self._sig_ids.setdefault(figures, len(self._sig_ids))
        return tuple(sorted(sig[d] for d in free))

    def _busiest_at(self, positions: np.ndarray, free: list[str], stages: int) -> np.ndarray:
        need = self.ref_tail[positions]
        if not free or stages <= 0:
            return np.where(need > 0, np.inf, 0.0)
        inv = np.array([1.0 / self.slow[d] for d in free])[:, None]
        cap = np.array([self.capacity(d)[positions] for d in free])
        k = min(stages, len(free))

        def held(lam: np.ndarray) -> np.ndarray:
            per = np.minimum(lam[None, :] * inv, cap)
            if k < len(free):
                per = -np.partition(-per, k - 1, axis=0)[:k]
            return per.sum(axis=0)

        live = need > 0
        need = need * (1 - 1e-9)  # a little less work: the bound stays below, whatever the rounding
        most = held(np.full(len(positions), np.inf))
        out = np.where(live & (most < need), np.inf, 0.0)
        todo = live & np.isfinite(out)
        if not todo.any():
            return out
        if len(free) <= EXACT_DEVICES:
            return np.where(todo, _least_lam(need, inv[:, 0], cap, k) * (1 - 1e-9), out)
        # below this lam even the k fastest devices at their pace, memory aside, hold too little
        lo = np.where(todo, need / np.sort(inv[:, 0])[-k:].sum(), 0.0)
        # at this lam every device could do all the work by pace; grow it where memory binds
        hi = np.where(todo, need * max(self.slow[d] for d in free), 0.0)
        for _ in range(60):
            short = todo & (held(hi) < need)
            if not short.any():
                break
            hi = np.where(short, hi * 2, hi)
        for _ in range(40):
            if np.all(hi - lo <= 1e-9 * hi):
                break
            mid = (lo + hi) / 2
            enough = held(mid) >= need
            hi = np.where(enough, mid, hi)
            lo = np.where(enough, lo, mid)
        return np.where(todo, lo * (1 - 1e-9), out)  # below, whatever the rounding

    def sequence_tail(self, seq: list[str], s: int) -> Tail:
        """What the stages after stage ``s`` of ``seq`` take at least, per end of stage
        ``s`` (:func:`~partitioners.planner.cuts.completed`): the layers left at their
        fastest on those devices, the busiest of those stages at least
        :meth:`tail_stage_ms` on them, the cut to ``seq[s + 1]`` its slower transfer, and
        the cuts left both ways: that cut's, then each later pair's cheapest cut's."""
        rest = list(dict.fromkeys(seq[s + 1 :]))
        f = np.min([self.f[d] for d in rest], axis=0)
        b = np.min([self.b[d] for d in rest], axis=0)
        tail_f = np.concatenate([np.cumsum(f[::-1])[::-1], [0.0]])
        tail_b = np.concatenate([np.cumsum(b[::-1])[::-1], [0.0]])
        k = len(seq) - s - 1
        n = self.req.n
        links = self.tables.link_table(seq[s], seq[s + 1])
        wire, trip = links.max(axis=1), links.sum(axis=1)
        later = sum(
            float(self.tables.link_table(u, v)[1:n].sum(axis=1).min())
            for u, v in zip(seq[s + 1 :], seq[s + 2 :], strict=False)
        )

        def after(bs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            ft, bt = tail_f[bs], tail_b[bs]
            busiest = np.maximum(self.tail_stage_ms(bs, rest, k), (ft + bt) / k)
            inside = (bs > 0) & (bs < n)
            return ft, bt, busiest, np.where(inside, wire[bs], 0.0), np.where(inside, trip[bs] + later, 0.0)

        return after
