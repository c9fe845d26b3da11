"""Every route of the operator page through Flask's test client: login, CSRF, rate limit, controls, data."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from werkzeug.security import generate_password_hash

from edgeprune.commands.passwd import set_in_config
from gateway.store import Store
from shared.schemas import Placement, StageAssignment
from shared.settings import WebSettings
from tests.test_export import EXPECTED_CSV, add_thumbnails, camtrap_dp_errors, fill_detections
from web.app import create_app

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"
HASH = generate_password_hash(PASSWORD)


class FakeGateway:
    """Stands in for the MQTT round trip: records commands, answers as told."""

    def __init__(self):
        self.sent = []
        self.answer = (True, "done")

    def send(self, command):
        self.sent.append(command.root)
        return self.answer


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture
def page(tmp_path):
    db = tmp_path / "edgeprune.db"
    fill_detections(db)
    gateway, clock = FakeGateway(), Clock()
    app = create_app(WebSettings(db_path=db, password_hash=HASH), gateway, clock=clock)
    return app.test_client(), gateway, clock, app


def token(client) -> str:
    return client.get("/api/csrf").get_json()["csrf_token"]


def login(client, name="ana", password=PASSWORD):
    return client.post("/login", json={"name": name, "password": password}, headers={"X-CSRFToken": token(client)})


def command(client, body: dict, csrf: bool = True):
    headers = {"X-CSRFToken": token(client)} if csrf else {}
    return client.post("/api/command", json=body, headers=headers)


def test_everything_needs_a_login_unless_public(page, tmp_path):
    client, gateway, _, _ = page
    assert client.get("/").status_code == 302 and "/login" in client.get("/").headers["Location"]
    for path in ("/api/status", "/api/detections", "/export/detections.csv", "/export/camtrap-dp.zip"):
        assert client.get(path).status_code == 401, path
    assert client.get("/detections").status_code == 302
    assert command(client, {"cmd": "restore_all"}).status_code == 401 and gateway.sent == []

    public = create_app(WebSettings(db_path=tmp_path / "edgeprune.db", password_hash=HASH, public_status=True),
                        gateway).test_client()
    assert public.get("/").status_code == 200 and public.get("/api/detections").status_code == 200
    assert b'id="controls"' not in public.get("/").data  # read-only: no controls without a login
    assert command(public, {"cmd": "restore_all"}).status_code == 401 and gateway.sent == []


def test_login_sets_a_httponly_samesite_cookie_and_logout_ends_it(page):
    client = page[0]
    res = login(client)
    assert res.status_code == 200 and res.get_json()["operator"] == "ana"
    cookie = res.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and PASSWORD not in cookie
    assert client.get("/api/status").status_code == 200
    assert b'id="controls"' in client.get("/").data
    client.post("/logout", headers={"X-CSRFToken": token(client)})
    assert client.get("/api/status").status_code == 401


def test_login_form_works_and_says_what_is_wrong(page):
    client = page[0]
    res = client.post("/login", data={"name": "ana", "password": "nope", "csrf_token": token(client)})
    assert res.status_code == 401 and b"wrong name or password" in res.data
    res = client.post("/login?next=/detections", data={"name": "ana", "password": PASSWORD,
                                                       "csrf_token": token(client)})
    assert res.status_code == 302 and res.headers["Location"].endswith("/detections")


def test_posts_without_csrf_token_are_refused_and_change_nothing(page):
    client, gateway, _, _ = page
    res = client.post("/login", json={"name": "ana", "password": PASSWORD})
    assert res.status_code == 400 and "CSRF" in res.get_json()["error"]
    assert client.get("/api/status").status_code == 401  # not logged in
    login(client)
    res = command(client, {"cmd": "set", "setting": "slo_s", "value": 0.3}, csrf=False)
    assert res.status_code == 400 and "CSRF" in res.get_json()["error"] and gateway.sent == []
    res = client.post("/api/command", data={"cmd": "restore_all"})  # the form path too
    assert res.status_code == 400 and gateway.sent == []


def test_failed_logins_are_rate_limited_per_address_and_name(page):
    client, _, clock, _ = page
    for _ in range(5):
        assert login(client, password="wrong").status_code == 401
    res = login(client)  # even the right password waits
    assert res.status_code == 429 and "try again in 60 s" in res.get_json()["error"]
    assert res.headers["Retry-After"] == "60"
    clock.now += 30
    assert login(client).headers["Retry-After"] == "30"
    assert login(client, name="monitor").status_code == 200  # another user of the same address is not locked out
    clock.now += 31
    assert login(client).status_code == 200


def test_many_names_from_one_address_are_still_limited(tmp_path):
    """The password is shared and a name is no secret: trying a new name per guess must not escape the limit."""
    clock = Clock()
    client = create_app(WebSettings(db_path=tmp_path / "x.db", password_hash=HASH, login_attempts_per_minute=1),
                        clock=clock).test_client()
    for i in range(4):  # 1 per name, 4 per address
        assert login(client, name=f"guess-{i}", password="wrong").status_code == 401
    res = login(client, name="another")
    assert res.status_code == 429 and int(res.headers["Retry-After"]) > 0
    clock.now += 61
    assert login(client, name="another").status_code == 200


def test_a_cookie_copied_before_logout_is_refused_after_it(page):
    client, gateway, _, app = page
    login(client)
    copied = client.get_cookie("session").value
    client.post("/logout", headers={"X-CSRFToken": token(client)})
    thief = app.test_client()
    thief.set_cookie("session", copied)
    assert thief.get("/api/status").status_code == 401
    res = thief.post("/api/command", json={"cmd": "set", "setting": "trigger_margin_s", "value": 0.5},
                     headers={"X-CSRFToken": token(thief)})
    assert res.status_code == 401 and gateway.sent == []


@pytest.mark.parametrize("target", ["//evil.example/x", "/%09/evil.example/x", "/%0a/evil.example/x",
                                    "%20//evil.example/x", "/\\evil.example/x", "/%5Cevil.example/x",
                                    "https://evil.example/x", "javascript:alert(1)", "/%00/evil.example"])
def test_login_never_redirects_off_site(page, target):
    client = page[0]
    res = client.post(f"/login?next={target}", data={"name": "ana", "password": PASSWORD,
                                                     "csrf_token": token(client)})
    location = res.headers["Location"]
    assert res.status_code == 302 and location in ("/", "http://localhost/"), location


def test_login_redirects_to_a_path_with_its_query(page):
    client = page[0]
    res = client.post("/login?next=/detections%3Fspecies%3Dred%2Bdeer", data={
        "name": "ana", "password": PASSWORD, "csrf_token": token(client)})
    assert res.headers["Location"] == "/detections?species=red+deer"


def test_login_without_a_configured_password_explains_how_to_set_one(tmp_path):
    client = create_app(WebSettings(db_path=tmp_path / "x.db")).test_client()
    res = login(client)
    assert res.status_code == 401 and "edgeprune passwd" in res.get_json()["error"]
    assert b"edgeprune passwd" in client.get("/login").data


@pytest.mark.parametrize("body,words", [
    ({"cmd": "set", "setting": "slo_s", "value": "-1"}, "SLO target (s): input should be greater than 0"),
    ({"cmd": "set", "setting": "policy", "value": "fastest"}, "policy must be one of adaptive, bottleneck, paper, off"),
    ({"cmd": "set", "setting": "ladder", "value": "1"}, "unknown setting"),
    ({"cmd": "prune", "node_id": "node-1", "ratio": "lots"}, "ratio: Input should be a valid number"),
    ({"cmd": "prune", "node_id": "node/1", "ratio": 0.5}, "node_id: String should match pattern"),
    ({"cmd": "node_slowdown", "node_id": "node-1", "factor": 0.5},
     "factor: Input should be greater than or equal to 1"),
    ({"cmd": "camera", "camera_id": "cam-1", "location_name": "x", "latitude": 91, "longitude": 0,
      "start": "2026-05-01"}, "latitude: Input should be less than or equal to 90"),
    ({"cmd": "camera", "camera_id": "cam-1", "location_name": "x", "latitude": 1, "longitude": 0,
      "start": "last spring"}, "is not an ISO 8601 date"),
    ({"cmd": "camera", "camera_id": "cam-1", "location_name": "x", "latitude": 1, "longitude": 0,
      "start": "2026-05-02", "end": "2026-05-01"}, "must end after it starts"),
    ({"cmd": "explode"}, "does not match any of the expected tags"),
])
def test_bad_control_input_gets_a_clear_message_and_nothing_is_sent(page, body, words):
    client, gateway, _, _ = page
    login(client)
    res = command(client, body)
    assert res.status_code == 400 and words in res.get_json()["message"], res.get_json()
    assert gateway.sent == []


def test_good_commands_reach_the_gateway_with_the_operator_and_its_answer_comes_back(page):
    client, gateway, _, _ = page
    login(client, name="ben")
    res = command(client, {"cmd": "set", "setting": "slo_s", "value": "0.3"})
    assert res.status_code == 200 and res.get_json() == {"ok": True, "message": "done"}
    sent = gateway.sent[-1]
    assert (sent.cmd, sent.setting, sent.value, sent.by) == ("set", "slo_s", 0.3, "ben")
    command(client, {"cmd": "prune", "node_id": "node-1", "ratio": "release"})
    assert gateway.sent[-1].ratio is None
    command(client, {"cmd": "camera", "camera_id": "cam-3", "location_name": "ford", "latitude": "-1.5",
                     "longitude": "36.1", "start": "2026-05-01T08:00+02:00", "end": ""})
    assert gateway.sent[-1].start_ts == 1777615200.0 and gateway.sent[-1].end_ts is None

    gateway.answer = (False, "prune node-1: ratio 0.55 is not on the ladder")
    res = command(client, {"cmd": "prune", "node_id": "node-1", "ratio": 0.55})
    assert res.status_code == 422 and "not on the ladder" in res.get_json()["message"]
    gateway.answer = (False, "the gateway did not answer within 5 s (is it running?)")
    assert command(client, {"cmd": "restore_all"}).status_code == 504


def test_a_plain_form_post_redirects_back_with_the_answer(page):
    client, gateway, _, _ = page
    login(client)
    res = client.post("/api/command", data={"cmd": "retire", "node_id": "node-9", "csrf_token": token(client)},
                      headers={"Referer": "/"})
    assert res.status_code == 302 and gateway.sent[-1].node_id == "node-9"
    assert b"done" in client.get("/").data  # the flashed answer


def test_status_api_has_what_the_overview_shows(page):
    client = page[0]
    login(client)
    data = client.get("/api/status").get_json()
    assert {"nodes", "latency", "windows", "recent", "errors", "controller", "controller_words", "prune_events",
            "operator_actions", "cameras", "operator", "cursor", "zone", "placement_words"} <= set(data)
    assert [c["camera_id"] for c in data["cameras"]] == ["cam-1", "cam-2"] and data["operator"] == "ana"


def test_status_lists_every_node_of_a_replicated_stage_and_the_ingest_node(page, tmp_path):
    client = page[0]
    login(client)
    assert client.get("/api/status").get_json()["pipeline"] == []  # no placement yet
    store = Store(tmp_path / "edgeprune.db")
    store.update_node({"node_id": "pi-b", "status": "online", "stage": 2, "first_block": 3, "last_block": 5})
    store.update_node({"node_id": "pi-z", "status": "online"})  # a spare
    store.add_placement(Placement(version=7, model="m", n_blocks=6, ingest_node="pi-e", share_token="t" * 12,
                                  issued_at=1.0, stages=[
        StageAssignment(stage=1, node_id="pi-a", first_block=0, last_block=2),
        StageAssignment(stage=2, node_id="pi-b", first_block=3, last_block=5, replicas=["pi-c", "pi-d"])],
    ).model_dump(exclude={"share_token"}))
    store.close()
    data = client.get("/api/status").get_json()
    assert data["placement"]["ingest_node"] == "pi-e" and data["placement"]["stages"][1]["replicas"] == ["pi-c", "pi-d"]
    assert data["pipeline"] == [
        {"stage": 0, "first_block": None, "last_block": None, "nodes": ["pi-e"], "pipeline": 0},
        {"stage": 1, "first_block": 0, "last_block": 2, "nodes": ["pi-a"], "pipeline": 0},
        {"stage": 2, "first_block": 3, "last_block": 5, "nodes": ["pi-b", "pi-c", "pi-d"], "pipeline": 0}]
    nodes = {n["node_id"]: n for n in data["nodes"]}
    assert nodes["pi-b"]["stage_nodes"] == ["pi-b", "pi-c", "pi-d"] and nodes["pi-z"]["stage_nodes"] == []


def test_csv_download_is_the_exact_known_bytes(page):
    client = page[0]
    login(client)
    res = client.get("/export/detections.csv")
    assert res.status_code == 200 and res.is_streamed and res.data == EXPECTED_CSV.encode()
    assert res.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert "attachment" in res.headers["Content-Disposition"]
    assert client.get("/export/detections.csv?min_confidence=high").status_code == 400


def test_camtrap_dp_download_passes_the_official_profile(page, tmp_path):
    pytest.importorskip("frictionless")
    client = page[0]
    login(client)
    res = client.get("/export/camtrap-dp.zip?from=2026-05-28")
    assert res.status_code == 200
    with zipfile.ZipFile(io.BytesIO(res.data)) as archive:
        archive.extractall(tmp_path / "package")
    assert camtrap_dp_errors(tmp_path / "package") == []
    assert "blank" in (tmp_path / "package" / "observations.csv").read_text()


@pytest.fixture
def site_in_johannesburg(monkeypatch):
    """The page's machine in UTC+02:00 (no daylight saving there), for this test only."""
    monkeypatch.setenv("TZ", "Africa/Johannesburg")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_detections_view_filters_and_pages(page, site_in_johannesburg):
    client = page[0]
    login(client)
    html = client.get("/detections?camera=cam-2&min_confidence=0.9").data.decode()
    assert "Equus quagga" in html and "Giraffa" not in html
    assert "2026-05-28T22:29:40.500+02:00" in html and "site local, UTC+02:00" in html  # exports stay in UTC
    assert 'id="empty-export"' not in html and 'id="empty-export"' in client.get("/detections?from=2030-01-01").text
    res = client.get("/detections?from=tomorrow")
    assert res.status_code == 400 and "not an ISO 8601" in res.data.decode()
    first = client.get("/api/detections?limit=2").get_json()
    assert [r["request_id"] for r in first["rows"]] == ["r5", "r4"] and first["next"]
    second = client.get("/api/detections", query_string={"limit": 2, "after": first["next"]}).get_json()
    assert [r["request_id"] for r in second["rows"]] == ["r3", "r2"]
    assert client.get("/api/detections?limit=0").status_code == 400


