"""The per-block accuracy model file `edgeprune calibrate` writes: found, checked against the weights, loaded.

File I/O at start-up (the gateway, the benchmarks); the fit itself is :class:`gateway.curves.AccuracyFit`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gateway.curves import AccuracyFit
from shared.model import accuracy_model_beside

log = logging.getLogger(__name__)


def load_block_accuracy(path: Path | None, fingerprint: str, checkpoint: Path | None = None) -> AccuracyFit | None:
    """The per-block accuracy model, if one exists for these weights (None disables the controller).

    Default: the one `edgeprune calibrate` wrote beside ``checkpoint`` (the shipped one if None).
    """
    path = path or accuracy_model_beside(checkpoint)
    if not path.exists():
        log.warning("no accuracy model at %s: the pruning controller stays off until `edgeprune calibrate`", path)
        return None
    data = json.loads(path.read_text())
    if data.get("model_fingerprint") not in (None, fingerprint):
        log.warning("accuracy model %s was calibrated for other weights (%s, running %s): controller off",
                    path, data.get("model_fingerprint"), fingerprint)
        return None
    return AccuracyFit.from_dict(data["fit"])
