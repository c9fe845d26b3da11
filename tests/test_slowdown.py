"""The per-frame slowdown detector: a spike does not move the estimate, k agreeing frames do."""

from __future__ import annotations

import pytest

from gateway.slowdown import SlowdownDetector


def feed(detector: SlowdownDetector, factors: list[float], node: str = "node-1", start: float = 0.0) -> list:
    return [c for i, f in enumerate(factors)
            if (c := detector.observe(start + i, node, compute_s=0.02 * f, calibrated_s=0.02)) is not None]


def test_a_spike_does_not_move_the_estimate():
    detector = SlowdownDetector(frames=3, margin=0.5)
    assert feed(detector, [1.0, 1.1, 8.0, 1.0, 0.9, 9.0, 9.0, 1.0, 1.2]) == []
    assert detector.estimate("node-1") == 1.0


def test_k_slowed_frames_move_it_to_their_median_and_recovery_moves_it_back():
    detector = SlowdownDetector(frames=3, margin=0.5)
    changes = feed(detector, [1.0, 6.2, 5.8, 6.0])
    assert [(c.ts, c.previous, c.estimate) for c in changes] == [(3, 1.0, pytest.approx(6.0))]
    assert feed(detector, [6.1, 5.9, 6.3], start=4) == []  # agrees with the estimate: no move
    back = feed(detector, [1.1, 1.0, 1.05], start=7)
    assert [c.estimate for c in back] == [pytest.approx(1.05)]
    faster = feed(detector, [0.5, 0.4, 0.6], start=10)  # never assumed faster than calibrated
    assert [c.estimate for c in faster] == [1.0] and feed(detector, [0.5, 0.4, 0.6], start=13) == []


def test_a_second_level_needs_fresh_agreement_and_nodes_are_apart():
    detector = SlowdownDetector(frames=2, margin=0.25)
    feed(detector, [3.0, 3.0])
    assert detector.estimate("node-1") == 3.0 and detector.estimate("node-2") == 1.0
    assert feed(detector, [6.0], start=2) == []  # one frame after a move is not yet agreement
    assert [c.estimate for c in feed(detector, [6.0], start=3)] == [6.0]
    detector.forget("node-1")
    assert detector.estimate("node-1") == 1.0


def test_bad_samples_and_settings_are_refused():
    detector = SlowdownDetector()
    assert detector.observe(0, "node-1", 0.0, 0.02) is None and detector.observe(0, "node-1", 0.02, -1) is None
    with pytest.raises(ValueError):
        SlowdownDetector(frames=0)
