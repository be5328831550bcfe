"""Tier 1: the pipeline simulator against step times computed by hand.

Notation in the comments: ``F0 [a,b]`` is the forward of micro-batch 0 running from a to b
ms on that stage; ``act0 [a,b]`` / ``grad0 [a,b]`` a transfer on the link. Sends take no
stage time; a receive waits for its transfer's arrival.
"""

import pytest

from partitioners import schedule as sch
from partitioners.costmodel import micro_batches_in_flight
from partitioners.schedule import Action
from partitioners.simulator import (
    HOST,
    DeadlockError,
    HostCost,
    LinkCosts,
    StageCosts,
    simulate,
)
from partitioners.timeline import timeline_figure, timeline_png, timeline_rows


def run(name, stages, links=None, labels_ms=0.0, m=1):
    n = len(stages)
    links = [LinkCosts(0.0, 0.0)] * (n - 1) if links is None else links
    return simulate(sch.build(name, n, m), stages, links, labels_ms=labels_ms, num_micro_batches=m)


def spans(result, resource):
    return [(iv.kind, iv.mb, iv.start_ms, iv.end_ms) for iv in result.timeline if iv.resource == resource]


# -- one stage -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sequential", "gpipe", "1f1b"])
def test_one_stage(name):
    r = run(name, [StageCosts(1.0, 2.0, 0.5)], m=3)
    # every schedule is F0 B0 F1 B1 F2 B2 STEP (or all F then all B): 3 * (1 + 2) + 0.5
    assert r.step_ms == pytest.approx(9.5)
    assert r.busy_ms == [pytest.approx(9.5)]
    assert r.idle_ms == [pytest.approx(0.0)]
    assert r.bubble_fraction == pytest.approx(0.0)
    assert r.link_busy_ms == {}


# -- two equal stages, free links ------------------------------------------------------------

EQUAL2 = [StageCosts(1.0, 2.0)] * 2


def test_two_stages_gpipe_m2():
    r = run("gpipe", EQUAL2, m=2)
    # stage 0: F0 [0,1] F1 [1,2]
    # stage 1: F0 [1,2] F1 [2,3] B0 [3,5] B1 [5,7]
    # stage 0: B0 [5,7] B1 [7,9]                     -> 9 = (M+S-1)(f+b) = 3*3
    assert r.step_ms == pytest.approx(9.0)
    assert spans(r, "stage 1") == [("F", 0, 1, 2), ("F", 1, 2, 3), ("B", 0, 3, 5), ("B", 1, 5, 7), ("STEP", -1, 7, 7)]
    assert spans(r, "stage 0")[2:4] == [("B", 0, 5, 7), ("B", 1, 7, 9)]
    assert r.busy_ms == [pytest.approx(6.0)] * 2
    assert r.idle_ms == [pytest.approx(3.0)] * 2


def test_two_stages_gpipe_m4():
    r = run("gpipe", EQUAL2, m=4)
    # stage 0: F0..F3 [0,4]
    # stage 1: F0..F3 [1,5], B0..B3 [5,13]
    # stage 0: B0 [7,9] B1 [9,11] B2 [11,13] B3 [13,15]   -> 15 = (4+2-1)*3
    assert r.step_ms == pytest.approx(15.0)
    assert r.bubble_fraction == pytest.approx(1 - 2 * 12 / (2 * 15))


def test_two_stages_1f1b_m4():
    r = run("1f1b", EQUAL2, m=4)
    # stage 0: F0 [0,1] F1 [1,2] | waits grad0
    # stage 1: F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7]
    # stage 0: B0 [4,6] F2 [6,7] B1 [7,9] F3 [9,10]
    # stage 1: F2 [7,8] B2 [8,10] F3 [10,11] B3 [11,13]
    # stage 0: B2 [10,12] B3 [13,15]                      -> 15, same as GPipe
    assert r.step_ms == pytest.approx(15.0)
    assert spans(r, "stage 0") == [
        ("F", 0, 0, 1),
        ("F", 1, 1, 2),
        ("B", 0, 4, 6),
        ("F", 2, 6, 7),
        ("B", 1, 7, 9),
        ("F", 3, 9, 10),
        ("B", 2, 10, 12),
        ("B", 3, 13, 15),
        ("STEP", -1, 15, 15),
    ]
    assert r.peak_in_flight == [2, 1]


def test_two_stages_sequential_m2():
    r = run("sequential", EQUAL2, m=2)
    # F0 [0,1] on stage 0, F0 [1,2] B0 [2,4] on stage 1, B0 [4,6] on stage 0,
    # then micro-batch 1 the same from 6: ends at 12 = M*S*(f+b) = 2*2*3
    assert r.step_ms == pytest.approx(12.0)
    assert r.peak_in_flight == [1, 1]


# -- three stages, links cost 0.5 each way ----------------------------------------------------

