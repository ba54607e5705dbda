"""The dashboard in a real browser: headless Debian chromium driven by Playwright, against ``streamlit run``.

Starts a run from the Launch tab, watches the loss chart gain points, changes the lr from the sidebar and
sees the change in the event list and as a marker on the chart, then saves a screenshot to
test-artifacts/dashboard.png. The demo's first screen is a running run (docs/dashboard.png, the README's
screenshot, is taken there), a zoom survives refreshes, and a Stop clicked after minutes of live refreshes is
answered (WORKBENCH_BROWSER_WATCH_S, default 30 s). A checkpoint written while the page shows the Checkpoints
tab brings its selector and fork form without a rerun of the page, and the form holds the checkpoint's
controls. Installs chromium with apt-get when /usr/bin/chromium is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import stop_group

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
def server(request, tmp_path):
    """``streamlit run app/dashboard.py`` on 127.0.0.1 and a free port; stopped by pid/process group.
    Parametrize indirectly with extra app arguments (e.g. ``["--demo"]``)."""
    port = free_port()
    runs = tmp_path / "runs"
    log = open(tmp_path / "streamlit.log", "w")
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", "127.0.0.1",
           "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "viewer", "--", "--runs", str(runs), *getattr(request, "param", [])]
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
        stop_group(proc)
        log.close()


# The live charts are one grid drawn in place inside a component's iframe (app/charts.py); each chart is a
# plotly div #chart-<name>. Read from plotly's _fullData: the step of the train loss's last point (not the
# point count: a long series is downsampled to a fixed number of points) and the marker labels.
LOSS_LAST_STEP_JS = """() => {
  const gd = document.getElementById('chart-loss');
  const x = gd && gd._fullData && gd._fullData.length ? gd._fullData[0].x : null;
  return x && x.length ? Number(x[x.length - 1]) : 0;
}"""
MARKER_TEXT_JS = """() => {
  const gd = document.getElementById('chart-loss');
  if (!gd || !gd._fullData) return [];
  const ev = gd._fullData.find(t => t.name === 'events');
  return ev && ev.text ? Array.from(ev.text) : [];
}"""


def live_charts(page):
    """The Live tab's chart grid: (its iframe element, the frame to evaluate in)."""
    el = page.wait_for_selector("iframe[title*=chart_grid]", timeout=60_000)
    frame = el.content_frame()
    frame.wait_for_selector("#chart-loss .main-svg", timeout=60_000)
    return el, frame


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
            _, charts = live_charts(page)
            charts.wait_for_function(f"({LOSS_LAST_STEP_JS})() > 0", timeout=20_000)
            first = charts.evaluate(LOSS_LAST_STEP_JS)
            charts.wait_for_function(f"({LOSS_LAST_STEP_JS})() > {first}", timeout=10_000)
            assert charts.evaluate(LOSS_LAST_STEP_JS) > first

            # change the lr in the sidebar: applied by the trainer, listed and drawn as a marker
            lr = page.get_by_role("textbox", name="Learning rate (base)")
            lr.fill("0.003")
            lr.press("Enter")
            page.wait_for_timeout(500)
            page.get_by_test_id("stSidebarUserContent").get_by_role("button", name="Apply changes").click()
            page.get_by_text("lr=0.003: applied at step").first.wait_for(timeout=20_000)
            # the event list (markdown turns -> into an arrow) and the marker on the loss chart
            page.get_by_text(re.compile(r"lr: 0\.001 (->|→) 0\.003")).first.wait_for(timeout=20_000)
            charts.wait_for_function(f"({MARKER_TEXT_JS})().some(t => /^step \\d+: lr: 0\\.001 -> 0\\.003/.test(t))",
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


DOCS = ROOT / "docs"
WATCH_S = float(os.environ.get("WORKBENCH_BROWSER_WATCH_S", "30"))  # how long to watch before clicking Stop
LIVE_HEADER_JS = """() => Array.from(document.querySelectorAll('h3')).map(h => h.innerText).join('|')"""
LOSS_XRANGE_JS = """() => {
  const gd = document.getElementById('chart-loss');
  const ax = gd && gd._fullLayout && gd._fullLayout.xaxis;
  return ax ? [ax.range[0], ax.range[1], ax.autorange === true, gd.__kept === true] : null;
}"""


@contextmanager
def _page(chromium, failure_png: str):
    """(playwright's sync_api, a 1400x1000 page) in a fresh Chromium; a full-page screenshot goes to
    test-artifacts/``failure_png`` when the test fails, and the browser is closed whatever happens."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python playwright is not installed")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            try:
                yield sync_api, page
            except BaseException:
                page.screenshot(path=str(ARTIFACTS / failure_png), full_page=True)
                raise
        finally:
            browser.close()


def _wait_for_refreshes(charts, n: int) -> None:
    """Until the loss chart has been redrawn with later data ``n`` times."""
    for _ in range(n):
        last = charts.evaluate(LOSS_LAST_STEP_JS)
        charts.wait_for_function(f"({LOSS_LAST_STEP_JS})() > {last}", timeout=20_000)


@pytest.mark.parametrize("server", [["--demo"]], indirect=True)
def test_demo_is_seen_training_zoom_holds_and_a_late_stop_is_answered(chromium, server):
    url, runs = server
    with _page(chromium, "dashboard-demo-failure.png") as (sync_api, page):
        page.goto(url)
        # the first screen: the demo run, training, its loss curve growing
        page.wait_for_function(f"({LIVE_HEADER_JS})().includes('running')", timeout=45_000)
        frame_el, charts = live_charts(page)
        charts.wait_for_function(f"({LOSS_LAST_STEP_JS})() > 0", timeout=30_000)
        _wait_for_refreshes(charts, 1)
        assert "running" in page.evaluate(LIVE_HEADER_JS)
        DOCS.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS / "dashboard.png"))
        assert "running" in page.evaluate(LIVE_HEADER_JS)  # still live after the screenshot

        # a user's zoom on the live loss chart survives three refreshes, on the same plot (not a rebuilt one)
        charts.evaluate("() => { document.getElementById('chart-loss').__kept = true; }")
        box = charts.evaluate("""() => { const r = document.querySelector('#chart-loss .nsewdrag')
                                                   .getBoundingClientRect();
                                         return {x: r.x, y: r.y, width: r.width, height: r.height}; }""")
        origin = frame_el.bounding_box()
        x0, y = origin["x"] + box["x"], origin["y"] + box["y"] + box["height"] / 2
        page.mouse.move(x0 + box["width"] * 0.25, y)
        page.mouse.down()
        page.mouse.move(x0 + box["width"] * 0.45, y, steps=8)
        page.mouse.up()
        zoomed = charts.evaluate(LOSS_XRANGE_JS)
        assert zoomed and not zoomed[2], zoomed
        _wait_for_refreshes(charts, 3)
        after = charts.evaluate(LOSS_XRANGE_JS)
        assert after[:2] == pytest.approx(zoomed[:2]) and not after[2] and after[3], (zoomed, after)

        # minutes of live refreshes later, a click on Stop is answered
        deadline = time.monotonic() + WATCH_S
        while time.monotonic() < deadline:
            _wait_for_refreshes(charts, 1)
        assert "running" in page.evaluate(LIVE_HEADER_JS)
        sidebar = page.get_by_test_id("stSidebarUserContent")
        sidebar.get_by_role("button", name="Stop", exact=True).click()
        sidebar.get_by_text(re.compile(r"stop: (applied|pending)")).first.wait_for(timeout=10_000)
        sidebar.get_by_text("stop: applied").first.wait_for(timeout=30_000)
        page.wait_for_function(f"({LIVE_HEADER_JS})().includes('stopped')", timeout=30_000)
    assert 20_000 < (DOCS / "dashboard.png").stat().st_size < 400_000


def test_checkpoint_controls_appear_without_a_rerun_and_the_fork_form_is_the_checkpoints(chromium, server):
    from workbench.runview import RunView

    url, runs = server
    with _page(chromium, "dashboard-checkpoints-failure.png") as (sync_api, page):
        page.goto(url)
        page.get_by_text("No run yet").first.wait_for(timeout=30_000)
        page.get_by_role("tab", name="Launch").click()
        page.get_by_text("Start paused").first.click()
        page.get_by_role("button", name="Start", exact=True).click()
        page.get_by_text("Started run").first.wait_for(timeout=30_000)
        (run_dir,) = [p.parent for p in runs.glob("*/run.db")]

        page.get_by_role("tab", name="Checkpoints").click()
        page.get_by_text("No checkpoint yet").first.wait_for(timeout=20_000)
        # a checkpoint the page did not ask for (posted by another process): its controls come by themselves
        view = RunView(run_dir)
        try:
            view.wait(view.command("checkpoint", source="api"), 20)
            # then the run's batch size changes: the form must still show the checkpoint's
            view.wait(view.set(source="api", batch_size=128), 20)
        finally:
            view.close()
        fork = page.get_by_role("button", name="Fork into a new run")
        fork.wait_for(timeout=20_000)
        size = page.get_by_test_id("stMain").get_by_role("spinbutton", name="Batch size")
        sync_api.expect(size).to_have_value("64", timeout=10_000)   # the checkpoint's, not the run's 128
        fork.click()
        page.get_by_text(re.compile(r"Forked .* from step \d+ with the checkpoint's controls")).first.wait_for(
            timeout=30_000)
    child = next(p.parent for p in runs.glob("*/run.db") if p.parent != run_dir)
    view = RunView(child)
    try:
        assert view.snapshot()["controls"]["batch_size"] == 64
    finally:
        view.close()
