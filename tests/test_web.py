"""The operator page in a real headless Chromium, over a real SQLite file."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
import warnings

import pytest
from PIL import Image
from werkzeug.serving import make_server

from edgeprune.broker import free_port
from gateway.store import Store
from shared.imaging import textured_scene
from shared.schemas import Placement, StageAssignment
from shared.settings import WebSettings
from shared.thumbnail import make_thumbnail
from web.app import create_app
from web.overview import controller_words, infeasible_nodes

pytestmark = pytest.mark.integration
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def headless_chromium(tmp_path, width: int, height: int):
    """Debian's chromium through chromedriver, offline and without a sandbox (CI containers).

    Started a second time if the first start fails: chromedriver gives a browser 60 s to come up and selenium
    gives chromedriver ~30 s, fixed, and the first start on a host (nothing of chromium in the page cache yet,
    its profile made) on a loaded machine can take longer; the second finds the files read."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    def start(attempt: int):
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tmp_path / f'chrome-{attempt}'}", f"--window-size={width},{height}"):
            options.add_argument(flag)
        return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)

    try:
        return start(1)
    except WebDriverException as exc:
        warnings.warn(f"chromium did not start at the first attempt, starting it again: {exc.msg}", stacklevel=2)
        return start(2)


def hop(node: str, stage: int, finish: float, compute: float, ratio: float) -> dict:
    return {"stage": stage, "node_id": node, "prune_ratio": ratio, "received_ts": finish - compute - 0.01,
            "started_ts": finish - compute, "finished_ts": finish, "published_ts": finish}