EQUAL3 = [StageCosts(1.0, 2.0)] * 3
HALF_MS_LINKS = [LinkCosts(0.5, 0.5)] * 2


def test_three_stages_gpipe_with_links():
    r = run("gpipe", EQUAL3, HALF_MS_LINKS, m=3)
    # stage 0: F0 [0,1] F1 [1,2] F2 [2,3];       act 0->1: [1,1.5] [2,2.5] [3,3.5]
    # stage 1: F0 [1.5,2.5] F1 [2.5,3.5] F2 [3.5,4.5]; act 1->2: [2.5,3] [3.5,4] [4.5,5]
    # stage 2: F0 [3,4] F1 [4,5] F2 [5,6] B0 [6,8] B1 [8,10] B2 [10,12]; grad 2->1: [8,8.5] [10,10.5] [12,12.5]
    # stage 1: B0 [8.5,10.5] B1 [10.5,12.5] B2 [12.5,14.5];             grad 1->0: [10.5,11] [12.5,13] [14.5,15]
    # stage 0: B0 [11,13] B1 [13,15] B2 [15,17]
    # -> 17 = (M+S-1)(f+b) + 2 activation hops + 2 gradient hops = 15 + 1 + 1
    assert r.step_ms == pytest.approx(17.0)
    assert spans(r, "link 1->0") == [("GRAD", 0, 10.5, 11), ("GRAD", 1, 12.5, 13), ("GRAD", 2, 14.5, 15)]
    assert r.link_busy_ms == {
        "link 0->1": pytest.approx(1.5),
        "link 1->0": pytest.approx(1.5),
        "link 1->2": pytest.approx(1.5),
        "link 2->1": pytest.approx(1.5),
        "labels 0->2": 0.0,
    }


def test_three_stages_1f1b_with_links():
    r = run("1f1b", EQUAL3, HALF_MS_LINKS, m=3)
    # stage 0: F0 [0,1] F1 [1,2] F2 [2,3];  act 0->1: [1,1.5] [2,2.5] [3,3.5]
    # stage 1: F0 [1.5,2.5] F1 [2.5,3.5] | waits grad0;  act 1->2: [2.5,3] [3.5,4]
    # stage 2: F0 [3,4] B0 [4,6] F1 [6,7] B1 [7,9];       grad 2->1: [6,6.5] [9,9.5]
    # stage 1: B0 [6.5,8.5] F2 [8.5,9.5] B1 [9.5,11.5];  grad 1->0: [8.5,9] [11.5,12]; act2 1->2: [9.5,10]
    # stage 2: F2 [10,11] B2 [11,13];                     grad 2->1: [13,13.5]
    # stage 1: B2 [13.5,15.5];                            grad 1->0: [15.5,16]
    # stage 0: B0 [9,11] B1 [12,14] B2 [16,18]            -> 18: 1F1B's early backwards wait on links
    assert r.step_ms == pytest.approx(18.0)
    assert spans(r, "stage 1") == [
        ("F", 0, 1.5, 2.5),
        ("F", 1, 2.5, 3.5),
        ("B", 0, 6.5, 8.5),
        ("F", 2, 8.5, 9.5),
        ("B", 1, 9.5, 11.5),
        ("B", 2, 13.5, 15.5),
        ("STEP", -1, 15.5, 15.5),
    ]


# -- links: queueing, asynchronous sends, labels ----------------------------------------------


def test_slow_link_queues_transfers_and_sends_do_not_block():
    r = run("gpipe", EQUAL2, [LinkCosts(3.0, 0.0)], m=3)
    # stage 0: F0 [0,1] F1 [1,2] F2 [2,3]  (does not wait for its sends)
    # act 0->1, one at a time: [1,4] [4,7] [7,10]
    # stage 1: F0 [4,5] F1 [7,8] F2 [10,11] B0 [11,13] B1 [13,15] B2 [15,17]
    # stage 0: B0 [13,15] B1 [15,17] B2 [17,19]           -> 19
    assert r.step_ms == pytest.approx(19.0)
    assert spans(r, "stage 0")[:3] == [("F", 0, 0, 1), ("F", 1, 1, 2), ("F", 2, 2, 3)]
    assert spans(r, "link 0->1") == [("ACT", 0, 1, 4), ("ACT", 1, 4, 7), ("ACT", 2, 7, 10)]
    assert r.link_busy_ms["link 0->1"] == pytest.approx(9.0)


def test_labels_delay_the_loss_stage():
    r = run("gpipe", EQUAL2, labels_ms=5.0, m=1)
    # labels 0->1: [0,5]; stage 1 receives them first: F0 [5,6] B0 [6,8]; stage 0 B0 [8,10]
    assert r.step_ms == pytest.approx(10.0)
    assert spans(r, "labels 0->1") == [("LABELS", -1, 0, 5)]


