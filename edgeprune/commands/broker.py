"""``edgeprune broker``: run Mosquitto in the foreground from our config template."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("broker", help="run mosquitto in the foreground from mosquitto/mosquitto.conf.template")
    p.add_argument("--config", type=Path, help="TOML config file ([broker] section)")
    p.add_argument("--port", type=int)
    p.add_argument("--bind")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--print-config", action="store_true", help="print the rendered mosquitto.conf and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    import os
    import sys

    from edgeprune.broker import BrokerError, check_credentials, mosquitto_binary, render_config, write_config
    from shared.settings import BrokerSettings, MqttSettings, SiteSettings, load

    settings = load(BrokerSettings, args.config, port=args.port, bind=args.bind, data_dir=args.data_dir)
    site = load(SiteSettings, args.config)  # [site] site_id set: bridge to the central broker
    root = load(MqttSettings, args.config).topic_root
    if args.print_config:
        print(render_config(settings, site, root))
        return 0
    try:
        check_credentials(settings)
    except BrokerError as exc:
        print(f"edgeprune broker: {exc}", file=sys.stderr)
        return 2
    conf = write_config(settings, site, root)
    print(f"mosquitto on {settings.bind}:{settings.port}, data in {settings.data_dir}", flush=True)
    os.execv(mosquitto_binary(), ["mosquitto", "-c", str(conf)])