def fill_database(path, now: float) -> None:
    """A site in every state a card shows: pi-a slowed and pruned by the controller, pi-b offline, held by the
    operator and infeasible, with idle replicas (pi-c has a stale slowdown estimate), pi-e the ingest node."""
    store = Store(path)
    store.add_run({"started_ts": now - 100, "gateway_id": "gateway", "slo_s": 0.2, "window_s": 10,
                   "nodes": ["pi-a", "pi-b"]})
    for i, (node, status) in enumerate([("pi-a", "online"), ("pi-b", "offline")]):
        store.update_node({"node_id": node, "status": status, "status_ts": now, "last_seen": now - 3,
                           "stage": i + 1, "first_block": 3 * i, "last_block": 3 * i + 2, "queue_depth": i,
                           "queue_capacity": 16, "processed": 40, "dropped": 0, "errors": {"bad_image": i},
                           "compute_mean_s": 0.01, "compute_p95_s": 0.02, "cpu_percent": 50.0,
                           "prune_ratio": 0.0, "decode_mean_s": 0.0123 if i == 0 else None})
    store.update_node({"node_id": "pi-c", "status": "online", "last_seen": now - 1, "stage": 2, "first_block": 3,
                       "last_block": 5, "prune_ratio": 0.0})
    store.update_node({"node_id": "pi-e", "status": "online", "last_seen": now - 1, "stage": 0})
    for i in range(40):
        e2e = 0.1 if i % 4 else 0.3  # every 4th frame misses the 0.2 s SLO
        finish = now - 40 + i
        store.add_request({"request_id": f"r{i}", "camera_id": "cam-1", "capture_ts": finish - e2e,
                           "finish_ts": finish, "e2e_s": e2e, "queue_s": 0.0, "compute_s": 0.05,
                           "transfer_s": e2e - 0.05, "label": "zebra", "label_index": 9, "confidence": 0.9,
                           "prune_ratios": [0.0, 0.0], "hops": [hop("pi-a", 1, finish - 0.05, 0.03, 0.3),
                                                                hop("pi-b", 2, finish - 0.01, 0.02, 0.0)]})
    for start, met in ((now - 60, 30), (now - 50, 0), (now - 40, 40)):  # the middle window met nothing
        store.add_window({"start_ts": start, "end_ts": start + 10, "count": 40, "slo_s": 0.2, "met": met,
                          "attainment_pct": 100.0 * met / 40, "p50_s": 0.1, "p95_s": 0.3, "p99_s": 0.3})
    thumbnail = make_thumbnail(Image.fromarray(textured_scene(500, 375)))  # the newest frame's, 240x180
    store.add_thumbnail({"request_id": "r39", "camera_id": "cam-1", "ts": now, "bytes": len(thumbnail),
                         "jpeg": thumbnail})
    store.add_error({"ts": now - 5, "component": "pi-a", "topic": "edgeprune/camera/x/frame",
                     "kind": "bad_image", "message": "frame is not a readable JPEG or PNG", "request_id": None})
    store.set_controller_status(now, {"enabled": True, "reason": None, "policy": "bottleneck", "manual": {"pi-b": 0.2},
                                      "ratios": {"pi-a": 0.3, "pi-b": 0.2},
                                      "slowdowns": {"pi-a": 3.2, "pi-b": 1.0, "pi-c": 2.4},
                                      "budget_s": 0.08, "accuracy_floor": 0.85})
    event = {"policy": "bottleneck", "source": "auto", "reason": "pi-a is 3.2x slower than calibrated",
             "ratios": {"pi-a": 0.3, "pi-b": 0.2}, "changed": {"pi-a": 0.3}, "predicted_stage_s": [0.07, 0.09],
             "predicted_bottleneck_s": 0.09, "predicted_accuracy": 0.91, "budget_s": 0.08, "metrics": {}}
    store.add_prune_event({**event, "ts": now - 30, "kind": "set", "infeasible": 0})
    store.add_prune_event({**event, "ts": now - 30, "kind": "infeasible", "infeasible": 1, "changed": {}})
    store.add_prune_event({"ts": now - 30, "kind": "set", "observed_count": 20, "observed_p50_s": 0.12,
                           "observed_p95_s": 0.15})  # the follow-up merges into the same event
    store.add_prune_event({**event, "ts": now - 1, "kind": "held", "infeasible": 0, "changed": {}})  # at the edge
    store.add_placement(Placement(  # stage 2 has replicas that have not reported yet; pi-e decodes the frames
        version=1796604057134, model="m", n_blocks=6, ingest_node="pi-e", share_token="t" * 12, issued_at=now - 100,
        stages=[StageAssignment(stage=1, node_id="pi-a", first_block=0, last_block=2),
                StageAssignment(stage=2, node_id="pi-b", first_block=3, last_block=5, replicas=["pi-c", "pi-d"])],
    ).model_dump(exclude={"share_token"}))
    store.close()


@pytest.fixture
def server(tmp_path):
    db = tmp_path / "edgeprune.db"
    fill_database(db, time.time())
    port = free_port()
    srv = make_server("127.0.0.1", port, create_app(WebSettings(db_path=db, port=port, public_status=True)), threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}"
    srv.shutdown()


def get_status(server: str, query: str = "") -> dict:
    return json.load(urllib.request.urlopen(f"{server}/api/status{query}", timeout=10))


def test_api_status_reports_nodes_latency_and_attainment(server):
    data = get_status(server)
    assert [n["node_id"] for n in data["nodes"]] == ["pi-e", "pi-a", "pi-b", "pi-c"]
    assert len(data["latency"]) == 40 and data["slo_s"] == 0.2
    assert data["latency"][0]["hops"][0] == ["pi-a", 0.03, 0.01, 0.3]  # node, compute, queue wait, ratio
    # the windows' own verdicts over the last 5 minutes: 30 + 0 + 40 of 120 frames met the SLO
    assert data["recent"]["frames"] == 120 and data["recent"]["attainment_pct"] == pytest.approx(70 / 1.2)
    assert data["errors"][0]["kind"] == "bad_image"
    event = next(e for e in data["prune_events"] if e["kind"] == "set")
    assert event["changed"] == {"pi-a": 0.3} and event["observed_p50_s"] == 0.12
    assert data["placement_words"] == ("placement 1: ingest pi-e → 1 pi-a (blocks 0–2) → "
                                       "2 pi-b + pi-c + pi-d (blocks 3–5)")


