"""Request ledger and desired-state guard without a broker: what the gateway may believe."""

from __future__ import annotations

from gateway.accounting import DesiredGuard, RequestLedger, Verdict
from gateway.liveness import Liveness
from node_agent.runtime import plausible_capture


def test_result_counts_once_and_only_for_an_accepted_request():
    ledger = RequestLedger()
    assert ledger.result("r1", "cam-1", b"fake") is Verdict.UNKNOWN  # forged before stage 1 saw it
    assert ledger.accept("r1", "cam-1", 100.0)
    assert not ledger.accept("r1", "cam-1", 100.5)  # a redelivered announcement
    assert ledger.in_flight == 1
    assert ledger.result("r1", "cam-1", b"genuine") is Verdict.STORE
    assert ledger.result("r1", "cam-1", b"genuine") is Verdict.REDELIVERED
    assert ledger.result("r1", "cam-1", b"tiger, confidence 1.0") is Verdict.CONFLICT
    assert ledger.in_flight == 0


def test_result_from_another_camera_is_a_conflict_and_the_genuine_one_still_counts():
    ledger = RequestLedger()
    ledger.accept("r1", "cam-1", 0.0)
    assert ledger.result("r1", "cam-9", b"x") is Verdict.CONFLICT
    assert ledger.result("r1", "cam-1", b"y") is Verdict.STORE


def test_every_accepted_request_ends_as_a_row_or_one_failure():
    ledger = RequestLedger()
    for i, ts in enumerate([0.0, 1.0, 2.0, 20.0]):
        ledger.accept(f"r{i}", "cam", ts)
    assert ledger.fail("r0", "dropped")
    assert not ledger.fail("r0", "expired")  # first reason wins
    assert not ledger.fail("nope", "dropped")
    assert ledger.result("r1", "cam", b"ok") is Verdict.STORE
    assert not ledger.fail("r1", "internal")  # already a row
    assert ledger.expire(now=40.0, timeout_s=30.0) == ["r2"]
    assert ledger.in_flight == 1  # r3 is still young
    assert ledger.result("r2", "cam", b"late") is Verdict.LATE  # a row after all
    assert ledger.result("r0", "cam", b"late") is Verdict.LATE


def test_restored_ledger_knows_stored_and_failed_requests():
    ledger = RequestLedger()
    ledger.restore("a", "cam", 0.0, stored=True, failed=None)
    ledger.restore("b", "cam", 0.0, stored=False, failed="dropped")
    ledger.restore("c", "cam", 0.0, stored=False, failed=None, node_id="node-1")
    assert ledger.in_flight == 1 and ledger.last_known("c") == (0.0, "node-1")
    assert ledger.result("a", "cam", b"anything") is Verdict.REDELIVERED
    assert ledger.result("c", "cam", b"x") is Verdict.STORE


def test_ledger_is_bounded():
    ledger = RequestLedger(capacity=3)
    for i in range(5):
        ledger.accept(f"r{i}", "cam", float(i))
    assert len(ledger) == 3 and ledger.in_flight == 3
    assert ledger.result("r0", "cam", b"x") is Verdict.UNKNOWN


def test_guard_knows_only_what_it_issued():
    guard = DesiredGuard({"node-1": b'{"ratio":0.3,"seq":4}'})
    assert guard.own("node-1", b'{"ratio":0.3,"seq":4}')
    assert not guard.own("node-1", b'{"ratio":0.9,"seq":1000000}')
    assert not guard.own("node-2", b'{"ratio":0.0,"seq":1}')
    guard.issue("node-2", b"p")
    assert guard.own("node-2", b"p") and guard.issued("node-2") == b"p"
    guard.issue("node-2", b"q")
    assert guard.own("node-2", b"p") and guard.issued("node-2") == b"q"  # a late echo of an earlier issue
    guard.forget("node-2")
    assert guard.issued("node-2") is None


def test_capture_time_window():
    assert plausible_capture(1000.0, 1001.0, past_s=86400, future_s=300)
    assert not plausible_capture(1001.0 - 28e6, 1001.0, past_s=86400, future_s=300)
    assert not plausible_capture(2000.0, 1001.0, past_s=86400, future_s=300)


def test_silent_node_is_reported_once_and_comes_back_when_heard():
    liveness = Liveness(silence_s=5.0)
    liveness.heard("node-1", 0.0)
    liveness.heard("node-2", 0.0)
    liveness.heard("node-2", 4.0)
    assert liveness.newly_silent(6.0) == ["node-1"]
    assert liveness.newly_silent(7.0) == []  # reported once
    assert liveness.is_silent("node-1")
    assert liveness.heard("node-1", 8.0)  # back
    assert not liveness.heard("node-1", 9.0)
    liveness.gone("node-2")  # its will said offline: the broker's word, not silence
    assert liveness.newly_silent(100.0) == ["node-1"]


def test_a_frame_served_twice_is_a_duplicate_counted_once_not_a_conflict():
    """A replica killed between publishing and acknowledging: the survivor serves the frame again (issue 25)."""
    ledger = RequestLedger()
    ledger.accept("r1", "cam-1", 0.0)
    assert ledger.result("r1", "cam-1", b"first", capture_ts=5.0) is Verdict.STORE
    assert ledger.result("r1", "cam-1", b"served again", capture_ts=5.0) is Verdict.DUPLICATE
    assert ledger.result("r1", "cam-1", b"served again", capture_ts=5.0) is Verdict.REDELIVERED  # its redelivery
    assert ledger.result("r1", "cam-1", b"first", capture_ts=5.0) is Verdict.REDELIVERED
    assert ledger.result("r1", "cam-1", b"another frame", capture_ts=6.0) is Verdict.CONFLICT
    assert ledger.result("r1", "cam-9", b"another camera", capture_ts=5.0) is Verdict.CONFLICT
    assert ledger.result("r1", "cam-1", b"capture unknown") is Verdict.CONFLICT
