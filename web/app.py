"""The operator page: live overview, controls, detections and exports, served offline (no CDN).

It reads the gateway's SQLite file read-only (it can never disturb the gateway's writer) and acts only
by sending one-shot commands to the gateway (:class:`web.gateway_client.GatewayClient`), which validates,
applies, persists and logs them. Sessions are Flask's signed cookie, CSRF is Flask-WTF's CSRFProtect,
passwords are werkzeug's salted scrypt hashes (see docs/api.md).
"""

from __future__ import annotations

import math
import secrets
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from datetime import timedelta
from functools import wraps
from typing import Any, Protocol

from flask import (
    Flask,
    Response,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    stream_with_context,
    url_for,
)
from flask_wtf.csrf import CSRFError, CSRFProtect, generate_csrf
from pydantic import ValidationError

from gateway.export import (
    DETECTION_COLUMNS,
    EMPTY_WARNING,
    Filters,
    camtrap_dp_rows,
    camtrap_dp_zip,
    detections_csv,
    detections_page,
    parse_cursor,
    parse_time,
    undescribed_cameras,
)
from gateway.store import Reader, connect_read_only
from shared.operator_settings import LABELS, validate_setting
from shared.schemas import GatewayCommand
from shared.settings import WebSettings
from web.auth import LoginLimiter, Sessions, local_path, password_ok
from web.overview import parse_cursor as parse_since
from web.overview import site_time, site_zone, status


class CommandSender(Protocol):
    def send(self, command: GatewayCommand) -> tuple[bool, str]: ...


def _words(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if not isinstance(p, int)) or "command"
    return f"{where}: {first['msg']}"


def command_from_input(data: dict[str, Any], by: str) -> GatewayCommand:
    """A form's or a script's fields as a gateway command; ValueError in words if they do not make one."""
    data = {k: v for k, v in data.items() if k not in ("csrf_token", "id")}
    data["by"] = by
    cmd = data.get("cmd")
    if cmd == "prune" and data.get("ratio") in ("", "release", None):
        data["ratio"] = None
    if cmd == "set":
        data["value"] = validate_setting(str(data.get("setting")), data.get("value"))
    if cmd == "camera":
        for field in ("start", "end"):
            text = data.pop(field, None)
            if text not in (None, ""):
                data[f"{field}_ts"] = parse_time(str(text))
    try:
        return GatewayCommand.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_words(exc)) from None


def filters_from_args(args) -> Filters:
    """Detection filters from query parameters (from, to, camera, species, min_confidence)."""
    def number(name: str) -> float | None:
        text = args.get(name, "").strip()
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name.replace('_', ' ')} must be a number (got {text!r})") from None
    start, end = args.get("from", "").strip(), args.get("to", "").strip()
    return Filters(start_ts=parse_time(start) if start else None, end_ts=parse_time(end) if end else None,
                   camera_id=args.get("camera", "").strip() or None, label=args.get("species", "").strip() or None,
                   min_confidence=number("min_confidence"))


def query_from_args(args) -> tuple[Filters, tuple[float, str] | None]:
    """A page of detections asked for: the filters and the cursor it starts after (``after``)."""
    return filters_from_args(args), parse_cursor(args["after"]) if args.get("after") else None


def wants_json() -> bool:
    """Scripts and the page's fetch() get JSON; a plain HTML form post gets a redirect with a message."""
    form_post = request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data")
    return request.is_json or (request.path.startswith("/api/") and not form_post)


def denied(message: str, code: int):
    if wants_json() or request.path.startswith("/export/"):
        return jsonify({"error": message}), code
    return redirect(url_for("login", next=request.full_path))


