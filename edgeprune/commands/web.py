"""``edgeprune web``: the operator page (Flask) over the gateway's SQLite log."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("web", help="serve the operator page and /api/status")
    p.add_argument("--config", type=Path, help="TOML config file ([web] section)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--db", type=Path, dest="db_path")
    p.set_defaults(func=run)


def run(args) -> int:
    import threading

    from werkzeug.serving import make_server

    from edgeprune.commands import run_until_signal
    from shared.settings import WebSettings, load
    from web.app import create_app

    settings = load(WebSettings, args.config, host=args.host, port=args.port, db_path=args.db_path)
    server = make_server(settings.host, settings.port, create_app(settings), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"operator page on http://{settings.host}:{settings.port}/", flush=True)
    run_until_signal()
    server.shutdown()
    return 0
