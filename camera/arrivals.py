"""When frames arrive: camera-trap bursts (a seeded generator) or a replayed CSV of capture times.

Camera traps do not send a steady stream: a passing animal fires a *sequence* of triggers (3 frames
each, ~1 s apart; ~3 s between triggers while the animal stays), then the camera sleeps for minutes.
The generator follows the characterisation of Kline et al., "Characterizing and Modeling AI-Driven
Animal Ecology Studies at the Edge" (IEEE/ACM SEC 2024), per camera:

- gap between sequences: lognormal, median ~116 s, IQR ~47–375 s (mu = ln 116, sigma ≈ 1.53);
- triggers per sequence: 1 with probability ~0.52, else 1 + a geometric number, with the overall
  mean ~4.4 triggers per sequence (so the multi-trigger sequences average ~8.1 triggers);
- 3 frames per trigger, 1 s apart; 3 s from one trigger's first frame to the next one's.

``time_scale`` divides every time (a factor of 10 turns an hour of traps into 6 minutes, and a
burst's 1 frame/s into 10 frames/s), the same for generated and replayed arrivals.

Pure: no clock, no MQTT; the camera (:mod:`camera.simulator`) paces what these functions return.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Arrival:
    """One frame: seconds after the start (already time-scaled), the camera that takes it, its sequence."""

    at_s: float
    camera: str
    sequence: int = 0


@dataclass(frozen=True)
class BurstParams:
    """Per-camera burst statistics (defaults: the Orinoquía day characterised by Kline et al.)."""

    gap_median_s: float = 116.0
    gap_sigma: float = 1.53
    p_single: float = 0.52
    mean_triggers: float = 4.4
    frames_per_trigger: int = 3
    frame_gap_s: float = 1.0
    trigger_gap_s: float = 3.0

    def __post_init__(self) -> None:
        if self.gap_median_s <= 0 or self.gap_sigma < 0:
            raise ValueError("gap_median_s must be positive and gap_sigma non-negative")
        if not 0 <= self.p_single <= 1 or self.mean_triggers < 1:
            raise ValueError("p_single must lie in [0, 1] and mean_triggers be >= 1")
        if self.p_single < 1 and self.mean_triggers < 2 - self.p_single:
            raise ValueError("mean_triggers too low for sequences of 2+ triggers with probability 1 - p_single")
        if self.frames_per_trigger < 1 or self.frame_gap_s < 0 or self.trigger_gap_s < 0:
            raise ValueError("frames_per_trigger must be >= 1 and gaps non-negative")

    @property
    def multi_mean_triggers(self) -> float:
        """Mean triggers of a sequence that has more than one (what the overall mean implies)."""
        return (self.mean_triggers - self.p_single) / (1 - self.p_single) if self.p_single < 1 else 1.0

    @property
    def gap_quartiles_s(self) -> tuple[float, float]:
        z = 0.6744897501960817  # standard normal 75th percentile
        return self.gap_median_s * math.exp(-z * self.gap_sigma), self.gap_median_s * math.exp(z * self.gap_sigma)

    def triggers(self, rng: np.random.Generator) -> int:
        if rng.random() < self.p_single:
            return 1
        # 1 + Geometric(q) on {1, 2, ...} has mean 1 + 1/q
        q = 1.0 / (self.multi_mean_triggers - 1.0)
        return 1 + int(rng.geometric(min(q, 1.0)))

    def sequence_offsets(self, triggers: int) -> list[float]:
        """Frame times within one sequence, from its first frame."""
        return [t * self.trigger_gap_s + f * self.frame_gap_s
                for t in range(triggers) for f in range(self.frames_per_trigger)]


def burst_arrivals(params: BurstParams, cameras: list[str], duration_s: float, seed: int,
                   time_scale: float = 1.0) -> list[Arrival]:
    """Every frame of ``cameras`` in ``duration_s`` (scaled seconds), merged in time order.

    Each camera gets its own random stream from ``seed``, so adding a camera does not change the
    others' frames. The first sequence starts a uniform fraction of a gap in (a camera observed
    from an arbitrary moment), so N cameras do not all fire at 0.
    """
    if time_scale <= 0 or duration_s < 0:
        raise ValueError("time_scale must be positive and duration_s non-negative")
    horizon = duration_s * time_scale  # in trace seconds
    mu = math.log(params.gap_median_s)
    out: list[Arrival] = []
    sequence = 0
    for index, camera in enumerate(cameras):
        rng = np.random.default_rng([seed, index])
        start = rng.uniform() * rng.lognormal(mu, params.gap_sigma)
        while start < horizon:
            offsets = params.sequence_offsets(params.triggers(rng))
            out += [Arrival((start + o) / time_scale, camera, sequence) for o in offsets if start + o < horizon]
            sequence += 1
            start += offsets[-1] + rng.lognormal(mu, params.gap_sigma)
    return sorted(out, key=lambda a: (a.at_s, a.camera))


_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


def _parse_time(text: str, time_format: str | None, where: str) -> float:
    """Epoch seconds from ``time_format`` (strptime), else a number, else ISO 8601."""
    text = text.strip()
    try:
        if time_format:
            return datetime.strptime(text, time_format).timestamp()
        try:
            return float(text)
        except ValueError:
            return datetime.fromisoformat(text).timestamp()
    except ValueError:
        hint = f"the format {time_format!r}" if time_format else "a number or ISO 8601 (pass --time-format)"
        raise ValueError(f"{where}: {text[:40]!r} does not match {hint}") from None


def replay_arrivals(path: Path, time_column: str, camera_column: str | None = None,
                    time_format: str | None = None, time_scale: float = 1.0, default_camera: str = "cam-1",
                    duration_s: float = 0.0) -> list[Arrival]:
    """Capture times of a CSV as arrivals from the first capture on, divided by ``time_scale``.

    Camera names are made topic-safe (characters other than letters, digits and ``_.:-`` become ``_``).
    ``duration_s`` > 0 keeps only arrivals before it (scaled seconds).
    """
    if time_scale <= 0:
        raise ValueError("time_scale must be positive")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        for needed in filter(None, (time_column, camera_column)):
            if needed not in columns:
                raise ValueError(f"{path}: no column {needed!r} (columns: {', '.join(columns) or 'none'})")
        rows = [(_parse_time(row[time_column] or "", time_format, f"{path} line {n}"),
                 _ID_UNSAFE.sub("_", row[camera_column])[:64] if camera_column and row[camera_column]
                 else default_camera)
                for n, row in enumerate(reader, start=2)]
    if not rows:
        raise ValueError(f"{path}: no rows")
    first = min(t for t, _ in rows)
    arrivals = sorted((Arrival((t - first) / time_scale, camera) for t, camera in rows),
                      key=lambda a: (a.at_s, a.camera))
    return [a for a in arrivals if not duration_s or a.at_s < duration_s]


def sequence_stats(arrivals: list[Arrival], params: BurstParams, time_scale: float = 1.0) -> dict:
    """What a test (or a user checking a trace) compares with the parameters, in trace seconds."""
    by_sequence: dict[int, list[float]] = {}
    for a in arrivals:
        by_sequence.setdefault(a.sequence, []).append(a.at_s * time_scale)
    frames = np.array([len(v) for v in by_sequence.values()])
    triggers = frames / params.frames_per_trigger
    ends = {s: v[-1] for s, v in by_sequence.items()}
    first_of = {s: v[0] for s, v in by_sequence.items()}
    camera_of = {a.sequence: a.camera for a in arrivals}
    gaps = []
    for camera in set(camera_of.values()):
        seqs = sorted((s for s in by_sequence if camera_of[s] == camera), key=first_of.get)
        gaps += [first_of[b] - ends[a] for a, b in zip(seqs, seqs[1:])]
    return {"sequences": int(frames.size), "frames": int(frames.sum()),
            "single_fraction": float((triggers == 1).mean()), "mean_triggers": float(triggers.mean()),
            "gap_quartiles_s": [float(q) for q in np.percentile(gaps, [25, 50, 75])] if gaps else []}