class Page:
    """What every route shares: the settings, the clock, the gateway connection, who is logged in (and the two
    guards a route wears) and the read-only database."""

    def __init__(self, settings: WebSettings, gateway: CommandSender | None, clock: Callable[[], float]):
        self.settings = settings
        self.gateway = gateway
        self.clock = clock
        self.limiter = LoginLimiter(settings.login_attempts_per_minute)
        self.sessions = Sessions(settings.session_hours * 3600)
        self.password_hash = settings.password_hash.get_secret_value() if settings.password_hash else None
        self._reader: Reader | None = None

    def reader(self) -> Reader | None:
        """The shared read-only reader, opened once the gateway has made the database."""
        if self._reader is None:
            try:
                self._reader = Reader(self.settings.db_path)
            except FileNotFoundError:
                return None
        return self._reader

    def connection(self) -> sqlite3.Connection:
        """A private read-only connection, for a streaming export or one page of detections."""
        return connect_read_only(self.settings.db_path)

    def operator(self) -> str | None:
        return self.sessions.operator(session.get("sid"), self.clock())

    def viewer(self, view):
        @wraps(view)
        def wrapper(*args, **kwargs):
            if self.operator() is None and not self.settings.public_status:
                return denied("log in first (POST /login)", 401)
            return view(*args, **kwargs)
        return wrapper

    def operator_only(self, view):
        @wraps(view)
        def wrapper(*args, **kwargs):
            if self.operator() is None:
                return denied("log in first: controls need an operator login", 401)
            return view(*args, **kwargs)
        return wrapper


def create_app(settings: WebSettings, gateway: CommandSender | None = None,
               clock: Callable[[], float] = time.time) -> Flask:
    app = Flask(__name__)
    app.config.update(
        EDGEPRUNE=settings,
        SECRET_KEY=settings.secret_key.get_secret_value() if settings.secret_key else secrets.token_hex(32),
        SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=settings.session_hours),
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session
    )
    CSRFProtect(app)
    app.add_template_filter(site_time)
    page = Page(settings, gateway, clock)

    @app.context_processor
    def page_globals() -> dict:
        return {"operator": page.operator(), "public": settings.public_status, "csrf_token": generate_csrf}

    _login_routes(app, page)
    _overview_routes(app, page)
    _detection_routes(app, page)
    _export_routes(app, page)
    return app


def _login_routes(app: Flask, page: Page) -> None:
    def login_page(error: str | None):
        return render_template("login.html", error=error, password_set=bool(page.password_hash))

    @app.errorhandler(CSRFError)
    def csrf_failed(exc: CSRFError):
        message = f"request refused: {exc.description} Reload the page (or GET /api/csrf) and try again."
        if wants_json():
            return jsonify({"error": message}), 400
        return login_page(message), 400

    @app.get("/login")
    def login():
        return login_page(None)

    @app.post("/login")
    def login_post():
        data = request.get_json(silent=True) if request.is_json else request.form
        data = data or {}
        address = request.remote_addr or "?"
        name = str(data.get("name", "")).strip()[:64]
        wait_s = page.limiter.retry_after(address, name, page.clock())
        if wait_s > 0:
            message = f"too many failed logins from {address}; try again in {wait_s:.0f} s"
            return (jsonify({"error": message}) if wants_json() else login_page(message)), 429, {
                "Retry-After": str(math.ceil(wait_s))}
        if not name or not password_ok(page.password_hash, str(data.get("password", ""))):
            page.limiter.failed(address, name, page.clock())
            message = ("no operator password is set: run `edgeprune passwd`" if not page.password_hash
                       else "wrong name or password" if name else "enter your name (it is logged with your actions)")
            return (jsonify({"error": message}) if wants_json() else login_page(message)), 401
        page.limiter.succeeded(address, name)
        page.sessions.end(session.get("sid"))
        session.clear()
        session.permanent = True
        session["sid"] = page.sessions.start(name, page.clock())
        if wants_json():
            return jsonify({"operator": name, "csrf_token": generate_csrf()})
        return redirect(local_path(request.args.get("next", "")) or url_for("index"))

    @app.post("/logout")
    def logout():
        page.sessions.end(session.get("sid"))  # a copy of the cookie taken before is worth nothing now
        session.clear()
        return jsonify({"ok": True}) if wants_json() else redirect(url_for("login"))

    @app.get("/api/csrf")
    def api_csrf():
        return jsonify({"csrf_token": generate_csrf()})


