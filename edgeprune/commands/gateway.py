"""``edgeprune gateway``: placement, results, SLO windows and the SQLite log."""

from __future__ import annotations

from pathlib import Path

from edgeprune.commands import add_broker_flags, broker_settings, run_until_signal


def register(sub) -> None:
    p = sub.add_parser("gateway", help="run the gateway: publish the placement, log results and SLO windows")
    p.add_argument("--config", type=Path, help="TOML config file ([mqtt] and [gateway] sections)")
    p.add_argument("--db", type=Path, dest="db_path")
    p.add_argument("--nodes", help="comma-separated node ids in stage order")
    p.add_argument("--slo", type=float, dest="slo_s", help="end-to-end latency objective, seconds")
    add_broker_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from gateway.service import Gateway
    from shared.settings import ControllerSettings, GatewaySettings, load

    settings = load(GatewaySettings, args.config, db_path=args.db_path, nodes=args.nodes, slo_s=args.slo_s)
    gateway = Gateway(settings, broker_settings(args), load(ControllerSettings, args.config))
    gateway.start()
    run_until_signal()
    gateway.stop()
    return 0
