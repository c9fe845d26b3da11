"""The soak's settling: it reports a phase only once every frame sent is a row or a recorded failure, or, after a
bounded wait, says how many are still open."""

from __future__ import annotations

from edgeprune.bench.soak import settle


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
