"""``edgeprune collect``: at the central broker, write every site's results, status and errors into one SQLite."""

from __future__ import annotations

from pathlib import Path

from edgeprune.commands import add_broker_flags, broker_settings, run_until_signal


def register(sub) -> None:
    p = sub.add_parser("collect", help="central role: every bridged site's results into one SQLite (site column)")
    p.add_argument("--config", type=Path, help="TOML config file ([mqtt] = the central broker, [collect])")
    p.add_argument("--db", type=Path, help="SQLite file (else [collect] db)")
    add_broker_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from gateway.collect import CentralStore, Collector
    from shared.bus import Bus
    from shared.settings import CollectSettings, load
    from shared.topics import Topics

    settings = load(CollectSettings, args.config, db=args.db)
    # the central broker keeps queuing for the collector while it is away (a week by default)
    mqtt = broker_settings(args).model_copy(update={"session_expiry_s": settings.session_expiry_s})
    bus = Bus(mqtt, "collect", Topics(mqtt.topic_root).component_status("collect"))
    collector = Collector(bus, CentralStore(settings.db))
    collector.start()
    print(f"collecting every site below sites/+/{mqtt.topic_root}/ from {mqtt.host}:{mqtt.port} into "
          f"{settings.db}", flush=True)
    run_until_signal()
    collector.stop()
    return 0