def test_detections_show_a_thumbnail_where_the_frame_has_one_behind_the_same_login(page):
    client, _, _, app = page
    login(client)
    assert b'class="thumb"' not in client.get("/detections").data  # none kept: no column
    made = add_thumbnails(app.config["EDGEPRUNE"].db_path, ["r4"])
    html = client.get("/detections").text
    assert html.count('class="thumb"') == 1 and '<img\n        class="thumb" src="/thumbnail?id=r4"' in html
    res = client.get("/thumbnail?id=r4")
    assert res.status_code == 200 and res.mimetype == "image/jpeg" and res.data == made["r4"]
    assert res.headers["X-Content-Type-Options"] == "nosniff" and "private" in res.headers["Cache-Control"]
    assert client.get("/thumbnail?id=r1").status_code == 404 and client.get("/thumbnail").status_code == 404
    assert [r["thumbnail"] for r in client.get("/api/detections").get_json()["rows"]] == [False, True, False, False,
                                                                                          False]
    client.post("/logout", headers={"X-CSRFToken": token(client)})
    assert client.get("/thumbnail?id=r4").status_code == 302  # like the rest of the page: log in first


def test_passwd_writes_only_the_hash_into_the_web_section(tmp_path):
    config = tmp_path / "edgeprune.toml"
    config.write_text('[mqtt]\nport = 1884\n\n[web]\nport = 8081\n\n[gateway]\nslo_s = 0.4\n')
    res = subprocess.run([sys.executable, "-m", "edgeprune", "passwd", "--config", str(config), "--stdin"],
                         input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    text = config.read_text()
    assert PASSWORD not in text + res.stdout + res.stderr
    from shared.settings import WebSettings as W
    from shared.settings import load
    assert load(W, config).password_hash.get_secret_value().startswith("scrypt:")
    assert load(W, config).port == 8081 and "slo_s = 0.4" in text
    assert set_in_config("", "h") == '[web]\npassword_hash = "h"\n'
    assert set_in_config('[web]\npassword_hash = "old"\n', "new") == '[web]\npassword_hash = "new"\n'
    short = subprocess.run([sys.executable, "-m", "edgeprune", "passwd", "--stdin"], input="short\n",
                           capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "8 characters" in short.stderr


def test_status_json_is_plain_json(page):
    """Scripts parse it with jq: no NaN, no infinities."""
    client = page[0]
    login(client)
    json.loads(client.get("/api/status").data, parse_constant=lambda c: pytest.fail(f"{c} in /api/status"))


def test_favicon_and_the_demo_only_control(page, tmp_path):
    client = page[0]
    res = client.get("/favicon.ico")
    assert res.status_code == 200 and res.mimetype == "image/svg+xml"
    login(client)
    assert b'data-demo=""' in client.get("/").data  # the page builds the slowdown control only in a demo
    demo = create_app(WebSettings(db_path=tmp_path / "edgeprune.db", password_hash=HASH, demo=True)).test_client()
    login(demo)
    assert b'data-demo="1"' in demo.get("/").data


FPS, HOPS, POLL_S = 4, 2, 2.0


def a_frame(finish: float) -> dict:
    hops = [{"stage": s + 1, "node_id": f"node-{s + 1}", "prune_ratio": 0.0, "received_ts": finish - 0.1,
             "started_ts": finish - 0.09, "finished_ts": finish - 0.05 * s, "published_ts": finish}
            for s in range(HOPS)]
    return {"request_id": f"f{finish:.3f}", "camera_id": "cam-1", "capture_ts": finish - 0.2, "finish_ts": finish,
            "e2e_s": 0.2, "label": "zebra", "label_index": 0, "confidence": 0.9, "prune_ratios": [0.0] * HOPS,
            "hops": hops}


def status_bytes_per_minute(client, clock, db, polls: int, incremental: bool) -> float:
    """What a page open on a site at ``FPS`` frames/s pulls from /api/status, in bytes per minute once loaded: the
    site's last 5 minutes are stored, the page loads, then each poll ``POLL_S`` later finds the frames (and every
    fifth a window) written since."""
    store = Store(db)
    for i in range(int(300 * FPS)):
        store.add_request(a_frame(clock.now - 300 + i / FPS))
    store.flush()
    cursor, total = client.get("/api/status").get_json()["cursor"], 0
    for poll in range(polls):
        clock.now += POLL_S
        for i in range(int(POLL_S * FPS)):
            store.add_request(a_frame(clock.now - POLL_S + i / FPS))
        if poll % 5 == 4:  # a 10 s window closes
            store.add_window({"start_ts": clock.now - 10, "end_ts": clock.now, "count": 40, "slo_s": 0.5, "met": 40,
                              "attainment_pct": 100.0, "p50_s": 0.2, "p95_s": 0.2, "p99_s": 0.2})
        store.flush()
        res = client.get(f"/api/status?since={cursor}" if incremental else "/api/status")
        total += len(res.data)
        cursor = res.get_json()["cursor"]
    store.close()
    return total * 60 / (polls * POLL_S)


def test_an_open_page_pulls_ten_times_less_when_it_asks_only_for_what_is_new(page):
    client, _, clock, app = page
    db = app.config["EDGEPRUNE"].db_path
    login(client)
    whole = status_bytes_per_minute(client, clock, db, polls=3, incremental=False)
    new_only = status_bytes_per_minute(client, clock, db, polls=5, incremental=True)
    assert whole >= 10 * new_only, (whole, new_only)


def test_the_page_reaches_the_gateway_only_through_its_read_path():
    """The page acts only through gateway commands: of gateway/ it may import the database's read path (store,
    export), not the gateway's decisions; what both need (the settings' labels and validation) is in shared/."""
    for path in (ROOT / "web").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.startswith("gateway") and n not in ("gateway.store", "gateway.export")], (
                path, names)
