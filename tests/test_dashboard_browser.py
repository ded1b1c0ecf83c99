"""The dashboard in a real browser: two islands on 127.0.0.1 train one shard each; headless Chromium opens the
page an island serves (and the one `ddm-node dashboard` serves from a DHT client), the shard table shows both
shards training with steps that advance, and a screenshot is saved to docs/dashboard.png.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package (dev extra); skipped without them.
Run with `pytest -m browser`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live_swarm import config, log_tail, net  # noqa: F401 (net is a fixture)
from test_watch_live import READY, free_port, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.multiproc, pytest.mark.islands]
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "dashboard.png"
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1440,1180")


def _browser(tmp_path: Path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    return webdriver.Chrome(options=options, service=service)


def shard_rows(driver) -> dict[int, tuple[str, int]]:
    """The page's shard table as rendered now: shard -> (state, step); a step not known yet reads -1. One script
    call, so a re-render between two reads cannot mix two versions of the table."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#shards tbody tr[data-shard]')].map(tr => [tr.dataset.shard, "
        "tr.dataset.state, tr.querySelector('td.step').dataset.step])")
    return {int(shard): (state, int(step) if step else -1) for shard, state, step in rows}


def wait_page(driver, what: str, predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate(shard_rows(driver))
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; table: {shard_rows(driver)}")


def both_training(rows):
    return rows if sorted(rows) == [0, 1] and all(state == "training" and step > 0 for state, step in rows.values()) \
        else None


def test_dashboard_shows_both_shards_advancing_in_headless_chromium(net, tmp_path):  # noqa: F811
    driver = _browser(tmp_path)
    client = None
    try:
        run_id = net.partition(config(k=2, steps=6000, every=300, replicas=1))  # minutes of training on 2 cores
        port = free_port()
        first = net.start("island1", "--plan", str(net.root / "plan"), "--metrics-port", str(port))
        ready = wait_for("island1's ready line", lambda: READY.search(first.log.read_text(errors="replace")), 120,
                         first)
        maddr = ready.group(4)
        second = net.start("island2", "--run", run_id, "--initial-peers", maddr)
        wait_for("island2's ready line", lambda: READY.search(second.log.read_text(errors="replace")), 120, second)

        driver.get(f"http://127.0.0.1:{port}/")
        seen = wait_page(driver, "both shards training", both_training, 120)
        advanced = wait_page(driver, "both steps to advance", lambda rows: both_training(rows) if all(
            rows[k][1] > seen[k][1] for k in (0, 1)) else None, 60)
        assert all(advanced[k][1] > seen[k][1] for k in (0, 1))
        assert driver.find_element("id", "health").text == "live"

        # the same page from a DHT client that trains nothing
        client_port = free_port()
        client_log = open(tmp_path / "dashboard.log", "wb")
        client = subprocess.Popen([sys.executable, "-m", "ddm_node.cli", "dashboard", "--initial-peers", maddr,
                                   "--run", run_id, "--metrics-port", str(client_port)], stdout=client_log,
                                  stderr=subprocess.STDOUT, env=net.env(), start_new_session=True)
        deadline = time.monotonic() + 90
        while "dashboard of run" not in (tmp_path / "dashboard.log").read_text(errors="replace"):
            assert client.poll() is None and time.monotonic() < deadline, (tmp_path / "dashboard.log").read_text()
            time.sleep(0.3)
        driver.get(f"http://127.0.0.1:{client_port}/")
        wait_page(driver, "both shards training (dashboard client)", both_training, 60)
        assert "dashboard client" in driver.find_element("id", "node-line").text

        # the screenshot for the README: island1's page once checkpoints and curves are in
        driver.get(f"http://127.0.0.1:{port}/")
        wait_page(driver, "a checkpoint of each shard", lambda rows: both_training(rows) if all(
            step > 650 for _, step in rows.values()) else None, 120)
        time.sleep(3)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(SCREENSHOT))
        assert re.search(r"island \w+ · training", driver.find_element("id", "node-line").text)
        for p in (first, second):
            assert p.alive, log_tail(p)
    finally:
        driver.quit()
        if client is not None and client.poll() is None:
            os.killpg(client.pid, signal.SIGTERM)
            try:
                client.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(client.pid, signal.SIGKILL)
                client.wait()
