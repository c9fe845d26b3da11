"""``edgeprune camera``: publish camera-trap frames at a fixed or Poisson rate, in camera-trap bursts, or
replaying the capture times of a CSV trace; synthetic scenes, labelled test frames or a folder's image files."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from edgeprune.commands import add_broker_flags, broker_settings


def register(sub) -> None:
    p = sub.add_parser("camera", help="publish frames for one camera id (simulator / reference client)")
    p.add_argument("--config", type=Path, help="TOML config file ([mqtt] and [camera] sections)")
    p.add_argument("--camera-id")
    p.add_argument("--rate", type=float, dest="rate_hz", help="mean frames per second")
    p.add_argument("--arrival", choices=["fixed", "poisson", "bursts", "replay"],
                   help="bursts: camera-trap sequences (camera/arrivals.py); replay: needs --trace-csv")
    p.add_argument("--cameras", type=int, help="bursts: number of cameras simulated")
    p.add_argument("--time-scale", type=float, dest="time_scale", help="bursts/replay: divide trace times by this")
    p.add_argument("--duration", type=float, dest="duration_s", help="bursts/replay: stop after this many seconds")
    p.add_argument("--trace-csv", type=Path, dest="trace_csv", help="CSV of capture times (implies --arrival replay)")
    p.add_argument("--time-column", dest="time_column", help="replay: column of capture times (default datetime)")
    p.add_argument("--camera-column", dest="camera_column", help="replay: column naming the camera")
    p.add_argument("--time-format", dest="time_format", help="replay: strptime format, e.g. '%%Y-%%m-%%d %%H:%%M:%%S'")
    p.add_argument("--labelled", action="store_true", default=None,
                   help="send labelled test frames of the dataset (true_label user property)")
    p.add_argument("--count", type=int, help="frames to send (0 = until stopped)")
    p.add_argument("--seed", type=int)
    add_broker_flags(p)
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="publish the JPEG/PNG files of DIR as they are (native size, name order, looping)")
    p.set_defaults(func=run)


def run(args) -> int:
    from camera.simulator import Camera, image_files
    from shared.settings import CameraSettings, load

    settings = load(CameraSettings, args.config, camera_id=args.camera_id, rate_hz=args.rate_hz,
                    arrival=args.arrival or ("replay" if args.trace_csv else None), count=args.count,
                    seed=args.seed, cameras=args.cameras, time_scale=args.time_scale, duration_s=args.duration_s,
                    trace_csv=args.trace_csv, time_column=args.time_column, camera_column=args.camera_column,
                    time_format=args.time_format, labelled=args.labelled, images=args.images)
    if settings.images:
        try:
            print(f"{settings.camera_id}: publishing {len(image_files(settings.images))} files of {settings.images}")
        except FileNotFoundError as exc:
            print(f"edgeprune camera: {exc}", file=sys.stderr)
            return 2
    frames = None
    if settings.labelled:  # the dataset's test frames: the offline tools' own, handed to the camera
        from edgeprune.dataset import LabelledFrames
        frames = LabelledFrames(settings.seed)
    camera = Camera(settings, broker_settings(args), frames)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: camera.stop())
    try:
        sent = camera.run()
    except (OSError, ValueError) as exc:  # an unreadable trace or a bad time: one line, not a traceback
        raise SystemExit(f"camera: {exc}") from None
    print(f"{settings.camera_id}: sent {sent} frames")
    return 0
