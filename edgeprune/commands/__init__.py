"""One module per ``edgeprune`` subcommand.

Each module defines ``register(subparsers)`` which adds its parser and sets ``func`` to a
callable taking the parsed namespace and returning an exit code. Heavy imports (torch,
flask) happen inside the command, so ``edgeprune --help`` stays fast.
"""

from __future__ import annotations

import signal
import threading


def add_broker_flags(parser) -> None:
    """``--host``/``--port`` of the MQTT broker, for every command that connects to it."""
    parser.add_argument("--host", help="MQTT broker host (else [mqtt] host)")
    parser.add_argument("--port", type=int, help="MQTT broker port (else [mqtt] port)")


def broker_settings(args):
    """The MQTT settings with ``--host``/``--port`` applied over env and ``--config``."""
    from shared.settings import MqttSettings, load

    return load(MqttSettings, args.config, host=args.host, port=args.port)


def run_until_signal() -> None:
    """Block until SIGINT or SIGTERM, so services stop cleanly (and announce ``stopped``)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
