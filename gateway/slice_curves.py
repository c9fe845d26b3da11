"""Pure: which latency curve the controller may use for each node; no MQTT, no clock, no files.

A curve counts only for the slice it was measured on in the current placement; a node that moved gets a
*provisional* one until it has measured its new blocks; a calibration whose ratios lack a rung of the
configured ladder is refused (:class:`LadderMismatch`). :class:`gateway.control_loop.ControlLoop` holds one
and rebuilds its controller whenever a curve comes or goes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from gateway.curves import SliceLatencyFit, fit_latency
from shared.ladder import missing_rungs
from shared.schemas import ModelProfile, SliceCalibration

log = logging.getLogger(__name__)

Blocks = tuple[int, int]


class LadderMismatch(ValueError):
    """A node calibrated other ratios than the configured ladder: it would snap the controller's choices."""


class SliceCurves:
    def __init__(self) -> None:
        self.fits: dict[str, SliceLatencyFit] = {}
        self.provisional: set[str] = set()  # nodes whose curve is predicted for a slice they have not measured
        self._fit_blocks: dict[str, Blocks] = {}  # which slice each fit was measured on
        self._ladder_mismatch: dict[str, str] = {}  # node -> why its calibration was refused
        self._latest_calibration: dict[str, SliceCalibration] = {}  # for a placement that arrives after it

    def waiting_reason(self, nodes: Sequence[str]) -> str | None:
        """Why the controller cannot run over ``nodes`` yet (a refused ladder, a missing curve), or None."""
        refused = [self._ladder_mismatch[n] for n in nodes if n in self._ladder_mismatch]
        if refused:
            return "; ".join(refused)
        missing = [n for n in nodes if n not in self.fits]
        if missing:
            return f"waiting for the calibration of {', '.join(missing)}"
        return None

    def keep_for(self, slices: Mapping[str, Blocks]) -> list[SliceCalibration]:
        """A new placement: curves of other slices go; returns the nodes' latest calibrations that fit their new
        slice (a restarted gateway receives the retained calibrations before it has placed anything)."""
        self.fits = {n: f for n, f in self.fits.items() if self._fit_blocks.get(n) == slices.get(n)}
        self.provisional -= {n for n in self.provisional if n not in self.fits}
        return [c for n, c in list(self._latest_calibration.items())
                if n not in self.fits and slices.get(n) == (c.first_block, c.last_block)]

    def predict_moved(self, slices: Mapping[str, Blocks], profiles: Mapping[str, ModelProfile]) -> None:
        """Provisional curves for the nodes still without one (see ControlLoop.set_placement)."""
        for node, blocks in slices.items():
            if node not in self.fits and node in profiles:
                self._provisional_fit(node, blocks, profiles[node])

    def _provisional_fit(self, node: str, blocks: Blocks, profile: ModelProfile) -> None:
        """Predict ``node``'s curve on ``blocks``: its last calibration scaled by its own profile's time of the
        new blocks over the old ones."""
        calibration = self._latest_calibration.get(node)
        if calibration is None or node in self._ladder_mismatch:
            return
        times = [b.latency_s for b in profile.blocks]
        if max(blocks[1], calibration.last_block) >= len(times):
            return
        measured_on = sum(times[calibration.first_block:calibration.last_block + 1])
        if measured_on <= 0:
            return
        scale = sum(times[blocks[0]:blocks[1] + 1]) / measured_on
        try:
            fit = fit_latency(calibration.ratios, [t * scale for t in calibration.latency_s])
            fit.best()
        except ValueError:
            return
        self.fits[node] = fit
        self._fit_blocks[node] = blocks
        self.provisional.add(node)
        log.info("%s: provisional curve for blocks %d-%d (its blocks %d-%d's calibration x %.2f from its profile) "
                 "until it has measured them", node, blocks[0], blocks[1], calibration.first_block,
                 calibration.last_block, scale)

    def add(self, calibration: SliceCalibration, blocks: Blocks | None, ladder: Sequence[float]) -> dict | None:
        """Fit the node's curve if ``calibration`` is for its slice ``blocks``; returns the calibrations table row.

        A ladder rung the node has no variant for raises :class:`LadderMismatch` (its curve goes); a curve that
        cannot be fitted raises ValueError and the previous one stays.
        """
        node = calibration.node_id
        if blocks != (calibration.first_block, calibration.last_block):
            if node not in self.provisional:  # keep what the provisional curve was scaled from
                self._latest_calibration[node] = calibration
            return None
        self._latest_calibration[node] = calibration
        self.provisional.discard(node)
        missing = missing_rungs(ladder, calibration.ratios)
        if missing:
            self._ladder_mismatch[node] = (
                f"the controller ladder has {', '.join(f'{r:g}' for r in missing)} which {node} has "
                f"no variant for (it calibrated {', '.join(f'{r:g}' for r in calibration.ratios)}): "
                "set [controller] ladder to ratios the nodes build")
            self.fits.pop(node, None)
            raise LadderMismatch(self._ladder_mismatch[node])
        self._ladder_mismatch.pop(node, None)
        fit = fit_latency(calibration.ratios, calibration.latency_s)
        best = fit.best()  # raises ValueError when no fit is usable: keep the previous state then
        self.fits[node] = fit
        self._fit_blocks[node] = blocks
        return {"node_id": node, "measured_at": calibration.measured_at,
                "placement_version": calibration.placement_version, "first_block": calibration.first_block,
                "last_block": calibration.last_block, "fit": fit.to_dict(), "best": best.kind,
                "r2_linear": fit.linear.r2, "r2_quadratic": fit.quadratic.r2}

    def forget(self, node_id: str) -> None:
        """A retired node: no curve, nothing kept to predict one from."""
        self.fits.pop(node_id, None)
        self._fit_blocks.pop(node_id, None)
        self._ladder_mismatch.pop(node_id, None)
        self._latest_calibration.pop(node_id, None)
        self.provisional.discard(node_id)
