"""Camera-trap simulator and reference client.

Real cameras need nothing of this: publishing a JPEG or PNG file to
``<root>/camera/<camera_id>/frame`` (``mosquitto_pub -f photo.jpg -t …``) is a frame. This
module shows the optional extras (MQTT v5 user properties ``request_id`` and ``capture_ts``)
and generates traffic for demos and benchmarks: synthetic scenes, or real image files from a
folder published as they are (``images``), so a benchmark can run on real camera frames.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from camera.arrivals import Arrival, BurstParams, burst_arrivals, replay_arrivals
from camera.publisher import FramePublisher
from shared.imaging import encode_jpeg, encode_png
from shared.schemas import TRUE_LABEL_PROPERTY
from shared.settings import CameraSettings, MqttSettings

log = logging.getLogger(__name__)


def synthetic_scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A cheap stand-in for a camera-trap frame: textured ground, an animal-like blob, sensor noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 160, size=3)
    ground = base + 60 * (yy[..., None] - 0.5) * rng.uniform(-1, 1, size=3)
    cy, cx = rng.uniform(0.3, 0.7, size=2)
    ry, rx = rng.uniform(0.08, 0.25, size=2)
    blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    ground[blob] = rng.uniform(0, 255, size=3)
    frame = ground + rng.normal(0, 8, size=ground.shape)
    return np.clip(frame, 0, 255).astype(np.uint8)


def camera_frame(rng: np.random.Generator, size: int, image_format: str) -> bytes:
    """The next encoded frame of a seeded camera (tests regenerate the same frames from the seed)."""
    pixels = synthetic_scene(rng, size)
    return encode_png(pixels) if image_format == "png" else encode_jpeg(pixels)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_files(folder: Path) -> list[Path]:
    """The JPEG/PNG files of ``folder`` in name order; a clear error when there are none."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no .jpg, .jpeg or .png files in {folder}")
    return files


def folder_frames(files: list[Path]) -> Iterator[bytes]:
    """Each file's bytes unchanged (native size and encoding), looping; read when sent, so folders may be large."""
    for path in itertools.cycle(files):
        yield path.read_bytes()


def inter_arrivals(rate_hz: float, kind: str, rng: np.random.Generator) -> Iterator[float]:
    """Gaps between frames: constant, or exponential (a Poisson process) with the same mean."""
    while True:
        yield 1.0 / rate_hz if kind == "fixed" else float(rng.exponential(1.0 / rate_hz))


DAY_S = 24 * 3600.0


def arrival_schedule(s: CameraSettings, rng: np.random.Generator) -> Iterator[Arrival]:
    """The frames to send, in time order: a steady/Poisson rate, camera-trap bursts or a replayed trace.

    Traces are read here, at once, so a bad file fails before the camera connects.
    """
    if s.arrival == "bursts":
        cameras = [s.camera_id] if s.cameras == 1 else [f"{s.camera_id}-{k + 1}" for k in range(s.cameras)]
        return iter(burst_arrivals(BurstParams(), cameras, s.duration_s or DAY_S / s.time_scale, s.seed,
                                   s.time_scale))
    if s.arrival == "replay":
        if s.trace_csv is None:
            raise ValueError("arrival 'replay' needs trace_csv (--trace-csv PATH)")
        return iter(replay_arrivals(s.trace_csv, s.time_column, s.camera_column, s.time_format, s.time_scale,
                                    s.camera_id, s.duration_s))
    return (Arrival(at, s.camera_id) for at in itertools.accumulate(inter_arrivals(s.rate_hz, s.arrival, rng),
                                                                     initial=0.0))


# The next frame to publish and its ground-truth class index (None: unlabelled). Labelled test frames come from
# the offline dataset tools (``edgeprune.dataset.LabelledFrames``), which `edgeprune camera --labelled` hands in.
FrameSource = Callable[[], tuple[bytes, int | None]]


