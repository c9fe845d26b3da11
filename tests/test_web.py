"""The operator page in a real headless Chromium, over a real SQLite file."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request

import pytest
from werkzeug.serving import make_server

from edgeprune.broker import free_port
from gateway.store import Store
from shared.schemas import Placement, StageAssignment
from shared.settings import WebSettings
from web.app import create_app

pytestmark = pytest.mark.integration
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def headless_chromium(tmp_path, width: int, height: int):
    """Debian's chromium through chromedriver, offline and without a sandbox (CI containers)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chrome'}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def fill_database(path, now: float) -> None:
    store = Store(path)
    store.add_run({"started_ts": now - 100, "gateway_id": "gateway", "slo_s": 0.2, "window_s": 10,
                   "nodes": ["pi-a", "pi-b"]})
    for i, (node, status) in enumerate([("pi-a", "online"), ("pi-b", "offline")]):
        store.update_node({"node_id": node, "status": status, "status_ts": now, "last_seen": now - 3,
                           "stage": i + 1, "first_block": 3 * i, "last_block": 3 * i + 2, "queue_depth": i,
                           "queue_capacity": 16, "processed": 40, "dropped": 0, "errors": {"bad_image": i},
                           "compute_mean_s": 0.01, "compute_p95_s": 0.02, "cpu_percent": 50.0,
                           "prune_ratio": 0.0, "decode_mean_s": 0.0123 if i == 0 else None})
    for i in range(40):
        e2e = 0.1 if i % 4 else 0.3  # every 4th frame misses the 0.2 s SLO
        store.add_request({"request_id": f"r{i}", "camera_id": "cam-1", "capture_ts": now - 60 + i - e2e,
                           "finish_ts": now - 60 + i, "e2e_s": e2e, "queue_s": 0.0, "compute_s": 0.05,
                           "transfer_s": e2e - 0.05, "label": "zebra", "label_index": 9, "confidence": 0.9,
                           "prune_ratios": [0.0, 0.0], "hops": []})
    store.add_window({"start_ts": now - 60, "end_ts": now - 50, "count": 40, "slo_s": 0.2, "met": 30,
                      "attainment_pct": 75.0, "p50_s": 0.1, "p95_s": 0.3, "p99_s": 0.3})
    store.add_error({"ts": now - 5, "component": "pi-a", "topic": "edgeprune/camera/x/frame",
                     "kind": "bad_image", "message": "frame is not a readable JPEG or PNG", "request_id": None})
    store.set_controller_status(now, {"enabled": True, "reason": None, "policy": "bottleneck",
                                      "ratios": {"pi-a": 0.3, "pi-b": 0.0}, "slowdowns": {"pi-a": 3.2, "pi-b": 1.0},
                                      "budget_s": 0.08, "accuracy_floor": 0.85})
    store.add_prune_event({"ts": now - 30, "kind": "set", "policy": "bottleneck", "source": "auto",
                           "reason": "pi-a is 3.2x slower than calibrated", "ratios": {"pi-a": 0.3, "pi-b": 0.0},
                           "changed": {"pi-a": 0.3}, "predicted_stage_s": [0.07, 0.05],
                           "predicted_bottleneck_s": 0.07, "predicted_accuracy": 0.91, "budget_s": 0.08,
                           "infeasible": 0, "metrics": {}})
    store.add_prune_event({"ts": now - 30, "kind": "set", "observed_count": 20, "observed_p50_s": 0.12,
                           "observed_p95_s": 0.15})  # the follow-up merges into the same event
    store.add_placement(Placement(  # stage 2 has replicas that have not reported yet; pi-e decodes the frames
        version=3, model="m", n_blocks=6, ingest_node="pi-e", share_token="t" * 12, issued_at=now - 100, stages=[
            StageAssignment(stage=1, node_id="pi-a", first_block=0, last_block=2),
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


def test_api_status_reports_nodes_latency_and_attainment(server):
    data = json.load(urllib.request.urlopen(f"{server}/api/status", timeout=10))
    assert [n["node_id"] for n in data["nodes"]] == ["pi-a", "pi-b"]
    assert len(data["latency"]) == 40 and data["slo_s"] == 0.2
    assert data["totals"]["results"] == 40 and data["totals"]["attainment_pct"] == pytest.approx(75.0)
    assert data["errors"][0]["kind"] == "bad_image"
    (event,) = data["prune_events"]
    assert event["changed"] == {"pi-a": 0.3} and event["observed_p50_s"] == 0.12
    assert data["controller"]["slowdowns"]["pi-a"] == 3.2


def test_api_says_clearly_when_gateway_has_not_started(tmp_path):
    app = create_app(WebSettings(db_path=tmp_path / "missing.db", public_status=True))
    res = app.test_client().get("/api/status")
    assert res.status_code == 503 and "gateway" in res.get_json()["error"]


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium/chromedriver not installed (install.sh --dev)")
def test_page_renders_in_headless_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium(tmp_path, 1200, 1000)
    try:
        driver.get(server + "/")
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")) == 2)
        rows = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")]
        assert "pi-a" in rows[0] and "online" in rows[0] and "pi-b" in rows[1] and "offline" in rows[1]
        assert "bad_image: 1" in rows[1]
        assert "2 (replica, with pi-c, pi-d)" in rows[1] and "replica" not in rows[0]
        assert driver.find_element(By.ID, "pipeline").text == (
            "placement v3: ingest pi-e → stage 1 · blocks 0–2 · pi-a → stage 2 · blocks 3–5 · pi-b + pi-c + pi-d")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#latency circle")) == 40)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#latency circle.dot-late")) == 10
        assert len(driver.find_elements(By.CSS_SELECTOR, "#latency line.slo-line")) == 1
        assert "75.0 %" in driver.find_element(By.ID, "summary").text
        assert "bad_image" in driver.find_element(By.ID, "errors").text
        assert "3.2×" in rows[0] and "0.3 / 0.0" in rows[0]  # desired by the controller / applied by the node
        assert "12.3 ms" in rows[0]  # stage 1's frame decode, apart from its compute
        assert len(driver.find_elements(By.CSS_SELECTOR, "#latency line.prune-mark")) == 1
        assert "running · policy bottleneck" in driver.find_element(By.ID, "controller").text
        events = driver.find_element(By.ID, "events").text
        assert "pi-a → 0.3" in events and "120.0 ms" in events
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()
