"""Tier 1: the stage workers' transport over real gloo groups (two ranks as two threads of
this process): messages arrive whole and in order, and a step's receives posted ahead let a
sender's transfers finish before the receiver reaches them."""

import datetime
import threading

import pytest
import torch
import torch.distributed as dist

from splitlearn.stage.fabric import Group
from splitlearn.stage.transport import Transport

TIMEOUT = datetime.timedelta(seconds=20)


def pair(timeout: datetime.timedelta = TIMEOUT) -> tuple[Group, Group]:
    """Two ranks of one gloo group, built at once (their rendezvous waits for both)."""
    store = dist.HashStore()
    made: dict[int, Group] = {}
    threads = [
        threading.Thread(target=lambda r=r: made.__setitem__(r, Group(store, "t", [0, 1], r, timeout))) for r in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return made[0], made[1]


def messages() -> list[tuple[torch.Tensor, torch.Tensor | None, str]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(2, 5, 8, generator=g), torch.ones(2, 5, dtype=torch.int64), "none"),
        (torch.randn(3, 7, 4, generator=g, dtype=torch.float32).to(torch.bfloat16), None, "none"),
        (torch.randn(2, 5, 8, generator=g), None, "fp16"),
        (torch.randint(0, 100, (4, 9), generator=g), None, "none"),
    ]


@pytest.mark.parametrize("prepost", [False, True])
def test_messages_arrive_whole_and_in_order(prepost):
    g0, g1 = pair()
    sender, receiver = Transport(torch.device("cpu"), None), Transport(torch.device("cpu"), None)
    sent = messages()
    if prepost:
        receiver.prepost([(0, g1)] * len(sent))
    for t, mask, codec in sent:
        sender.send(t, 1, g0, codec, mask)
    got = [receiver.recv(0, g1) for _ in sent]
    sender.wait_sends()
    for (t, mask, codec), (r, rmask) in zip(sent, got, strict=True):
        assert r.dtype == t.dtype and r.shape == t.shape
        if codec == "fp16":
            torch.testing.assert_close(r, t, rtol=1e-3, atol=1e-3)
        else:
            assert torch.equal(r, t)
        assert (rmask is None) == (mask is None) and (mask is None or torch.equal(rmask, mask))


def test_posted_receives_let_the_sends_finish_before_the_receiver_takes_them():
    """gloo moves a message only once its receive is posted: with the step's receives posted
    ahead, the sender's transfers complete while the receiver has not reached them, and the
    receiver then takes them in order. Without, the sends wait for the receiver."""
    g0, g1 = pair()
    sender, receiver = Transport(torch.device("cpu"), None), Transport(torch.device("cpu"), None)
    big = [torch.full((64, 1024), float(k)) for k in range(3)]  # 256 KiB each

    def sends_finished(within_s: float) -> bool:
        done = threading.Event()

        def send_all() -> None:
            for t in big:
                sender.send(t, 1, g0)
            sender.wait_sends()
            done.set()

        threading.Thread(target=send_all, daemon=True).start()
        return done.wait(within_s)

    receiver.prepost([(0, g1)] * len(big))
    assert sends_finished(10.0), "posted receives did not take the transfers"
    assert [int(receiver.recv(0, g1)[0][0, 0]) for _ in big] == [0, 1, 2]
    # and at the actions: the transfers wait for the receiver
    assert not sends_finished(1.0)
    assert [int(receiver.recv(0, g1)[0][0, 0]) for _ in big] == [0, 1, 2]


def test_a_posted_receive_that_times_out_fails_the_action_that_waits_for_it():
    _, g1 = pair(datetime.timedelta(seconds=1))
    receiver = Transport(torch.device("cpu"), None)
    receiver.prepost([(0, g1), (0, g1)])  # nothing is sent
    with pytest.raises(RuntimeError, match="(?i)timed out|timeout"):
        receiver.recv(0, g1)
    assert not receiver._inboxes  # the next step posts afresh
