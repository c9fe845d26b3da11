"""``edgeprune camera``: publish synthetic camera-trap frames, or a folder's image files, at a fixed or Poisson rate."""

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
    p.add_argument("--arrival", choices=["fixed", "poisson"])
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
                    arrival=args.arrival, count=args.count, seed=args.seed, images=args.images)
    if settings.images:
        try:
            print(f"{settings.camera_id}: publishing {len(image_files(settings.images))} files of {settings.images}")
        except FileNotFoundError as exc:
            print(f"edgeprune camera: {exc}", file=sys.stderr)
            return 2
    camera = Camera(settings, broker_settings(args))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: camera.stop())
    sent = camera.run()
    print(f"{settings.camera_id}: sent {sent} frames")
    return 0
