"""The operator takes control in a real browser: real mosquitto, gateway, two node agents, the web page.

Log in, change the SLO, hold one node at a ratio; the retained desired state is on the broker, the node
applies it and the page shows it, the actions are audited; after a gateway restart the SLO setting holds.
"""

from __future__ import annotations

import os
import sqlite3
import time
import urllib.request
from pathlib import Path

import pytest
from werkzeug.security import generate_password_hash

from edgeprune.broker import free_port
from tests.conftest import STARTUP_S, Processes, Recorder, component_env, open_reader, wait_until
from tests.test_controller_e2e import write_accuracy_model
from tests.test_web import CHROMEDRIVER, CHROMIUM, headless_chromium

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium/chromedriver not installed")]
PASSWORD = "field-operator-1"
# EDGEPRUNE_SCREENSHOTS=docs saves the two screenshots the docs show
SCREENSHOTS = os.environ.get("EDGEPRUNE_SCREENSHOTS")


def page_up(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def test_operator_changes_slo_and_holds_a_node_from_the_browser(broker, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    db = tmp_path / "edgeprune.db"
    accuracy = tmp_path / "accuracy.json"
    write_accuracy_model(accuracy)
    port = free_port()
    env = component_env(
        broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES="node-1,node-2",
        EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S="0.2", EDGEPRUNE_GATEWAY_WINDOW_S="2",
        EDGEPRUNE_GATEWAY_ACCURACY_MODEL=str(accuracy), EDGEPRUNE_NODE_UPLINK_MBIT_S="100000",
        EDGEPRUNE_NODE_STATS_INTERVAL_S="0.5", EDGEPRUNE_WEB_DB_PATH=str(db), EDGEPRUNE_WEB_PORT=str(port),
        EDGEPRUNE_WEB_PASSWORD_HASH=generate_password_hash(PASSWORD), EDGEPRUNE_WEB_SECRET_KEY="test-only-key")
    procs = Processes(tmp_path, env)
    driver = None
    try:
        procs.start("gateway", "gateway")
        procs.start("node-1", "node", "--node-id", "node-1")
        procs.start("node-2", "node", "--node-id", "node-2")
        procs.start("web", "web")
        procs.start("camera", "camera", "--camera-id", "cam-1", "--rate", "4", "--arrival", "fixed")
        reader = open_reader(db)
        wait_until(lambda: (reader.controller_status() or {}).get("enabled"), 120,
                   "the controller never started (placement + calibrations + accuracy model)")
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: page_up(base + "/login"), 30, "the web page did not come up")

        driver = headless_chromium(tmp_path, 1280, 800)
        wait = WebDriverWait(driver, 30)
        driver.get(base + "/")
        assert "/login" in driver.current_url  # nothing without a login
        driver.find_element(By.ID, "name").send_keys("ana")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login-button").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#node-controls tbody tr")) == 2)

        def answer() -> str:
            wait.until(lambda d: "result ok" in (r := d.find_element(By.ID, "command-result")).get_attribute("class")
                       or "result error" in r.get_attribute("class"))
            return driver.find_element(By.ID, "command-result").text

        slo_form = driver.find_element(By.ID, "set-slo_s")
        slo_form.find_element(By.NAME, "value").send_keys("0.4")
        slo_form.find_element(By.TAG_NAME, "button").click()
        assert answer().startswith("accepted: SLO target (s): 0.5 -> 0.4")

        driver.execute_script("document.getElementById('command-result').className = 'result'")
        slo_form.find_element(By.NAME, "value").clear()
        slo_form.find_element(By.NAME, "value").send_keys("-3")
        slo_form.find_element(By.TAG_NAME, "button").click()
        assert "refused" in answer() and "greater than 0" in driver.find_element(By.ID, "command-result").text

        held = reader.placement()["stages"][-1]["node_id"]
        driver.execute_script("document.getElementById('command-result').className = 'result'")
        hold = driver.find_element(By.ID, f"hold-{held}")
        Select(hold.find_element(By.NAME, "ratio")).select_by_value("0.5")
        hold.find_element(By.TAG_NAME, "button").click()
        assert answer() == f"accepted: {held} held at ratio 0.5"

        late = Recorder(broker, f"edgeprune/node/{held}/prune/set")  # a fresh subscriber gets the retained copy
        try:
            wait_until(lambda: any(r and t.endswith("/prune/set") for t, _, r in late.messages), 10,
                       "no retained desired state on the broker")
            (desired,) = [m for m in late.json_on(f"edgeprune/node/{held}/prune/set")][-1:]
            assert desired["ratio"] == 0.5 and desired["source"] == "manual"
        finally:
            late.close()

        def node_row() -> str:
            rows = driver.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")
            return next((r.text for r in rows if r.text.startswith(held)), "")
        WebDriverWait(driver, 20).until(lambda d: "0.5 / 0.5" in node_row())  # desired / applied by the node
        wait.until(lambda d: "hold" in d.find_element(By.ID, "actions").text)

        actions = sqlite3.connect(db).execute("SELECT by, action, target, old, new FROM operator_actions "
                                              "ORDER BY id").fetchall()
        assert ("ana", "set slo_s", "gateway", "0.5", "0.4") in actions
        assert ("ana", "hold", held, "0.0", "0.5") in actions or ("ana", "hold", held, "null", "0.5") in actions
        if SCREENSHOTS:
            time.sleep(2)  # a few more frames on the chart
            driver.save_screenshot(str(Path(SCREENSHOTS) / "operator-page-desktop.png"))
            driver.set_window_size(390, 844)
            driver.save_screenshot(str(Path(SCREENSHOTS) / "operator-page-phone.png"))
            driver.set_window_size(1280, 800)

        procs.procs["gateway"].terminate()
        procs.procs["gateway"].wait(30)
        restarted = time.time()
        procs.start("gateway-2", "gateway")
        wait_until(lambda: (reader.controller_status() or {}).get("settings", {}).get("slo_s") == 0.4
                   and reader.current_run()["started_ts"] > restarted, STARTUP_S,
                   "the SLO setting did not survive the gateway restart")
        assert reader.current_run()["slo_s"] == 0.4
        wait.until(lambda d: "SLO 400.0 ms" in d.find_element(By.ID, "summary").text)
    finally:
        if driver is not None:
            driver.quit()
        procs.stop_all()