def test_api_status_since_a_cursor_sends_only_what_is_new(server, tmp_path):
    first = get_status(server)
    again = get_status(server, f"?since={first['cursor']}")
    assert again["incremental"] and again["latency"] == [] and again["windows"] == []
    assert len(again["nodes"]) == 4 and again["controller_words"]  # the small parts come whole
    store = Store(tmp_path / "edgeprune.db")
    now = time.time()
    store.add_request({"request_id": "late-written", "camera_id": "cam-1", "capture_ts": now - 90,
                       "finish_ts": now - 89.9, "e2e_s": 0.1, "hops": []})  # finished long ago, written now
    store.add_window({"start_ts": now - 30, "end_ts": now - 20, "count": 1, "slo_s": 0.2, "met": 1,
                      "attainment_pct": 100.0})
    store.close()
    new = get_status(server, f"?since={again['cursor']}")
    assert [f["e2e_s"] for f in new["latency"]] == [0.1] and [w["count"] for w in new["windows"]] == [1]
    assert len(get_status(server)["latency"]) == 41
    bad = urllib.request.Request(f"{server}/api/status?since=yesterday")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(bad, timeout=10)
    assert refused.value.code == 400 and "cursor" in json.load(refused.value)["error"]


def test_infeasible_lasts_until_a_later_decision_and_an_idle_controller_says_so():
    infeasible = {"kind": "infeasible", "ts": 10.0, "ratios": {"a": 0.9, "b": 0.0}, "predicted_stage_s": [0.3, 0.05],
                  "budget_s": 0.1}
    same_decision = {"kind": "set", "ts": 10.0}
    assert infeasible_nodes([infeasible, same_decision]) == {"a"}
    assert infeasible_nodes([{"kind": "set", "ts": 20.0}, infeasible, same_decision]) == set()  # a new decision
    assert controller_words({"enabled": False, "reason": "no accuracy model"}, [], [], set()) == (
        "controller off: no accuracy model")
    idle = [{"node_id": "a", "desired_ratio": 0.0, "prune_ratio": 0.0}]
    assert controller_words({"enabled": True, "policy": "adaptive"}, idle, [], set()) == (
        "adaptive policy: watching, nothing pruned")


def test_api_says_clearly_when_gateway_has_not_started(tmp_path):
    app = create_app(WebSettings(db_path=tmp_path / "missing.db", public_status=True))
    res = app.test_client().get("/api/status")
    assert res.status_code == 503 and "gateway" in res.get_json()["error"]


# Elements wider than the viewport, outside the details view's own scrolling tables and closed sections.
OVERFLOWING = """
return [...document.querySelectorAll("body *")].filter((e) => {
  if (e.closest(".scroll") || e.closest("details:not([open]) > :not(summary)")) return false;
  const r = e.getBoundingClientRect();
  return r.width > 0 && (r.right > innerWidth + 1 || r.left < -1);
}).map((e) => e.tagName + "#" + e.id + "." + e.className);
"""
# The colour drawn at the foot of the 0 % window's bar, in the attainment chart's canvas.
ZERO_BAR_PIXEL = """
const u = charts["windows-chart"], w = state.windows.find((w) => w.attainment_pct === 0);
const x = (u.valToPos(w.start_ts, "x", true) + u.valToPos(w.end_ts, "x", true)) / 2;
const y = u.valToPos(0, "y", true) - 1.5 * devicePixelRatio;
return [...u.ctx.getImageData(Math.round(x), Math.round(y), 1, 1).data];
"""


