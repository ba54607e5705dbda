"""The dashboard in a real browser: headless Debian chromium driven by Playwright, against ``streamlit run``.

Starts a run from the Launch tab, watches the loss chart gain points, changes the lr from the sidebar and
sees the change in the event list and as a marker on the chart, then saves a screenshot to
test-artifacts/dashboard.png. Installs chromium with apt-get when /usr/bin/chromium is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app" / "dashboard.py"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium, installed with apt-get on first use (skipped only when there is no apt)."""
    if not CHROMIUM.exists():
        if shutil.which("apt-get") is None:
            pytest.skip("chromium is missing and apt-get is unavailable to install it")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = "apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver"
        done = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not CHROMIUM.exists():
            pytest.fail(f"could not install chromium with apt-get:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path):
    """``streamlit run app/dashboard.py`` on 127.0.0.1 and a free port; stopped by pid/process group."""
    port = free_port()
    runs = tmp_path / "runs"
    log = open(tmp_path / "streamlit.log", "w")
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", "127.0.0.1",
           "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "viewer", "--", "--runs", str(runs)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"streamlit did not come up:\n{(tmp_path / 'streamlit.log').read_text()[-3000:]}")
            time.sleep(0.25)
        yield url, runs
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


# the traces of the first plotly chart on the page (the loss chart): the step of the train loss's last point
# (not the point count: a long series is downsampled to a fixed number of points) and the marker labels
LOSS_LAST_STEP_JS = """() => {
  const gd = document.querySelector('.stPlotlyChart .js-plotly-plot');
  const x = gd && gd.data && gd.data.length ? gd.data[0].x : null;
  return x && x.length ? Number(x[x.length - 1]) : 0;
}"""
MARKER_TEXT_JS = """() => {
  const gd = document.querySelector('.stPlotlyChart .js-plotly-plot');
  if (!gd || !gd.data) return [];
  const ev = gd.data.find(t => t.name === 'events');
  return ev && ev.text ? Array.from(ev.text) : [];
}"""


def test_start_watch_and_steer_in_a_browser(chromium, server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python playwright is not installed "
                                                                  "(pip install playwright; no browser download)")
    url, runs = server
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
        except BaseException:
            browser.close()
            raise
        try:
            page.goto(url)
            page.get_by_text("Training Workbench").first.wait_for(timeout=30_000)
            page.get_by_text("No run yet").first.wait_for(timeout=30_000)

            # Launch tab: a run long enough to steer, then Start
            page.get_by_role("tab", name="Launch").click()
            epochs = page.get_by_role("textbox", name="Epochs (empty: no limit)")
            epochs.fill("1000")
            epochs.press("Enter")
            page.wait_for_timeout(500)
            page.get_by_role("button", name="Start", exact=True).click()
            page.get_by_text("Started run").first.wait_for(timeout=30_000)

            # Live tab: the loss chart reaches later steps within a few seconds
            page.get_by_role("tab", name="Live").click()
            page.wait_for_function(f"({LOSS_LAST_STEP_JS})() > 0", timeout=20_000)
            first = page.evaluate(LOSS_LAST_STEP_JS)
            page.wait_for_function(f"({LOSS_LAST_STEP_JS})() > {first}", timeout=10_000)
            assert page.evaluate(LOSS_LAST_STEP_JS) > first

            # change the lr in the sidebar: applied by the trainer, listed and drawn as a marker
            lr = page.get_by_role("textbox", name="Learning rate (base)")
            lr.fill("0.003")
            lr.press("Enter")
            page.wait_for_timeout(500)
            page.get_by_test_id("stSidebarUserContent").get_by_role("button", name="Apply changes").click()
            page.get_by_text("lr=0.003: applied at step").first.wait_for(timeout=20_000)
            # the event list (markdown turns -> into an arrow) and the marker on the loss chart
            page.get_by_text(re.compile(r"lr: 0\.001 (->|→) 0\.003")).first.wait_for(timeout=20_000)
            page.wait_for_function(f"({MARKER_TEXT_JS})().some(t => t.startsWith('lr: 0.001 -> 0.003'))",
                                   timeout=10_000)

            # a bad value: an inline error with the engine's message, no traceback
            lr.fill("-1")
            lr.press("Enter")
            page.wait_for_timeout(500)
            page.get_by_test_id("stSidebarUserContent").get_by_role("button", name="Apply changes").click()
            page.get_by_text("lr: got -1.0; allowed: a number > 0").first.wait_for(timeout=20_000)
            assert page.locator(".stException").count() == 0
            lr.fill("0.003")
            lr.press("Enter")
            page.wait_for_timeout(2_500)  # a refresh or two, so the screenshot shows the curve after the change
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            sidebar = page.get_by_test_id("stSidebarUserContent")  # the page header has its own "Stop" while busy
            sidebar.get_by_role("button", name="Stop", exact=True).click()
            page.get_by_text("stop: applied").first.wait_for(timeout=30_000)
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / "dashboard-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
    assert len(list(runs.glob("*/run.db"))) == 1
