"""The node's work queue: timely requests first (earliest deadline), late ones after (oldest first), bounded."""

import queue
import threading

import pytest

from node_agent.deadline_queue import DeadlineQueue

SLO = 1.0


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(maxsize: int = 10, slo: float | None = SLO, ordered: bool = True) -> DeadlineQueue[str]:
    q = DeadlineQueue(maxsize, Clock(), ordered)
    q.slo_s = slo
    return q


def drain(q: DeadlineQueue) -> list[tuple[str, bool]]:
    out = []
    while q.qsize():
        out.append(q.get(timeout=0))
    return out


def test_timely_before_late_earliest_deadline_first_and_late_oldest_first():
    q = make()  # now 100, SLO 1 s: captured at or before 99 = late
    for name, capture in [("late-b", 98.5), ("fresh-b", 99.8), ("late-a", 97.0), ("fresh-a", 99.5)]:
        assert q.put(name, capture) is None
    assert drain(q) == [("fresh-a", False), ("fresh-b", False), ("late-a", True), ("late-b", True)]


def test_a_request_that_becomes_late_while_waiting_goes_behind_the_timely_ones():
    q = make()
    q.put("old", 99.4)
    q.put("new", 99.9)
    q._clock.now = 100.5  # "old" missed its deadline (100.4) meanwhile
    assert drain(q) == [("new", False), ("old", True)]


def test_without_slo_or_when_off_it_is_fifo_and_nothing_is_deferred():
    for q in (make(slo=None), make(ordered=False)):
        for name, capture in [("late", 90.0), ("fresh", 99.9), ("later", 80.0)]:
            q.put(name, capture)
        assert drain(q) == [("late", False), ("fresh", False), ("later", False)]


def test_an_slo_learnt_while_requests_wait_orders_them():
    q = make(slo=None)
    q.put("late", 90.0)
    q.put("fresh", 99.9)
    q.slo_s = SLO
    assert drain(q) == [("fresh", False), ("late", True)]


def test_full_drops_the_youngest_late_request():
    q = make(maxsize=3)
    for name, capture in [("late-old", 95.0), ("late-young", 98.0), ("fresh", 99.5)]:
        q.put(name, capture)
    assert q.put("fresh-2", 99.6) == "late-young"
    assert drain(q) == [("fresh", False), ("fresh-2", False), ("late-old", True)]


def test_full_drops_a_late_newcomer_that_would_be_served_last():
    q = make(maxsize=2)
    q.put("late", 95.0)
    q.put("fresh", 99.5)
    assert q.put("late-newcomer", 96.0) == "late-newcomer"
    assert drain(q) == [("fresh", False), ("late", True)]


def test_full_of_timely_requests_drops_the_latest_deadline():
    q = make(maxsize=2)
    q.put("a", 99.5)
    q.put("b", 99.6)
    assert q.put("c", 99.7) == "c"
    assert q.put("older", 99.4) == "b"  # it would have been served after the newcomer
    assert [name for name, _ in drain(q)] == ["older", "a"]


def test_full_fifo_drops_the_newcomer():
    q = make(maxsize=2, ordered=False)
    q.put("late", 90.0)
    q.put("fresh", 99.5)
    assert q.put("fresh-2", 99.9) == "fresh-2"
    assert [name for name, _ in drain(q)] == ["late", "fresh"]


def test_get_times_out_empty_and_wakes_on_put():
    q = make()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.01)
    got = []
    taker = threading.Thread(target=lambda: got.append(q.get(timeout=60)))
    taker.start()
    q.put("x", 99.9)
    taker.join(timeout=60)
    assert got == [("x", False)]


def test_maxsize_must_be_positive():
    with pytest.raises(ValueError):
        DeadlineQueue(0, Clock())


def test_an_idle_queue_is_claimed_once_and_a_busy_or_waiting_one_is_not():
    q = make()
    assert q.claim()  # idle: the receiving thread serves at once
    assert not q.claim() and not q.claim(arriving=False)  # in hand until done
    q.done()
    assert q.put("x", 99.9) is None
    assert not q.claim()  # something waits: queue behind it
    assert q.get(timeout=0) == ("x", False)
    assert not q.claim()  # the worker serves it
    q.done()
    assert q.claim(arriving=False)  # e.g. a calibration run
    q.done()


def test_input_that_waited_behind_a_served_request_is_queued_not_served_at_once():
    q = make()
    assert q.claim()
    q.done(input_waiting=True)
    assert q.claim(arriving=False)  # a calibration run in between leaves the refusal to the next arrival
    q.done()
    assert not q.claim()  # the request that waited: queued, so a backlog is served by deadline and shed
    assert q.claim()  # refused once only


def test_a_request_served_at_once_is_deferred_exactly_when_get_would_mark_it():
    q = make()  # now 100, SLO 1 s
    assert q.late(99.0) and not q.late(99.5)
    q.put("late", 99.0)
    assert q.get(timeout=0) == ("late", True)
    assert not make(slo=None).late(0.0) and not make(ordered=False).late(0.0)  # FIFO: nothing is deferred
