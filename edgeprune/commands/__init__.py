"""One module per ``edgeprune`` subcommand.

Each module defines ``register(subparsers)`` which adds its parser and sets ``func`` to a
callable taking the parsed namespace and returning an exit code. Heavy imports (torch,
flask) happen inside the command, so ``edgeprune --help`` stays fast.
"""

from __future__ import annotations

import signal
import threading


def run_until_signal() -> None:
    """Block until SIGINT or SIGTERM, so services stop cleanly (and announce ``stopped``)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
