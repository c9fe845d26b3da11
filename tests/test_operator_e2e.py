"""The operator takes control in a real browser: real mosquitto, gateway, two node agents, the web page.

Log in, change the SLO, hold one node at a ratio; the retained desired state is on the broker, the node
applies it and its card says it is held, the actions are audited; the other node slowed far beyond what pruning
can absorb shows slowed, pruned and infeasible on its card, on a phone and a desktop, with nothing wider than
the screen; after a gateway restart the SLO setting holds.
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
from tests.test_web import CHROMEDRIVER, CHROMIUM, FITTED, OVERFLOWING, card_badges, headless_chromium

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


# What a script (or the demo's control) sends: the page posts it with its CSRF token.
SEND = """
const [body, done] = arguments;
fetch("/api/command", {method: "POST", credentials: "same-origin", body: JSON.stringify(body),
  headers: {"Content-Type": "application/json",
            "X-CSRFToken": document.querySelector('meta[name="csrf-token"]').content}})
  .then((r) => r.json()).then(done, (e) => done({ok: false, message: String(e)}));
"""


def test_operator_changes_slo_and_holds_a_node_from_the_browser(broker, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
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
        EDGEPRUNE_WEB_PASSWORD_HASH=generate_password_hash(PASSWORD), EDGEPRUNE_WEB_SECRET_KEY="test-only-key",
        EDGEPRUNE_CONTROLLER_POLICY="adaptive")  # acts on a slowed node's first frames
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
        # every wait is on state and returns once it holds; generous, as the host may be loaded (each round trip
        # is page -> web -> broker -> gateway -> node -> database -> the page's next poll)
        wait = WebDriverWait(driver, STARTUP_S)
        # controls are rebuilt when the nodes or the ladder change: an element found before may be gone
        retry = WebDriverWait(driver, STARTUP_S, ignored_exceptions=[StaleElementReferenceException])
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

        slowed, held = [s["node_id"] for s in reader.placement()["stages"]]
        driver.execute_script("document.getElementById('command-result').className = 'result'")

        def hold_at_half(d) -> bool:
            hold = d.find_element(By.ID, f"hold-{held}")
            Select(hold.find_element(By.NAME, "ratio")).select_by_value("0.5")
            hold.find_element(By.TAG_NAME, "button").click()
            return True
        retry.until(hold_at_half)
        assert answer() == f"accepted: {held} held at ratio 0.5"
        assert not driver.find_elements(By.ID, f"slowdown-{held}")  # the demo's control is not on a real site

        late = Recorder(broker, f"edgeprune/node/{held}/prune/set")  # a fresh subscriber gets the retained copy
        try:
            wait_until(lambda: any(r and t.endswith("/prune/set") for t, _, r in late.messages), 10,
                       "no retained desired state on the broker")
            (desired,) = [m for m in late.json_on(f"edgeprune/node/{held}/prune/set")][-1:]
            assert desired["ratio"] == 0.5 and desired["source"] == "manual"
        finally:
            late.close()

        wait.until(lambda d: card_badges(d).get(held) == {"held"})  # applied by the node: no "applying"
        wait.until(lambda d: "hold" in d.find_element(By.ID, "actions").get_attribute("textContent"))

        # far slower than the highest ratio can make up for, on any host: 150x was not always (a run here calibrated
        # the slice at 1.45 ms unpruned and ~1 ms at 0.5, so 0.5 met the 160 ms budget and no card said infeasible);
        # at the command's largest factor even the slice at 0.9 (0.54 ms there) takes over three budgets
        assert driver.execute_async_script(SEND, {"cmd": "node_slowdown", "node_id": slowed, "factor": 1000})["ok"]

        def says_it(d) -> bool:  # each read in a script of its own: no element held across a redraw
            badges = card_badges(d)
            words = d.execute_script("return document.getElementById('controller-words').textContent")
            return ({"slowed", "pruned", "infeasible"} <= badges.get(slowed, set()) and "held" in badges.get(held, ())
                    and f"pruning {slowed}" in words and f"{held} held at 0.5 by the operator" in words
                    and "cannot meet" in words and slowed in words.split("cannot meet")[1])
        try:
            wait.until(says_it)
        except TimeoutException:
            pytest.fail(f"the page never said {slowed} is slowed, pruned and infeasible and {held} held: "
                        f"{card_badges(driver)}; {driver.find_element(By.ID, 'controller-words').text}")
        for width, height in ((390, 844), (1280, 800)):
            driver.set_window_size(width, height)
            wait.until(lambda d, w=width: d.execute_script(FITTED, w))
            badges = card_badges(driver)
            assert {"slowed", "pruned", "infeasible"} <= badges[slowed] and "held" in badges[held], badges
            assert driver.execute_script(OVERFLOWING) == [], f"overflows at {width} px"
            if SCREENSHOTS:  # the whole page at this width
                driver.set_window_size(width, min(4000, driver.execute_script("return document.body.scrollHeight")))
                wait.until(lambda d, w=width: d.execute_script(FITTED, w))
                name = f"operator-page-{'phone' if width < 600 else 'desktop'}.png"
                driver.save_screenshot(str(Path(SCREENSHOTS) / name))
        assert driver.execute_async_script(SEND, {"cmd": "node_slowdown", "node_id": slowed, "factor": 1})["ok"]

        actions = sqlite3.connect(db).execute("SELECT by, action, target, old, new FROM operator_actions "
                                              "ORDER BY id").fetchall()
        assert ("ana", "set slo_s", "gateway", "0.5", "0.4") in actions
        assert ("ana", "hold", held, "0.0", "0.5") in actions or ("ana", "hold", held, "null", "0.5") in actions

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