# The page drawn at the window's size: every chart resized to its box (the page redraws them on "resize").
FITTED = """
return typeof charts === "object" && Object.keys(charts).length === 5 && innerWidth === arguments[0]
  && Object.entries(charts).every(([id, c]) => c.width === chartWidth(id));
"""


def card_badges(driver) -> dict[str, set[str]]:
    """Each card's badge kinds, read in one script (nothing held across a redraw)."""
    return {k: set(v) for k, v in driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#cards .card')].map((c) => "
        "[c.dataset.node, [...c.querySelectorAll('.badge')].map((b) => b.dataset.kind)]))").items()}


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium/chromedriver not installed (install.sh --dev)")
def test_page_renders_in_headless_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium(tmp_path, 390, 844)
    try:
        driver.get(server + "/")
        wait = WebDriverWait(driver, 20)
        for width, height in ((390, 844), (1280, 800)):
            driver.set_window_size(width, height)
            wait.until(lambda d, w=width: d.execute_script(FITTED, w))
            badges = card_badges(driver)
            assert badges["pi-a"] == {"slowed", "pruned", "applying"}
            assert badges["pi-b"] == {"offline", "replica", "held", "applying", "infeasible"}
            assert badges["pi-c"] == {"replica"}  # a stale slowdown estimate on an idle node is not shown
            assert badges["pi-e"] == {"ingest"}
            assert driver.execute_script(OVERFLOWING) == [], f"overflows at {width} px"
            red, green, blue, alpha = driver.execute_script(ZERO_BAR_PIXEL)
            assert (red, green, blue) == (0xc6, 0x28, 0x28) and alpha == 255, "the 0 % window is not drawn"
            labels = json.loads(driver.execute_script(
                "return document.getElementById('latency-chart').firstChild.dataset.labels"))
            assert len(labels) == 3  # prune, infeasible (same instant), no change (at the right edge)
            for i, (left, right, row) in enumerate(labels):
                assert 0 <= left and right <= driver.execute_script(
                    "return charts['latency-chart'].bbox.width / devicePixelRatio")
                assert all(row != r or right < lo or left > hi for lo, hi, r in labels[i + 1:]), labels
        words = driver.find_element(By.ID, "controller-words").text
        assert "pruning pi-a to 0.3 because its compute is 3.2× its calibration; accuracy 0.91 ≥ floor 0.85" in words
        assert "pi-b held at 0.2 by the operator" in words and "cannot meet the 80 ms stage budget on pi-b" in words
        assert "70/120 frames" in driver.find_element(By.ID, "summary").text
        assert driver.find_element(By.ID, "pipeline").text.startswith("placement 1: ingest pi-e → 1 pi-a")
        # ten labels at one instant: each drawn on its own row or not at all, never over another
        placed = driver.execute_script("return placeLabels(Array(10).fill({x: 100, text: 'prune'}), 300, 3, "
                                       "(t) => 8 * t.length)")
        assert sorted(p["row"] for p in placed) == [0, 1, 2]
        driver.find_element(By.CSS_SELECTOR, "#details > summary").click()
        rows = driver.execute_script("return [...document.querySelectorAll('#nodes tbody tr')].map((r) => r.innerText)")
        assert "3.2×" in rows[1] and "0.3 / 0.0" in rows[1] and "12.3 ms" in rows[1]
        assert "bad_image" in driver.find_element(By.ID, "errors").text
        assert "pi-a → 0.3" in driver.find_element(By.ID, "events").text
        driver.save_screenshot(str(tmp_path / "page.png"))
        driver.set_window_size(390, 844)  # the newest detection shows its frame, on a phone too
        driver.get(server + "/detections")
        wait.until(lambda d: d.execute_script("const i = document.querySelector('img.thumb'); "
                                              "return i !== null && i.complete && i.naturalWidth === 240"))
        assert driver.execute_script(OVERFLOWING) == [], "the detections overflow at 390 px"
    finally:
        driver.quit()
