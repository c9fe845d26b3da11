"""The pruning ladder: the ratios every node builds a pruned variant of its slice for.

Torch-free on purpose, so the node (shared/pruning.py) and the gateway's controller settings
take their default from this one definition.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_LADDER: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))
RATIO_TOLERANCE = 1e-6  # two ratios closer than this are the same rung


def missing_rungs(wanted: Sequence[float], offered: Sequence[float]) -> list[float]:
    """Ratios of ``wanted`` that ``offered`` does not have (a node would snap them to another rung)."""
    return [r for r in wanted if not any(abs(r - o) < RATIO_TOLERANCE for o in offered)]
