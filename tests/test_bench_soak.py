"""The soak's settling (it reports a phase only once every frame sent is a row or a recorded failure, or, after a
bounded wait, says how many are still open) and its forged phase's catalogue, against a real broker."""

from __future__ import annotations

import pytest

from edgeprune.bench import intruder
from edgeprune.bench.soak import settle
from tests.conftest import AUTH


def row(attempted: int, accepted: int, rows: int, failures: int) -> dict:
    return {"attempted": attempted, "accepted": accepted, "rows": rows, "failures": failures,
            "unaccounted": attempted - rows - failures, "in_flight": accepted - rows - failures}


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_the_soak_waits_for_frames_not_yet_accepted():
    """A hung stage-1 node's frames wait in the broker, unannounced: every *accepted* frame is settled (the old
    criterion, which reported here with 17 unaccounted) while the frames sent are not."""
    t = FakeTime()
    readings = iter([None, row(78, 61, 48, 13), row(78, 61, 48, 13), row(78, 78, 60, 18)])
    reported = settle(lambda: next(readings), 120, poll_s=1, clock=t.clock, sleep=t.sleep)
    assert reported["unaccounted"] == 0 and reported["rows"] == 60 and reported["settle_s"] == 3


def test_the_soak_reports_what_is_still_open_after_a_bounded_wait():
    t = FakeTime()
    reported = settle(lambda: row(78, 70, 48, 13), 10, poll_s=1, clock=t.clock, sleep=t.sleep)
    assert (reported["unaccounted"], reported["in_flight"], reported["settle_s"]) == (17, 9, 10)


@pytest.mark.integration
def test_every_forgery_the_soak_expects_the_broker_to_refuse_is_refused(broker):
    """The soak's forged phase counts on this split: what the ACL must refuse (reason 135), and what only the
    gateway can reject (a login's own topic, another device's name in the payload), which the broker delivers."""
    auth = AUTH[broker.port]
    auth.settings("cam-soak", "camera")  # the soak's camera, made on demand
    rows = intruder.try_all(broker.port, auth.credentials.password, ["node-1", "node-2"], "cam-soak")
    assert {r["login"] for r in rows} == {"cam-soak", "node-1", "web", "gateway"}
    not_refused = [f"{r['login']} -> {r['topic']}: {r['puback']}" for r in rows
                   if r["expect"] == "refused" and not r["refused"]]
    assert not_refused == []
    delivered = [r for r in rows if r["expect"] == "rejected"]
    assert delivered and all(r["puback"] is not None and not r["refused"] for r in delivered)


def test_the_forged_verdict_lists_what_got_through():
    rows = [{"login": "node-1", "topic": "t/a", "expect": "refused", "puback": 135, "refused": True},
            {"login": "node-1", "topic": "t/b", "expect": "refused", "puback": 0, "refused": False},
            {"login": "node-1", "topic": "t/c", "expect": "rejected", "puback": 16, "refused": False}]
    summary = intruder.verdict(rows, mismatches_recorded=1, stored_forged=0)
    assert summary["forged_refused_by_broker"] == 1 and summary["forged_should_be_refused"] == 2
    assert summary["forged_not_refused"] == ["node-1 -> t/b"]
    assert summary["forged_delivered_to_gateway"] == 1 and summary["forged_rejected_recorded"] == 1
