"""Tier 1: the planner honours the privacy minimums (layers the data owner keeps), exactly."""

import dataclasses
import random

import pytest
from test_partitioners import TOPO, assert_valid, chain, random_instance, req

from partitioners import PlanError, partition


def test_optimal_keeps_the_owner_minimum_and_says_why_when_it_cannot():
    fast = dataclasses.replace(
        TOPO.device("edge-a"), tflops=0.0001
    )  # a slow owner: optimal gives it only the embedding
    topo = dataclasses.replace(TOPO, devices=[fast, *[d for d in TOPO.devices if d.name != "edge-a"]])
    free = partition("optimal", req(topo=topo))
    assert free.stages[0].stop == 1
    bound = partition("optimal", req(topo=topo, min_owner_front=3, privacy_why="privacy.max_token_recovery=0.05"))
    assert bound.stages[0].stop >= 3 or bound.num_stages == 1
    with pytest.raises(PlanError, match=r"privacy: .* at least 3 chain layers \(embed..block_1\) \(privacy.max"):
        partition(
            "uniform",
            req(
                topo=topo,
                devices=["edge-a", "mid-b", "cloud-c", "cloud-d"],
                min_owner_front=3,
                privacy_why="privacy.max_token_recovery=0.05",
            ),
        )
    u = partition("optimal", req(topo=topo, label_privacy=True, min_owner_tail=2))
    assert u.stages[-1].start <= len(chain()) - 2 and u.stages[-1].device == "edge-a"


def test_optimal_equals_exhaustive_under_owner_minimums():
    rng = random.Random(22)
    for _ in range(12):
        r = random_instance(rng)
        r.min_owner_front = rng.randint(1, max(1, r.n - 1))
        r.min_owner_tail = rng.randint(1, 2)
        try:
            want = partition("exhaustive", r)
        except PlanError:
            with pytest.raises(PlanError):
                partition("optimal", r)
            continue
        got = partition("optimal", r)
        assert_valid(got, r)
        assert got.step_ms <= want.step_ms * (1 + 1e-9) + 1e-9
        if got.num_stages > 1:
            assert got.stages[0].stop >= r.min_owner_front
