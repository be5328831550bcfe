"""The bounds ``optimal`` prunes with hold below the simulator's step of every plan they
exclude (:mod:`partitioners.planner.bounds`, the cut labels' 1F1B rounds term, the
completion bound), and the simulator replayed on arrays equals the simulator."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from test_partitioners import many_device_instance, random_instance

from partitioners import PlanRequest
from partitioners.planner import CostTables, evaluate
from partitioners.planner.bounds import PoolBounds, _least_lam
from partitioners.planner.cuts import best_cuts, every_cut
from partitioners.planner.objective import (
    StepFigures,
    array_steps,
    drained,
    lower_bound,
    plain_sequence,
    plain_steps,
    simulated,
)


def test_plain_steps_equal_the_simulator():
    rng = random.Random(7)
    for _ in range(200):
        schedule = rng.choice(["1f1b", "gpipe", "sequential"])
        S, M, K = rng.randint(1, 6), rng.randint(1, 9), 4
        F = np.array([[rng.uniform(0, 10) for _ in range(K)] for _ in range(S)])
        B = np.array([[rng.uniform(0, 20) for _ in range(K)] for _ in range(S)])
        Op = np.array([[rng.choice([0.0, rng.uniform(0, 30)]) for _ in range(K)] for _ in range(S)])
        A = np.array([[rng.choice([0.0, rng.uniform(0, 15)]) for _ in range(K)] for _ in range(S - 1)]).reshape(
            S - 1, K
        )
        G = np.array([[rng.uniform(0, 15) for _ in range(K)] for _ in range(S - 1)]).reshape(S - 1, K)
        got = plain_steps(schedule, M, F, B, Op, A, G)
        for k in range(K):
            fig = StepFigures(
                list(F[:, k]), list(B[:, k]), list(Op[:, k]), [0.0] * S, [1] * S, list(A[:, k]), list(G[:, k])
            )
            assert got[k] == pytest.approx(simulated(schedule, fig, M), rel=1e-12, abs=1e-9)


def test_drained_gradients_stay_below_the_simulator():
    """1F1B: after the last activation reaches stage ``s + 1``, :func:`drained` gradients
    still cross the wire back one after another. On random plans whose wires are often
    far slower than the stages (one direction much slower than the other, as behind a thin
    uplink), the bound with that term stays at or below the simulator's step, shared devices
    and uplinks included; and it is the step itself on some of them (a term that matters)."""
    rng = random.Random(13)
    tight = 0
    for i in range(400):
        S, M = rng.randint(2, 8), rng.randint(1, 9)

        def wire() -> float:
            return rng.choice([0.0, rng.uniform(0, 5), rng.uniform(50, 500), rng.uniform(500, 5000)])

        fig = StepFigures(
            [rng.uniform(0, 10) for _ in range(S)],
            [rng.uniform(0, 20) for _ in range(S)],
            [rng.choice([0.0, rng.uniform(0, 5)]) for _ in range(S)],
            [0.0] * S,
            [1] * S,
            [wire() for _ in range(S - 1)],
            [wire() for _ in range(S - 1)],
        )
        if i % 4 == 0 and S > 2:  # the data owner's two stages (U-shape) share its device
            fig = dataclasses.replace(fig, shared=[(0, S - 1)])
        if i % 4 == 1 and S > 2:  # two wires through one uplink
            fig = dataclasses.replace(fig, channels={"link 0->1": "up", "link 2->1": "up"})
        sim = simulated("1f1b", fig, M)
        assert lower_bound("1f1b", fig, M) <= sim * (1 + 1e-9) + 1e-9
        F, B, a, g = fig.fwd, fig.bwd, fig.act, fig.grad
        for s in range(S - 1):  # the term alone: the path to stage s, then the wire s <-> s + 1
            path = sum(F[: s + 1]) + sum(B[: s + 1]) + sum(a[:s]) + sum(g[:s])
            term = path + M * a[s] + F[s + 1] + B[s + 1] + drained(S, s + 1, M) * g[s] + fig.opt[0]
            assert term <= sim * (1 + 1e-9) + 1e-9
            tight += drained(S, s + 1, M) > 1 and term == pytest.approx(sim, rel=1e-9)
    assert tight >= 5, tight


def _sequences(rng: random.Random, r: PlanRequest, count: int) -> list[list[str]]:
    topo = r.topology
    owners = [d.name for d in topo.devices if d.owns_data]
    out = []
    for _ in range(count):
        rest = [d for d in r.pool if d not in owners[:1]]
        rng.shuffle(rest)
        seq = [rng.choice(owners), *rest[: rng.randint(0, min(3, r.n - 1))]]
        seq = list(dict.fromkeys(seq))[: r.n]
        if r.label_privacy and len(seq) < r.n:
            seq.append(seq[0])
        out.append(seq)
    return out


def _instances(n: int) -> list[PlanRequest]:
    rng = random.Random(11)
    out = []
    while len(out) < n:
        r = many_device_instance(rng) if rng.random() < 0.5 else random_instance(rng)
        out.append(dataclasses.replace(r, replicate=False))
    return out


def test_busiest_stage_solved_on_its_breakpoints():
    """The busiest stage's ``lam`` (:func:`_least_lam`: the ``k`` largest of ``min(lam /
    slow, capacity)`` reach the work left) equals a plain bisection's, and never exceeds
    the smallest ``lam`` that holds the work (the bound stays below), ties, zero capacities
    and equal paces included."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        m, P = int(rng.integers(1, 7)), 9
        k = int(rng.integers(1, m + 1))
        inv = rng.choice([0.25, 0.5, 1.0, 1.0], size=m) * rng.uniform(0.5, 1.0, size=m)
        cap = rng.uniform(0, 10, size=(m, P)) * (rng.random((m, P)) < 0.8)

        def held(lam: np.ndarray, inv: np.ndarray = inv, cap: np.ndarray = cap, k: int = k) -> np.ndarray:
            per = np.minimum(lam[None, :] * inv[:, None], cap)
            return -np.sort(-per, axis=0)[:k].sum(axis=0)

        most = held(np.full(P, 1e12))
        need = most * rng.uniform(0.05, 1.0, size=P)
        got = _least_lam(need, inv, cap, k)
        assert np.all(held(got * (1 - 1e-9)) <= need * (1 + 1e-12))  # not above the least lam
        lo, hi = np.zeros(P), np.full(P, 1e6)
        for _ in range(200):
            mid = (lo + hi) / 2
            enough = held(mid) >= need
            hi, lo = np.where(enough, mid, hi), np.where(enough, lo, mid)
        assert got == pytest.approx(hi, rel=1e-9, abs=1e-9)