def synthetic_frames(seed: int, size: int, image_format: str) -> FrameSource:
    """Seeded synthetic scenes (:func:`camera_frame`), unlabelled."""
    scenes = np.random.default_rng(seed)
    return lambda: (camera_frame(scenes, size, image_format), None)


def folder_source(folder: Path) -> FrameSource:
    """A folder's image files (:func:`folder_frames`), unlabelled; FileNotFoundError at once if it has none."""
    files = folder_frames(image_files(folder))
    return lambda: (next(files), None)


FRAME_MAKING_MARGIN_S = 0.01  # making a frame (a PNG encode, a file read) takes a few ms: start it this early


def wait_acknowledged(info, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for the broker to acknowledge a published frame (QoS 1), never raising.

    paho's network thread sends what this thread publishes; making the next frame meanwhile (a PNG encode)
    held the GIL that thread needed: capture to socket write took 1.8 ms at the median, 0.4 ms with this wait
    (traced under ``edgeprune bench overhead``, docs/results/README.md). The next frame is made once the last
    one is out, but never late for its time.
    """
    if timeout_s <= 0:
        return
    try:
        info.wait_for_publish(timeout=timeout_s)
    except (RuntimeError, ValueError):  # not queued (disconnected): the bus reconnects and resends on its own
        pass


class Camera:
    def __init__(self, settings: CameraSettings, mqtt_settings: MqttSettings, frames: FrameSource | None = None):
        """``frames``: where frames come from; by default the ``images`` folder's files, else synthetic scenes.
        ``labelled`` needs one handed in (:class:`edgeprune.dataset.LabelledFrames`)."""
        if settings.labelled and frames is None:
            raise ValueError("labelled frames need a frame source: edgeprune.dataset.LabelledFrames")
        self.settings = settings
        self.frames = frames
        self.publisher = FramePublisher(mqtt_settings, settings.camera_id)
        self.sent = 0
        self.refused = 0  # frames over the broker's size limit, logged and not sent
        self._stop = threading.Event()

    def run(self) -> int:
        """Publish until ``count`` frames are sent, the schedule ends, or :meth:`stop`; returns frames sent."""
        s = self.settings
        frames = self.frames or (folder_source(s.images) if s.images else synthetic_frames(s.seed, s.size,
                                                                                            s.image_format))
        arrivals = np.random.default_rng([s.seed, 1])  # separate streams: frames don't depend on timing
        run_tag = f"{int(time.time() * 1000):x}"
        schedule = arrival_schedule(s, arrivals)
        self.publisher.start()
        if not self._wait_connected():
            self.publisher.stop()
            return 0
        started = time.monotonic()
        last = None
        for arrival in schedule:
            if self._stop.is_set() or (s.count and self.sent + self.refused >= s.count):
                break
            if last is not None:
                wait_acknowledged(last, started + arrival.at_s - time.monotonic() - FRAME_MAKING_MARGIN_S)
            user = {"request_id": f"{arrival.camera}-{run_tag}-{self.sent + self.refused:06d}"}
            payload, label = frames()
            if label is not None:
                user[TRUE_LABEL_PROPERTY] = str(label)
            if self._stop.wait(max(0.0, started + arrival.at_s - time.monotonic())):
                break
            user["capture_ts"] = repr(time.time())
            info = self.publisher.publish(payload, user, camera=arrival.camera)
            if info is None:  # over the broker's limit: logged, not sent
                self.refused += 1
                continue
            last = info
            self.sent += 1
        if last is not None:  # let the last frame reach the broker before disconnecting
            last.wait_for_publish(timeout=5.0)
        self.publisher.stop()
        log.info("%s: sent %d frames", s.camera_id, self.sent)
        return self.sent

    def _wait_connected(self) -> bool:
        """The schedule starts once the broker has answered (False: stopped first). paho keeps what is published
        before, but its ``wait_for_publish`` raises for such a frame, so the last wait before disconnecting did and
        the process died with every frame unsent: on a loaded host the start's wait (10 s) ran out first."""
        while not self.publisher.connected:
            if self._stop.wait(0.1):
                return False
        return True

    def stop(self) -> None:
        self._stop.set()