def _overview_routes(app: Flask, page: Page) -> None:
    """The live overview and the controls (sent to the gateway as commands)."""
    settings = page.settings

    @app.get("/")
    @page.viewer
    def index():
        return render_template("index.html", refresh_ms=2000, labels=LABELS, demo=settings.demo)

    @app.get("/favicon.ico")
    def favicon():
        return app.send_static_file("favicon.svg")

    @app.get("/api/status")
    @page.viewer
    def api_status():
        try:
            since = parse_since(request.args.get("since"))
        except ValueError as exc:
            return jsonify({"error": str(exc)}), 400
        r = page.reader()
        if r is None:
            return jsonify({"error": f"no database at {settings.db_path} yet: is the gateway running?"}), 503
        return jsonify({**status(r, settings.recent_s, page.clock(), since), "operator": page.operator()})

    @app.post("/api/command")
    @page.operator_only
    def api_command():
        data = request.get_json(silent=True) if request.is_json else request.form.to_dict()
        if not isinstance(data, dict):
            return reply(False, "send a JSON object with a 'cmd' field", 400)
        try:
            command = command_from_input(data, page.operator())
        except ValueError as exc:
            return reply(False, str(exc), 400)
        if page.gateway is None:
            return reply(False, "this page has no connection to the gateway", 503)
        ok, message = page.gateway.send(command)
        return reply(ok, message, 200 if ok else 504 if "did not answer" in message or "not connected" in message
                     else 422)

    def reply(ok: bool, message: str, code: int):
        if wants_json():
            return jsonify({"ok": ok, "message": message}), code
        flash(message, "ok" if ok else "error")
        return redirect(request.referrer or url_for("index"))


def _detection_routes(app: Flask, page: Page) -> None:
    """The ecologists' data: detections page by page (HTML and JSON) and their thumbnails."""
    settings = page.settings

    @app.get("/detections")
    @page.viewer
    def detections():
        rows, cursor, error, missing, empty = [], None, None, [], False
        try:
            filters, after = query_from_args(request.args)
        except ValueError as exc:
            filters, after, error = Filters(), None, str(exc)
        if not settings.db_path.exists():
            error = error or f"no database at {settings.db_path} yet: is the gateway running?"
        elif error is None:
            with closing(page.connection()) as conn:
                rows, cursor = detections_page(conn, filters, limit=100, after=after)
                missing = undescribed_cameras(conn, filters)
                empty = camtrap_dp_rows(conn, filters) == 0
        query = {k: v for k, v in request.args.items() if k != "after"}
        return render_template("detections.html", rows=rows, cursor=cursor, error=error, query=query,
                               missing=missing, empty=empty and error is None, empty_warning=EMPTY_WARNING,
                               zone=site_zone(page.clock())), 400 if error and settings.db_path.exists() else 200

    @app.get("/thumbnail")
    @page.viewer
    def thumbnail():
        """A frame's thumbnail (JPEG, checked by the gateway when it came), by ``?id=<request_id>``."""
        r, request_id = page.reader(), request.args.get("id", "")
        jpeg = r.thumbnail(request_id) if r is not None and request_id else None
        if jpeg is None:
            return jsonify({"error": "no thumbnail of that frame"}), 404
        return Response(jpeg, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=86400",
                                                              "X-Content-Type-Options": "nosniff"})

    @app.get("/api/detections")
    @page.viewer
    def api_detections():
        try:
            filters, after = query_from_args(request.args)
            limit = int(request.args.get("limit", 100))
            if not 1 <= limit <= 1000:
                raise ValueError("limit must lie between 1 and 1000")
        except ValueError as exc:
            return jsonify({"error": str(exc)}), 400
        if not settings.db_path.exists():
            return jsonify({"error": f"no database at {settings.db_path} yet"}), 503
        with closing(page.connection()) as conn:
            rows, cursor = detections_page(conn, filters, limit=limit, after=after)
        return jsonify({"columns": DETECTION_COLUMNS, "rows": rows, "next": cursor})


def _export_routes(app: Flask, page: Page) -> None:
    """The downloads: detections CSV and the Camtrap DP package, streamed from a private connection."""
    def streamed(make: Callable[[sqlite3.Connection, Filters], Any], content_type: str, filename: str):
        try:
            filters = filters_from_args(request.args)
        except ValueError as exc:
            return jsonify({"error": str(exc)}), 400
        if not page.settings.db_path.exists():
            return jsonify({"error": f"no database at {page.settings.db_path} yet"}), 503

        def chunks():
            with closing(page.connection()) as conn:
                yield from make(conn, filters)
        return Response(stream_with_context(chunks()), content_type=content_type,
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @app.get("/export/detections.csv")
    @page.viewer
    def export_csv():
        return streamed(detections_csv, "text/csv; charset=utf-8", "detections.csv")

    @app.get("/export/camtrap-dp.zip")
    @page.viewer
    def export_camtrap_dp():
        return streamed(lambda conn, f: camtrap_dp_zip(conn, f, created=page.clock()), "application/zip",
                        "camtrap-dp.zip")
