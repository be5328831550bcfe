"""Tier 1: plans and schedules are plain data made by pure functions."""

import pytest
from conftest import inline_topology

from cluster.topology import topology_from_container
from partitioners import LayerCost, Plan, PlanError, manual, static_memory_gb, uniform, uniform_cuts
from partitioners import schedule as S

TOPO = topology_from_container(inline_topology())


def chain(n_blocks=4, block_params=1000, embed=500, head=500):
    return [
        LayerCost("embed", embed),
        *[LayerCost(f"block_{i}", block_params) for i in range(n_blocks)],
        LayerCost("head", head),
    ]


@pytest.mark.parametrize(
    "n,k,expected", [(6, 3, [2, 4]), (6, 4, [2, 4, 5]), (7, 2, [4]), (5, 5, [1, 2, 3, 4]), (3, 1, [])]
)
def test_uniform_cuts(n, k, expected):
    assert uniform_cuts(n, k) == expected


def test_uniform_plan_covers_the_chain_in_order():
    plan = uniform(chain(), TOPO, ["edge-a", "mid-b", "cloud-c"])
    assert plan.ranges == [(0, 2), (2, 4), (4, 6)]
    assert plan.stages[0].layer_names == ["embed", "block_0"]
    assert plan.stages[2].layer_names == ["block_3", "head"]
    assert plan.devices == ["edge-a", "mid-b", "cloud-c"]
    assert plan.stages[1].params == 2000
    assert plan.stages[1].memory_gb == pytest.approx(2000 * 16 / 1e9)


def test_default_order_puts_the_data_owner_first():
    topo = topology_from_container(inline_topology(owner="mid-b"))
    plan = uniform(chain(), topo)
    assert plan.devices[0] == "mid-b" and len(plan.stages) == 4


def test_plan_yaml_round_trip_and_table():
    plan = manual(chain(), TOPO, ["edge-a", "cloud-c"], [3])
    again = Plan.from_yaml(plan.to_yaml())
    assert again == plan
    table = plan.table()
    assert "edge-a" in table and "[0,3)" in table and "block_2 .. head" in table


@pytest.mark.parametrize(
    "devices,cuts,needle",
    [
        (["edge-a", "cloud-c"], [0], "strictly increasing"),
        (["edge-a", "cloud-c"], [6], "strictly increasing"),
        (["edge-a", "mid-b", "cloud-c"], [3, 2], "strictly increasing"),
        (["edge-a", "cloud-c"], [2, 3], "need 1 cuts"),
        (["cloud-c", "edge-a"], [3], "must be on a data-owning device (edge-a)"),
        (["edge-a", "edge-a"], [3], "used twice"),
        (["edge-a", "nowhere"], [3], "device 'nowhere' is not in topology"),
    ],
)
def test_manual_plan_errors(devices, cuts, needle):
    with pytest.raises(Exception) as e:
        manual(chain(), TOPO, devices, cuts)
    assert needle in str(e.value)


def test_more_devices_than_layers():
    with pytest.raises(PlanError, match="only 3 layers"):
        uniform(chain(n_blocks=1), TOPO, ["edge-a", "mid-b", "cloud-c", "cloud-d"])


def test_model_that_fits_no_device():
    big = chain(block_params=200_000_000)  # 3.2 GB of weights + grads + AdamW per block
    with pytest.raises(PlanError) as e:
        uniform(big, TOPO, ["edge-a", "mid-b"])
    assert "stage 0" in str(e.value) and "memory_gb=2" in str(e.value)


def test_static_memory_counts_frozen_params_as_weights_only():
    assert static_memory_gb([LayerCost("x", 1000, trainable_params=0)]) == pytest.approx(4000 / 1e9)
    assert static_memory_gb([LayerCost("x", 1000)]) == pytest.approx(16000 / 1e9)


# -- schedules ----------------------------------------------------------------------------


@pytest.mark.parametrize("stages,mbs", [(1, 1), (1, 3), (2, 2), (3, 4)])
def test_sequential_schedule_is_valid(stages, mbs):
    sched = S.build("sequential", stages, mbs)
    assert len(sched) == stages
    for acts in sched:
        assert acts[-1] == S.Action(S.STEP)
        assert [a.mb for a in acts if a.kind == S.F] == list(range(mbs))
    if stages > 1:
        assert sched[0][0].kind == S.SEND_LABELS and sched[-1][0].kind == S.RECV_LABELS
    assert "stage 0:" in S.format_grid(sched)


def test_sequential_order_of_a_middle_stage():
    sched = S.sequential(3, 2)
    assert [str(a) for a in sched[1]] == [
        "RECV_ACT0",
        "F0",
        "SEND_ACT0",
        "RECV_GRAD0",
        "B0",
        "SEND_GRAD0",
        "RECV_ACT1",
        "F1",
        "SEND_ACT1",
        "RECV_GRAD1",
        "B1",
        "SEND_GRAD1",
        "STEP",
    ]


def test_validate_catches_mismatched_transfers_and_order():
    sched = S.sequential(2, 2)
    swapped = [list(sched[0]), list(sched[1])]
    i, j = swapped[1].index(S.Action(S.RECV_ACT, 0)), swapped[1].index(S.Action(S.RECV_ACT, 1))
    swapped[1][i], swapped[1][j] = swapped[1][j], swapped[1][i]
    with pytest.raises(S.ScheduleError, match="order"):
        S.validate(swapped, 2)
    backwards_first = [[S.Action(S.B, 0), S.Action(S.F, 0), S.Action(S.STEP)]]
    with pytest.raises(S.ScheduleError, match="F before one B"):
        S.validate(backwards_first, 1)
