"""``edgeprune collect``: at the central broker, write every site's results, status and errors into one database."""

from __future__ import annotations

from pathlib import Path

from edgeprune.commands import add_broker_flags, broker_settings, run_until_signal


def register(sub) -> None:
    p = sub.add_parser("collect", help="central role: every bridged site's results into one database (site column): "
                       "SQLite, or PostgreSQL with --db postgresql://...")
    p.add_argument("--config", type=Path, help="TOML config file ([mqtt] = the central broker, [collect])")
    p.add_argument("--db", help="SQLite file or postgresql://user:password@host/database URL (else [collect] db)")
    p.add_argument("--import-cameras", type=Path, metavar="GATEWAY_DB",
                   help="instead of collecting: copy a site's camera deployments (its gateway's SQLite file) into "
                   "the central store, for Camtrap DP exports; needs --site")
    p.add_argument("--site", help="the site --import-cameras is from")
    add_broker_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from gateway.collect import Collector, import_cameras, open_store
    from shared.bus import Bus
    from shared.settings import CollectSettings, load
    from shared.topics import Topics

    settings = load(CollectSettings, args.config, db=args.db)
    # the central broker keeps queuing for the collector while it is away (a week by default)
    mqtt = broker_settings(args).model_copy(update={"session_expiry_s": settings.session_expiry_s})
    store = open_store(settings.db)
    if args.import_cameras:
        if not args.site:
            print("edgeprune collect: --import-cameras needs --site", flush=True)
            store.close()
            return 2
        n = import_cameras(store, args.site, args.import_cameras)
        store.close()
        print(f"{n} camera deployments of site {args.site} into {store.path}", flush=True)
        return 0
    bus = Bus(mqtt, "collect", Topics(mqtt.topic_root).component_status("collect"))
    collector = Collector(bus, store)
    collector.start()
    print(f"collecting every site below sites/+/{mqtt.topic_root}/ from {mqtt.host}:{mqtt.port} into "
          f"{store.path}", flush=True)
    run_until_signal()
    collector.stop()
    return 0
