"""Pure: prune events' follow-ups, including those a restarted gateway resumes (gateway/prune_log.py)."""

from __future__ import annotations

import pytest

from gateway.prune_log import PruneLog


def test_a_resumed_event_keeps_its_stored_latencies_until_its_follow_up_is_written():
    """The gateway was down for minutes: the first live result (at 500 s) must not push out the latencies stored
    in the resumed event's window (100-110 s) before the tick writes its follow-up."""
    log = PruneLog(follow_up_s=10.0)
    log.resume([{"ts": 100.0, "kind": "set"}], [(101.0, 0.2), (105.0, 0.4), (111.0, 5.0)])
    log.observe_latency(500.0, 9.9)
    assert log.follow_ups(500.0) == [{"ts": 100.0, "kind": "set", "observed_count": 2,
                                      "observed_p50_s": pytest.approx(0.3), "observed_p95_s": pytest.approx(0.39)}]
    log.observe_latency(501.0, 9.9)  # written: its latencies are let go
    assert log.recent[0][0] >= 501.0 - 4 * 10.0


def test_latencies_are_kept_for_four_follow_ups_when_no_event_awaits_one():
    log = PruneLog(follow_up_s=10.0)
    for ts in (1.0, 20.0, 45.0):
        log.observe_latency(ts, 0.1)
    assert [ts for ts, _ in log.recent] == [20.0, 45.0]