# -- heterogeneous: same time, less memory for 1F1B -------------------------------------------


def test_slow_second_stage_1f1b_matches_gpipe_with_fewer_in_flight():
    stages = [StageCosts(1.0, 2.0), StageCosts(2.0, 4.0)]
    gp = run("gpipe", stages, m=4)
    ofob = run("1f1b", stages, m=4)
    # GPipe: stage 1 F0..F3 [1,9], B0..B3 [9,25]; stage 0 B3 [25,27]
    # 1F1B: stage 1 F0 [1,3] B0 [3,7] F1 [7,9] B1 [9,13] F2 [13,15] B2 [15,19] F3 [19,21] B3 [21,25];
    #       stage 0 B3 [25,27]
    # both 27 = stage 0's first F (1) + stage 1 busy 4*(2+4) (24) + stage 0's last B (2)
    assert gp.step_ms == pytest.approx(27.0)
    assert ofob.step_ms == pytest.approx(27.0)
    assert gp.peak_in_flight == [4, 4]  # M on every stage
    assert ofob.peak_in_flight == [2, 1]  # S - s


@pytest.mark.parametrize("name", ["sequential", "gpipe", "1f1b"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_peak_in_flight_matches_cost_model(name, n, m):
    r = run(name, [StageCosts(1.0, 2.0)] * n, m=m)
    assert r.peak_in_flight == [micro_batches_in_flight(name, s, n, m) for s in range(n)]


@pytest.mark.parametrize("n, m", [(2, 1), (2, 4), (3, 3), (4, 8), (5, 2), (6, 16)])
def test_balanced_gpipe_bubble_is_classic_formula(n, m):
    r = run("gpipe", [StageCosts(1.5, 3.0)] * n, m=m)
    assert r.step_ms == pytest.approx((m + n - 1) * 4.5)
    assert r.bubble_fraction == pytest.approx((n - 1) / (m + n - 1))


# -- errors ----------------------------------------------------------------------------------


def test_receive_never_sent_is_a_deadlock():
    sched = [
        [Action(sch.F, 0), Action(sch.B, 0), Action(sch.STEP)],
        [Action(sch.RECV_ACT, 0), Action(sch.F, 0), Action(sch.B, 0), Action(sch.STEP)],
    ]
    with pytest.raises(DeadlockError, match=r"stage 1 blocked at RECV_ACT0 .*link 0->1.*stage 0 finished"):
        simulate(sched, EQUAL2, [LinkCosts(0.0, 0.0)])


def test_stages_waiting_on_each_other_is_a_deadlock():
    good = sch.gpipe(2, 1)
    # stage 0 waits for the gradient before sending the activation it depends on
    stage0 = [Action(sch.SEND_LABELS), Action(sch.RECV_GRAD, 0), Action(sch.F, 0), Action(sch.SEND_ACT, 0)]
    sched = [stage0 + [Action(sch.B, 0), Action(sch.STEP)], good[1]]
    with pytest.raises(DeadlockError) as err:
        simulate(sched, EQUAL2, [LinkCosts(0.0, 0.0)])
    assert "stage 0 blocked at RECV_GRAD0" in str(err.value)
    assert "stage 1 blocked at RECV_ACT0" in str(err.value)


def test_send_never_received_and_bad_inputs():
    unreceived = [[Action(sch.F, 0), Action(sch.SEND_ACT, 0), Action(sch.B, 0), Action(sch.STEP)], [Action(sch.STEP)]]
    with pytest.raises(sch.ScheduleError, match="never received: link 0->1 micro-batch 0"):
        simulate(unreceived, EQUAL2, [LinkCosts(0.0, 0.0)])
    with pytest.raises(sch.ScheduleError, match="no wire"):
        simulate([[Action(sch.SEND_ACT, 0)]], [StageCosts(1.0, 1.0)], [])
    with pytest.raises(ValueError, match="need 1 links"):
        simulate(sch.gpipe(2, 1), EQUAL2, [])
    with pytest.raises(sch.ScheduleError, match="has 2 micro-batches"):
        simulate(sch.gpipe(2, 2), EQUAL2, [LinkCosts(0.0, 0.0)], num_micro_batches=3)


# -- plot ------------------------------------------------------------------------------------


def test_timeline_png():
    r = run("1f1b", EQUAL3, HALF_MS_LINKS, labels_ms=0.2, m=3)
    rows = timeline_rows(r)
    # 3 stages + 2 links * 2 directions + the labels line
    assert rows == [
        "stage 0",
        "link 0->1",
        "link 1->0",
        "stage 1",
        "link 1->2",
        "link 2->1",
        "stage 2",
        "labels 0->2",
    ]
    fig = timeline_figure(r, "three stages", ["edge", "mid", "cloud"])
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "edge",
        "0→1 act",
        "1→0 grad",
        "mid",
        "1→2 act",
        "2→1 grad",
        "cloud",
        "labels 0→2",
    ]
    assert ax.get_xlabel() == "time (ms)"
    assert {t.get_text() for t in ax.texts} == {"0", "1", "2"}  # micro-batch numbers in the boxes
    data = timeline_png(r, "three stages")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


# -- costs outside the stages' lists: host CPU per transfer, fixed per-step overhead ----------------


def test_host_cost_of_transfers_by_hand():
    # gpipe, 2 stages, 1 micro-batch; f=1 b=2; 1 ms links; an activation is 1 MB, a gradient
    # 0.5 MB, the labels 0 B. The sender spends 0.5 + 1 ms/MB, the receiver 0.25 + 0.5 ms/MB:
    # act send 1.5, act recv 0.75, grad send 1.0, grad recv 0.5, labels send 0.5, recv 0.25.
    links = [LinkCosts(1.0, 1.0, act_bytes=1e6, grad_bytes=5e5)]
    sched = sch.build("gpipe", 2, 1)
    free = simulate(sched, EQUAL2, links)
    assert free.step_ms == pytest.approx(8.0)  # F0 [0,1] act [1,2] F0 [2,3] B0 [3,5] grad [5,6] B0 [6,8]
    r = simulate(
        sched,
        EQUAL2,
        links,
        send_host=HostCost(0.5, 1.0),
        recv_host=HostCost(0.25, 0.5),
        step_overhead_ms=2.0,
    )
    # stage 0: labels sent at 0 (its host [0,0.5]), F0 [0.5,1.5], act0 issued at 1.5 (wire
    #          [1.5,2.5]) while its sender's host work runs [1.5,3.0]
    # stage 1: labels host [0,0.25]; act0 arrives 2.5, host [2.5,3.25]; F0 [3.25,4.25]
    #          B0 [4.25,6.25]; grad0 issued at 6.25 (wire [6.25,7.25]), host [6.25,7.25]
    # stage 0: grad0 arrives 7.25, host [7.25,7.75]; B0 [7.75,9.75]   -> 9.75 + 2 overhead
    assert r.step_ms == pytest.approx(11.75)
    assert spans(r, "stage 0") == [
        (HOST, -1, 0.0, 0.5),
        ("F", 0, 0.5, 1.5),
        (HOST, 0, 1.5, 3.0),
        (HOST, 0, 7.25, 7.75),
        ("B", 0, 7.75, 9.75),
        ("STEP", -1, 9.75, 9.75),
    ]
    assert spans(r, "stage 1") == [
        (HOST, -1, 0.0, 0.25),
        (HOST, 0, 2.5, 3.25),
        ("F", 0, 3.25, 4.25),
        ("B", 0, 4.25, 6.25),
        (HOST, 0, 6.25, 7.25),
        ("STEP", -1, 7.25, 7.25),
    ]
    assert spans(r, "link 0->1") == [("ACT", 0, 1.5, 2.5)]
    assert spans(r, "link 1->0") == [("GRAD", 0, 6.25, 7.25)]
    assert r.busy_ms == [pytest.approx(5.5), pytest.approx(5.0)]  # host work counts as busy
    assert r.idle_ms == [pytest.approx(11.75 - 5.5), pytest.approx(11.75 - 5.0)]


def test_zero_host_cost_and_overhead_keep_the_timeline():
    links = [LinkCosts(0.5, 0.5, act_bytes=1e6, grad_bytes=1e6)] * 2
    sched = sch.build("1f1b", 3, 4)
    base = simulate(sched, EQUAL3, links, labels_ms=0.2)
    same = simulate(sched, EQUAL3, links, labels_ms=0.2, send_host=HostCost(), recv_host=HostCost(), labels_bytes=5)
    assert same.timeline == base.timeline and same.step_ms == base.step_ms
    shifted = simulate(sched, EQUAL3, links, labels_ms=0.2, step_overhead_ms=3.0)
    assert shifted.step_ms == pytest.approx(base.step_ms + 3.0)
    assert shifted.timeline == base.timeline


def test_host_cost_on_the_critical_path_of_1f1b():
    # 1f1b, 2 stages, 2 micro-batches, free links. Without host costs:
    # stage 0: F0 [0,1] F1 [1,2] B0 [4,6] B1 [7,9]; stage 1: F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7]
    r = run("1f1b", EQUAL2, m=2)
    assert r.step_ms == pytest.approx(9.0)
    # with a receiver cost of 1 ms per transfer (labels too):
    # stage 1: labels host [0,1]; act0 arrived at 1, host [1,2]; F0 [2,3] B0 [3,5]; act1
    #          arrived at 2, host [5,6]; F1 [6,7] B1 [7,9]
    # stage 0: F0 [0,1] F1 [1,2]; grad0 arrives 5, host [5,6], B0 [6,8]; grad1 arrives 9,
    #          host [9,10], B1 [10,12]
    sched = sch.build("1f1b", 2, 2)
    h = simulate(sched, EQUAL2, [LinkCosts(0.0, 0.0)], recv_host=HostCost(1.0))
    assert h.step_ms == pytest.approx(12.0)
    assert [iv for iv in spans(h, "stage 0") if iv[0] == "B"] == [("B", 0, 6.0, 8.0), ("B", 1, 10.0, 12.0)]


def uniform_gpipe_plan():
    """A uniform plan of 4 equal layers (2 MB across each cut) over the test topology,
    GPipe with 2 micro-batches, on at least 2 stages."""
    from conftest import inline_topology

    from cluster.topology import topology_from_container
    from partitioners import LayerProfile, PlanRequest, partition

    layers = [
        LayerProfile(
            f"l{i}", params=1000, fwd_flops=10**9, bwd_flops=2 * 10**9, in_bytes=2e6, out_bytes=2e6, saved_bytes=10_000
        )
        for i in range(4)
    ]
    topo = topology_from_container(inline_topology())
    plan = partition("uniform", PlanRequest(layers=layers, topology=topo, schedule="gpipe", num_micro_batches=2))
    assert plan.num_stages >= 2
    return plan


def test_simulate_plan_passes_the_costs_outside_the_stages():
    from partitioners.planner import simulate_plan

    plan = uniform_gpipe_plan()
    base = simulate_plan(plan)
    assert simulate_plan(plan, step_overhead_ms=4.0).step_ms == pytest.approx(base.step_ms + 4.0)
    h = simulate_plan(plan, send_host=HostCost(0.0, 2.0), labels_bytes=1e6)
    # every send's host work is 2 ms per MB of the plan's cut bytes (labels: 1 MB)
    cut = plan.stages[0].cut_bytes
    sends0 = [iv.end_ms - iv.start_ms for iv in h.timeline if iv.kind == HOST and iv.resource == "stage 0"]
    assert sends0 == pytest.approx([2.0] + [2.0 * cut / 1e6] * 2)  # labels, then act 0 and act 1
    assert h.step_ms > base.step_ms


def test_late_receiver_pays_its_own_host_cost():
    # as above (1f1b, 2 stages, 2 micro-batches, free links), receiving costs 1 ms when the
    # receiver waits for the transfer, 3 ms when the transfer arrived before it got there:
    # stage 1: labels (at 0, there at 0: waiting) host [0,1]; act0 arrives 1, host [1,2]; F0 [2,3]
    #          B0 [3,5]; act1 arrived at 2 < 5: late, host [5,8]; F1 [8,9] B1 [9,11]
    # stage 0: F0 [0,1] F1 [1,2]; grad0 arrives 5 > 2, host [5,6], B0 [6,8]; grad1 arrives
    #          11 > 8, host [11,12], B1 [12,14]
    sched = sch.build("1f1b", 2, 2)
    h = simulate(sched, EQUAL2, [LinkCosts(0.0, 0.0)], recv_host=HostCost(1.0), recv_late_host=HostCost(3.0))
    assert h.step_ms == pytest.approx(14.0)
    assert [iv for iv in spans(h, "stage 1") if iv[0] == HOST] == [
        (HOST, -1, 0.0, 1.0),
        (HOST, 0, 1.0, 2.0),
        (HOST, 1, 5.0, 8.0),
    ]
    assert [iv for iv in spans(h, "stage 0") if iv[0] == HOST] == [(HOST, 0, 5.0, 6.0), (HOST, 1, 11.0, 12.0)]


def test_replay_on_measured_compute_and_free_links():
    """``simulate_plan(stage_costs=...)`` replaces the plan's compute; ``free_links`` keeps
    the compute and makes transfers instant; ``measured_stage_costs`` turns the workers'
    per-step metrics into those costs (per micro-batch, median over steps, the first left out)."""
    from partitioners.planner import simulate_plan
    from splitlearn.replay import measured_stage_costs

    plan = uniform_gpipe_plan()
    n = plan.num_stages
    assert plan.stages[0].link_act_ms > 0

    def metrics(scale):  # each stage: 2 micro-batches of 10 ms forward and 20 ms backward, a 3 ms STEP
        return [
            {
                "stage": s.index,
                "replica": 0,
                "device": s.device,
                "micro_batches": 2,
                "fwd_s": 0.020 * scale,
                "bwd_s": 0.040 * scale,
                "compute_s": 0.063 * scale,
                "comm_s": 0.0,
            }
            for s in plan.stages
        ]

    # the first step (slow: it allocates the optimizer state) is left out; the median of the rest
    costs = measured_stage_costs(plan, [metrics(5.0), metrics(1.0), metrics(1.0), metrics(2.0)])
    for c in costs:
        assert (c.fwd_ms, c.bwd_ms, c.step_ms) == pytest.approx((10.0, 20.0, 3.0))
    # metrics of another plan's stages (an earlier attempt before a re-plan) are not used
    other = [dict(m, device="elsewhere") for m in metrics(9.0)]
    assert measured_stage_costs(plan, [metrics(1.0), other, metrics(1.0)])[0].fwd_ms == pytest.approx(10.0)
    assert measured_stage_costs(plan, [other]) is None

    replay = simulate_plan(plan, stage_costs=costs)
    free = simulate_plan(plan, stage_costs=costs, free_links=True)
    # GPipe on free links: the first stage's forwards, each later stage one forward behind,
    # then the backwards back the same way, then the last STEP (every stage's is 3 ms)
    assert free.step_ms == pytest.approx(2 * 10 + (n - 1) * 10 + 2 * 20 + (n - 1) * 20 + 3)
    assert all(iv.end_ms == iv.start_ms for iv in free.timeline if iv.kind in ("ACT", "GRAD"))
    assert replay.step_ms > free.step_ms  # the plan's links take time
    assert replay.step_ms != pytest.approx(simulate_plan(plan).step_ms)  # not the plan's compute
    with pytest.raises(ValueError, match="stage_costs has 1 entries"):
        simulate_plan(plan, stage_costs=costs[:1])


def test_observed_trace_reads_like_the_simulation_it_matches():
    """A traced step (``runtime.trace``) in the simulator's terms: a hand-made trace of 2
    stages, sequential, M=1, whose times are exactly what the simulator gives for these
    costs, reads back as the same step: same compute intervals, each transfer from its
    send to its receive's end, same makespan; the clock's origin does not matter."""
    from partitioners.timeline import observed

    sim = run("sequential", [StageCosts(10, 20, 2), StageCosts(5, 15, 3)], [LinkCosts(5, 5)], labels_ms=1.0)
    t = 1.7e12  # wall clock in ms
    traces = {
        (0, 0): [
            ("SEND_LABELS", -1, t, t),
            ("F", 0, t, t + 10),
            ("SEND_ACT", 0, t + 10, t + 10),
            ("RECV_GRAD", 0, t + 10, t + 40),
            ("B", 0, t + 40, t + 60),
            ("STEP", -1, t + 60, t + 62),
        ],
        (1, 0): [
            ("RECV_LABELS", -1, t, t + 1),
            ("RECV_ACT", 0, t + 1, t + 15),
            ("F", 0, t + 15, t + 20),
            ("B", 0, t + 20, t + 35),
            ("SEND_GRAD", 0, t + 35, t + 35),
            ("STEP", -1, t + 35, t + 38),
        ],
    }
    obs = observed(traces, [1, 1])
    assert obs.step_ms == pytest.approx(sim.step_ms) == pytest.approx(62.0)
    for resource in ("stage 0", "stage 1", "link 0->1", "link 1->0", "labels 0->1"):
        assert spans(obs, resource) == spans(sim, resource), resource  # exact: whole ms in float64
    assert obs.busy_ms == pytest.approx([32.0, 23.0]) and obs.peak_in_flight == [1, 1]
    assert obs.num_micro_batches == 1 and obs.workers == [(0, 0), (1, 0)]
    assert timeline_png(obs)[:8] == b"\x89PNG\r\n\x1a\n"  # draws like a simulated step
    # a send whose receive is not in the traces
    broken = {k: [a for a in v if a[0] != "RECV_ACT"] for k, v in traces.items()}
    with pytest.raises(ValueError, match="SEND_ACT0 of stage stage 0 has no matching receive"):
        observed(broken, [1, 1])
    with pytest.raises(ValueError, match="runtime.trace=true"):
        observed({}, [1, 1])


# -- one device running two stages (U-shape), one uplink crossed by two wires ----------------


def test_two_stages_on_one_device_take_turns():
    # U-shape on 3 stages, GPipe, 2 micro-batches, a middle stage that takes no time, no link
    # cost. Free (two devices): stage 0 F0 [0,1] F1 [1,2]; stage 2 F0 [1,2] F1 [2,3] B0 [3,4]
    # B1 [4,5]; stage 0 B0 [4,5] B1 [5,6]: 6 ms. Stages 0 and 2 on one device: at 1 both
    # stage 0's F1 and stage 2's F0 are ready (the lower stage first): F1 [1,2], then stage 2
    # F0 [2,3] F1 [3,4] B0 [4,5]; at 5 stage 0's B0 and stage 2's B1 (stage 0 first): B0 [5,6],
    # stage 2 B1 [6,7], stage 0 B1 [7,8]: 8 ms, the device's whole work.
    stages = [StageCosts(1.0, 1.0), StageCosts(0.0, 0.0), StageCosts(1.0, 1.0)]
    links = [LinkCosts(0.0, 0.0)] * 2
    free = simulate(sch.build("gpipe", 3, 2), stages, links)
    shared = simulate(sch.build("gpipe", 3, 2), stages, links, shared=[(0, 2)])
    assert free.step_ms == pytest.approx(6.0)
    assert shared.step_ms == pytest.approx(8.0)
    owner = sorted(
        (iv.start_ms, iv.end_ms)
        for iv in shared.timeline
        if iv.resource in ("stage 0", "stage 2") and iv.kind != "STEP"
    )
    assert all(a[1] <= b[0] + 1e-12 for a, b in zip(owner, owner[1:], strict=False))  # never overlap
    assert spans(shared, "stage 0") == [
        ("F", 0, 0.0, 1.0),
        ("F", 1, 1.0, 2.0),
        ("B", 0, 5.0, 6.0),
        ("B", 1, 7.0, 8.0),
        ("STEP", -1, 8.0, 8.0),
    ]
    with pytest.raises(ValueError, match="cannot share a device"):
        simulate(sch.build("gpipe", 3, 2), stages, links, replicas=[1, 2, 1], shared=[(1, 2)])


def test_wires_on_one_uplink_carry_one_transfer_at_a_time():
    # stage 0 -> 1 activations and stage 2 -> 1 gradients both leave one zone: with the
    # uplink shared, the transfers of the two wires never overlap
    stages = [StageCosts(1.0, 1.0)] * 3
    links = [LinkCosts(5.0, 5.0), LinkCosts(5.0, 5.0)]
    channels = {"link 0->1": "home->cloud", "link 2->1": "home->cloud"}
    own = simulate(sch.build("1f1b", 3, 4), stages, links)
    up = simulate(sch.build("1f1b", 3, 4), stages, links, channels=channels)
    busy = sorted((iv.start_ms, iv.end_ms) for iv in up.timeline if iv.resource in channels)
    assert len(busy) == 8
    assert all(a[1] <= b[0] + 1e-12 for a, b in zip(busy, busy[1:], strict=False))
    assert up.step_ms > own.step_ms
    with pytest.raises(ValueError, match="no wire 'link 5->6'"):
        simulate(sch.build("1f1b", 3, 4), stages, links, channels={"link 5->6": "x"})


def test_devices_sharing_a_host_stretch_their_overlapping_compute():
    """``shared_cpus``: a host whose devices ask more threads than it has CPUs stretches the
    compute that overlaps there (mean-field processor sharing), and nothing else."""
    from partitioners.planner import simulate_plan

    plan = uniform_gpipe_plan()
    devs = [s.device for s in plan.stages]
    n = plan.num_stages
    free = dict(free_links=True)
    # every stage only STEPs (10 ms), all at once after instant forwards and backwards
    steps = [StageCosts(0.0, 0.0, 10.0)] * n
    alone = simulate_plan(plan, stage_costs=steps, **free)
    assert alone.step_ms == pytest.approx(10.0)
    one_core = [{"cpus": 1, "threads": {d: 1 for d in devs}}]
    # n one-thread STEPs on one core at once: each takes n times as long, as processor sharing has it
    assert simulate_plan(plan, stage_costs=steps, shared_cpus=one_core, **free).step_ms == pytest.approx(
        10.0 * n, rel=0.02
    )
    # enough cores, or a device whose own threads exceed the cores (timed so alone): no stretch
    enough = [{"cpus": n, "threads": {d: 1 for d in devs}}]
    assert simulate_plan(plan, stage_costs=steps, shared_cpus=enough, **free).step_ms == pytest.approx(10.0)
    wide = [{"cpus": 2, "threads": {devs[0]: 4}}]
    assert simulate_plan(plan, stage_costs=steps, shared_cpus=wide, **free).step_ms == pytest.approx(10.0)
    # GPipe's forwards and backwards follow each other across stages; only what overlaps stretches
    chain = [StageCosts(10.0, 20.0, 0.0)] * n
    base = simulate_plan(plan, stage_costs=chain, **free)
    shared = simulate_plan(plan, stage_costs=chain, shared_cpus=one_core, **free)
    assert base.step_ms < shared.step_ms < base.step_ms * n
    # on one core the host's compute cannot take less than all of it, one action after another
    total = sum(2 * (c.fwd_ms + c.bwd_ms) for c in chain)
    assert shared.step_ms >= total * 0.98
    assert shared.step_ms == pytest.approx(total, rel=0.15)


def test_cpu_devices_measured_slower_side_by_side_stretch_what_overlaps():
    """``shared_cpus[...]["side_by_side"]``: a CPU device measured k slower per thread computing
    beside it on its host (memory, caches) stretches its overlapping actions by ``1 + k * O``,
    O the measured neighbours' threads beside it, on top of the cores' share."""
    from partitioners.planner import simulate_plan

    plan = uniform_gpipe_plan()
    two = [s.device for s in plan.stages][:2]
    free = dict(free_links=True)
    steps = [StageCosts(0.0, 0.0, 10.0)] * plan.num_stages  # every STEP at once, 10 ms

    def host(cpus, side):
        return [{"cpus": cpus, "threads": {d: 1 for d in two}, "side_by_side": side}]

    slow = {"F": 0.0, "B": 0.0, "STEP": 0.25}
    both = host(2, {d: slow for d in two})
    assert simulate_plan(plan, stage_costs=steps, shared_cpus=both, **free).step_ms == pytest.approx(12.5, rel=0.02)
    # beside a device not measured (a GPU's worker): nothing counted
    one = host(2, {two[0]: slow})
    assert simulate_plan(plan, stage_costs=steps, shared_cpus=one, **free).step_ms == pytest.approx(10.0)
    # on one core: twice as long for the cores, and 1.25x that for the memory
    crowded = host(1, {d: slow for d in two})
    assert simulate_plan(plan, stage_costs=steps, shared_cpus=crowded, **free).step_ms == pytest.approx(25.0, rel=0.02)
    # a kind measured at 0 is not stretched; GPipe's forwards and backwards overlap only in part
    chain = [StageCosts(10.0, 20.0, 0.0)] * plan.num_stages
    base = simulate_plan(plan, stage_costs=chain, **free).step_ms
    assert simulate_plan(plan, stage_costs=chain, shared_cpus=both, **free).step_ms == pytest.approx(base)
    mem = host(2, {d: {"F": 0.5, "B": 0.5, "STEP": 0.0} for d in two})
    assert base < simulate_plan(plan, stage_costs=chain, shared_cpus=mem, **free).step_ms < base * 1.5


def test_step_barrier_steps_every_stage_together():
    """``step_barrier``: the workers' global gradient norm is an all-reduce over every worker
    before any optimizer step, so every STEP starts when the last stage reaches its own."""
    # sequential, M=1, free links: stage 0 F [0,1]; stage 1 F [1,2] B [2,3]; stage 0 B [3,4].
    # Stage 1's 10 ms STEP: on its own [3,13] (13 ms); with the barrier [4,14] (14 ms)
    stages = [StageCosts(1.0, 1.0, 1.0), StageCosts(1.0, 1.0, 10.0)]
    links = [LinkCosts(0.0, 0.0)]
    alone = simulate(sch.build("sequential", 2, 1), stages, links)
    joint = simulate(sch.build("sequential", 2, 1), stages, links, step_barrier=True)
    assert alone.step_ms == pytest.approx(13.0)
    assert joint.step_ms == pytest.approx(14.0)
    assert [iv[2:] for iv in spans(joint, "stage 1") if iv[0] == "STEP"] == [(4.0, 14.0)]
    assert [iv[2:] for iv in spans(joint, "stage 0") if iv[0] == "STEP"] == [(4.0, 5.0)]
    # a replicated stage all-reduces among its replicas first (2 ms), then the barrier:
    # stage 1 on 2 replicas, M=2 (one micro-batch each), GPipe: stage 0 F0 [0,1] F1 [1,2];
    # replica 0 F [1,2] B [2,3], replica 1 F [2,3] B [3,4]; their all-reduce [4,6]; stage 0
    # B0 [3,4] B1 [4,5]; every STEP from 6
    stages = [StageCosts(1.0, 1.0, 1.0), StageCosts(1.0, 1.0, 1.0, allreduce_ms=2.0)]
    rep = simulate(sch.build("gpipe", 2, 2), stages, links, replicas=[1, 2], step_barrier=True)
    steps = sorted((iv.resource, iv.start_ms) for iv in rep.timeline if iv.kind == "STEP")
    assert steps == [("stage 0", 6.0), ("stage 1.0", 6.0), ("stage 1.1", 6.0)]
    assert rep.step_ms == pytest.approx(7.0)
    # two stages on one device (U-shape) step one after the other
    u = [StageCosts(1.0, 1.0, 2.0), StageCosts(0.0, 0.0, 0.0), StageCosts(1.0, 1.0, 3.0)]
    both = simulate(sch.build("gpipe", 3, 1), u, [LinkCosts(0.0, 0.0)] * 2, shared=[(0, 2)], step_barrier=True)
    owner = sorted((iv.start_ms, iv.end_ms) for iv in both.timeline if iv.kind == "STEP" and iv.stage in (0, 2))
    assert owner[0][1] <= owner[1][0] and owner[1][1] - owner[0][0] == pytest.approx(5.0)
    # a schedule that cannot reach every STEP names the barrier
    stuck = [[Action(sch.STEP)], [Action(sch.RECV_ACT, 0), Action(sch.F, 0), Action(sch.STEP)]]
    with pytest.raises(DeadlockError, match="every stage's STEP"):
        simulate(stuck, [StageCosts(1.0, 1.0, 1.0)] * 2, links, step_barrier=True)
