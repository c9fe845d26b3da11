"""The ``edgeprune`` command: one entry point for every role and tool."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from shared.settings import SettingsError

# (module under edgeprune.commands) — order is the order of `edgeprune --help`.
COMMAND_MODULES = [
    "config",
    "broker",
    "credentials",
    "node",
    "gateway",
    "collect",
    "camera",
    "web",
    "passwd",
    "export",
    "doctor",
    "demo",
    "calibrate",
    "profile",
    "place",
    "plan_hybrid",
    "bench",
    "dataset",
    "train",
    "classify",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeprune", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"edgeprune.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"edgeprune {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
