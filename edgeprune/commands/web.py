"""``edgeprune web``: the operator page (Flask) over the gateway's SQLite log."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("web", help="serve the operator page: overview, controls, detections, exports")
    p.add_argument("--config", type=Path, help="TOML config file ([web] section)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--db", type=Path, dest="db_path")
    p.set_defaults(func=run)


def run(args) -> int:
    import threading

    from werkzeug.serving import make_server

    from edgeprune.commands import run_until_signal
    from shared.settings import MqttSettings, WebSettings, load
    from web.app import create_app
    from web.gateway_client import GatewayClient

    settings = load(WebSettings, args.config, host=args.host, port=args.port, db_path=args.db_path)
    gateway = GatewayClient(load(MqttSettings, args.config), settings.gateway_id, settings.command_timeout_s)
    gateway.start()
    server = make_server(settings.host, settings.port, create_app(settings, gateway), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"operator page on http://{settings.host}:{settings.port}/", flush=True)
    if settings.password_hash is None:
        print("no operator password set: run `edgeprune passwd` to enable the controls", flush=True)
    run_until_signal()
    server.shutdown()
    gateway.stop()
    return 0