def test_pool_bounds_stay_below_every_plans_step():
    """Each device's and link's bound, the busiest stage left, the crossing wire, the
    cheapest round trip of a cut left, the cut labels' bound (with 1F1B's rounds) and the
    completion bound (with 1F1B's held-back round trips, in best_cuts and every_cut), on
    every plan of random sequences of random instances; usable() keeps every device of a
    plan faster than a step."""
    rng = random.Random(5)
    plans = every_checked = 0
    for r in _instances(90):
        tables = CostTables(r)
        limits = PoolBounds(r, tables)
        M = r.num_micro_batches
        for seq in _sequences(rng, r, 3):
            S = len(seq)
            listed = best_cuts(r, tables, seq, float("inf"), top=10**6, prune=False) or []
            steps = [evaluate(tables, seq, c.bounds, c.opts).step_ms for c in listed]
            for c, step in zip(listed, steps, strict=True):
                assert c.lower_ms <= step * (1 + 1e-9) + 1e-9  # the label's bound
                assert limits.admits(seq, step * (1 + 1e-9) + 1e-6)
                assert set(seq) <= set(limits.usable(step * (1 + 1e-9) + 1e-6))
                fb = [sum(tables.fbo(d, c.bounds[s], c.bounds[s + 1], c.opts[s])[:2]) for s, d in enumerate(seq)]
                wires = [max(tables.link(seq[s], seq[s + 1], c.bounds[s + 1])) for s in range(S - 1)]
                trips = [sum(tables.link(seq[s], seq[s + 1], c.bounds[s + 1])) for s in range(S - 1)]
                for s in range(S - 1):
                    a = np.array([c.bounds[s + 1]])
                    free = [d for d in r.pool if d not in seq[: s + 1]] + ([seq[0]] if r.label_privacy else [])
                    busiest = limits.tail_stage_ms(a, free, S - s - 1)[0]
                    assert busiest <= max(fb[s + 1 :]) * (1 + 1e-9) + 1e-12
                    crossing = limits.crossing_ms(seq[s], free, a)[0]
                    assert crossing <= M * max(wires[s:]) * (1 + 1e-9) + 1e-9
                    hop = limits.hop_ms(seq[s], free)  # each cut left, both ways
                    assert (S - s - 1) * hop <= M * sum(trips[s:]) * (1 + 1e-9) + 1e-9
                plans += 1
            # the completion bound keeps every plan faster than a bound
            if listed:
                bound = sorted(steps)[len(steps) // 2] * (1 + 1e-9)
                faster = {
                    (tuple(c.bounds), tuple(c.opts)) for c, step in zip(listed, steps, strict=True) if step < bound
                }
                kept = best_cuts(r, tables, seq, bound, top=10**6, prune=False, tail=limits.sequence_tail) or []
                assert faster <= {(tuple(c.bounds), tuple(c.opts)) for c in kept}
                if len(set(seq)) == len(seq):  # and so does the listing as arrays
                    every = every_cut(r, tables, seq, bound, 10**6, tail=limits.sequence_tail)
                    assert every is not None
                    listed_too = [every.choice(i, tables, seq) for i in range(len(every.lower_ms))]
                    assert faster <= {(tuple(c.bounds), tuple(c.opts)) for c in listed_too}
                    every_checked += 1
    assert plans >= 300, plans
    assert every_checked >= 50, every_checked


def test_every_cut_lists_what_best_cuts_lists_and_replays_the_simulator():
    rng = random.Random(9)
    checked = 0
    for r in _instances(80):
        r = dataclasses.replace(r, label_privacy=False, schedule="1f1b")
        tables = CostTables(r)
        limits = PoolBounds(r, tables)
        for seq in _sequences(rng, r, 2):
            if not plain_sequence(tables, seq):
                continue
            listed = best_cuts(r, tables, seq, float("inf"), top=10**6, prune=False) or []
            every = every_cut(r, tables, seq, float("inf"), 10**6, tail=limits.sequence_tail)
            assert every is not None
            index = [{o: k for k, o in enumerate(tables.options(s, d))} for s, d in enumerate(seq)]
            mine = sorted((tuple(c.bounds), tuple(index[s][o] for s, o in enumerate(c.opts))) for c in listed)
            assert mine == sorted(zip(map(tuple, every.bounds.tolist()), map(tuple, every.opts.tolist()), strict=True))
            if not len(every.lower_ms):
                continue
            steps = array_steps(tables, seq, every.bounds, every.opts)
            for i in range(len(steps)):
                c = every.choice(i, tables, seq)
                assert steps[i] == pytest.approx(evaluate(tables, seq, c.bounds, c.opts).step_ms, rel=1e-9, abs=1e-9)
                checked += 1
    assert checked >= 100, checked
