"""The operator page: pipeline health at a glance, served offline (no CDN) from the gateway's SQLite.

Read-only for now: it opens the database in read-only mode, so it can never disturb the
gateway's writer. Operator controls (manual prune, placement) come with the controller work.
"""

from __future__ import annotations

import time

from flask import Flask, jsonify, render_template

from gateway.store import Reader
from shared.settings import WebSettings


def status(reader: Reader, recent_s: float, now: float) -> dict:
    """Everything the page shows, as one JSON document (also `GET /api/status`)."""
    run = reader.current_run()
    slo_s = run["slo_s"] if run else None
    nodes = reader.nodes()
    for node in nodes:
        node["seen_s_ago"] = now - node["last_seen"] if node.get("last_seen") else None
    return {
        "now": now,
        "recent_s": recent_s,
        "run": run,
        "slo_s": slo_s,
        "nodes": nodes,
        "placement": reader.placement(),
        "latency": [{"t": r["finish_ts"], "e2e_s": r["e2e_s"], "camera_id": r["camera_id"], "label": r["label"]}
                    for r in reader.recent_requests(now - recent_s)],
        "windows": reader.windows(limit=30),
        "totals": reader.totals(slo_s) if slo_s else None,
        "errors": reader.errors(limit=10),
        "controller": reader.controller_status(),
        "prune_events": reader.prune_events(limit=10),
        "accounting": reader.accounting(),
    }


def create_app(settings: WebSettings) -> Flask:
    app = Flask(__name__)
    app.config["EDGEPRUNE"] = settings
    readers: dict[str, Reader] = {}

    def reader() -> Reader | None:
        if "db" not in readers:
            try:
                readers["db"] = Reader(settings.db_path)
            except FileNotFoundError:
                return None
        return readers["db"]

    @app.get("/")
    def index():
        return render_template("index.html", refresh_ms=2000)

    @app.get("/api/status")
    def api_status():
        r = reader()
        if r is None:
            return jsonify({"error": f"no database at {settings.db_path} yet: is the gateway running?"}), 503
        return jsonify(status(r, settings.recent_s, time.time()))

    return app
