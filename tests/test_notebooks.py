"""Every teaching notebook runs top to bottom on a real kernel (its cells assert what they show), within
its time budget, and is stored without outputs; the notebooks that teach live (02, 03, 04, 07) start their
run and wait with ``await watch(tr)``, and their panel's loss chart grows while the lesson's cells run, as a
second frontend on the kernel's IOPub channel sees; no cell prints a JSON warning; an executed notebook
converted to HTML shows the panel's static fallback (no widget state in the file)."""
from __future__ import annotations

import json
import queue
import re
import threading
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
BUDGET_S = 90          # each notebook, top to bottom, on 2 CPU cores
MARGIN_S = 60          # slack for a loaded CI machine and the kernel's start
LIVE = ("02", "03", "04", "07", "08")   # notebooks whose panel must move while their cells run
APART_S = 1.0          # two readings of the loss chart at least this far apart, the later one reaching a later step


def test_the_notebooks_exist_and_are_stored_without_outputs():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07", "08"]
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name} has outputs"
        assert "widgets" not in nb.get("metadata", {}), f"{path.name} carries saved widget state"
        assert nb["metadata"]["kernelspec"]["name"] == "python3"


class LossChartSpy:
    """A second frontend on a kernel: reads every IOPub message the kernel publishes (nbclient keeps only
    those of the cell it runs, while a panel's poller started in one cell keeps drawing during the next) and
    records, per update of the panel's loss chart, how many points its train-loss trace received and its last step."""

    def __init__(self, connection_info: dict) -> None:
        from jupyter_client import BlockingKernelClient

        self.kc = BlockingKernelClient()
        self.kc.load_connection_info(connection_info)
        self.kc.start_channels(shell=False, stdin=False, hb=False, control=False)
        self.loss_charts: set[str] = set()
        self.readings: list[tuple[float, int, float | None]] = []   # (monotonic time, points, last step)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                continue
            if msg["msg_type"] in ("comm_open", "comm_msg"):
                data = msg["content"]["data"]
                buffers = {tuple(p): b for p, b in zip(data.get("buffer_paths") or [], msg.get("buffers") or [])}
                self._see(msg["content"]["comm_id"], data.get("state") or {}, buffers)

    def _see(self, comm_id: str, state: dict, buffers: dict) -> None:
        if any(t.get("name") == "train loss" for t in state.get("_widget_data") or []):
            self.loss_charts.add(comm_id)      # the FigureWidget whose first trace is the train loss
        update = state.get("_py2js_update") or {}
        xs, traces = update.get("style_data", {}).get("x"), update.get("style_traces")
        if comm_id in self.loss_charts and xs is not None and traces is not None and 0 in traces:
            i = traces.index(0)
            x = xs[i]                          # a float array travels as a buffer: {dtype, shape} in the JSON part
            if isinstance(x, dict):
                buf = buffers.get(("_py2js_update", "style_data", "x", i, "buffer"))
                last = float(np.frombuffer(buf, dtype=x["dtype"])[-1]) if buf is not None and x["shape"][0] else None
                self.readings.append((time.monotonic(), x["shape"][0], last))
            else:
                self.readings.append((time.monotonic(), len(x), float(x[-1]) if len(x) else None))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.kc.stop_channels()


def _execute(path: Path, cwd: Path) -> tuple[nbformat.NotebookNode, float, list[tuple[float, int]]]:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=BUDGET_S + MARGIN_S,
                            resources={"metadata": {"path": str(cwd)}})
    spies: list[LossChartSpy] = []
    client.on_notebook_start = lambda **_: spies.append(LossChartSpy(client.km.get_connection_info()))
    start = time.monotonic()
    try:
        client.execute()        # raises CellExecutionError on the first failing cell (its assert included)
    finally:
        for spy in spies:
            spy.close()
    return nb, time.monotonic() - start, spies[0].readings if spies else []


@pytest.mark.slow
@pytest.mark.timeout(BUDGET_S + MARGIN_S + 60)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nb, elapsed, readings = _execute(path, tmp_path)
    print(f"{path.name}: {elapsed:.1f} s; loss chart (points, last step) as sent: {[r[1:] for r in readings]}")
    assert elapsed < BUDGET_S + MARGIN_S, f"{path.name} took {elapsed:.0f} s (budget {BUDGET_S} s + {MARGIN_S} s)"
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert [o for o in outputs if o.get("output_type") == "error"] == []
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "JSON compliant" not in printed      # jupyter_client's warning for a message holding NaN
    if path.stem[:2] in LIVE:
        # the newest step drawn, not the point count: a series longer than the panel's n_out stays at n_out points
        moved = [(t1 - t0, x0, x1) for t0, _, x0 in readings for t1, _, x1 in readings
                 if t1 - t0 >= APART_S and x0 is not None and x1 is not None and x0 < x1]
        assert moved, f"the panel's loss chart did not move on over {APART_S} s while the cells ran: {readings}"
    assert (tmp_path / "runs").is_dir() and any((tmp_path / "runs").iterdir())   # runs land under ./runs


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_html_export_shows_the_static_fallback(tmp_path):
    """nbconvert drops widget views that have no saved state; the panel's bundle carries static HTML."""
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(
        "from workbench import Trainer\n"
        "tr = Trainer(dataset='moons', model='logreg', max_steps=60, max_epochs=None, eval_every=20, seed=0,\n"
        "             runs_root='runs', tensorboard=False)\n"
        "tr.run()\np = tr.panel()\np")]
    # saved without widget state, as JupyterLab saves by default (nbclient would store it otherwise)
    NotebookClient(nb, kernel_name="python3", timeout=120, store_widget_state=False,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    bundle = nb.cells[0].outputs[-1]["data"]
    assert "application/vnd.jupyter.widget-view+json" in bundle and "text/html" in bundle
    page, _ = HTMLExporter().from_notebook_node(nb)
    assert "plotly-graph-div" in page and "step 60/60" in page and "finished" in page


LIVE_PANEL = """\
from workbench import Trainer
tr = Trainer(dataset="digits", model="mlp", lr=1e-3, max_steps=200_000, max_epochs=None, eval_every=200,
             layer_every=25, seed=0, runs_root="runs", name="panel-in-the-browser", tensorboard=False)
p = tr.panel()
tr.start()
p
"""
# per figure (in the panel's order): its points, x range, and the boxes of its title, legend and modebar
FIGURES_JS = """() => [...document.querySelectorAll('.jp-OutputArea .js-plotly-plot')].map(gd => {
  const box = sel => { const e = gd.querySelector(sel); if (!e) return null;
                       const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const x = gd.data && gd.data[0] && gd.data[0].x ? gd.data[0].x : [];
  return {points: x.length, last: x.length ? x[x.length - 1] : null,
          range: gd._fullLayout ? gd._fullLayout.xaxis.range.slice() : null,
          plot: box('.nsewdrag'), title: box('.gtitle'), legend: box('.legend'), modebar: box('.modebar'),
          whole: box('.main-svg')};
})"""


def _overlap(a, b) -> bool:
    return bool(a and b) and a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_panel_in_jupyterlab_two_columns_zoom_kept_stop_answered(tmp_path):
    """JupyterLab in headless Chromium, a run started in a cell: the panel lays its six charts out two a row,
    no title is covered by its legend or the modebar, a zoom into the live loss chart survives three chart
    refreshes while points keep arriving, and the panel's stop button is answered in its request line.
    The screenshot is the README's (docs/notebook_panel.png)."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from notebook_watched import jupyter_lab, launch_chromium, run_all_cells, write_notebook
    from playwright.sync_api import sync_playwright

    write_notebook(tmp_path / "panel.ipynb", [LIVE_PANEL])
    with jupyter_lab(tmp_path, tmp_path / "lab.log") as url, sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": 1200, "height": 2000})
        try:
            run_all_cells(page, url.format("panel.ipynb"))
            page.wait_for_function("() => document.querySelectorAll('.jp-OutputArea .js-plotly-plot').length >= 6 && "
                                   "document.querySelector('.jp-OutputArea .js-plotly-plot').data[0].x.length > 50",
                                   timeout=120_000)
            figs = page.evaluate(FIGURES_JS)
            rows = [round(f["whole"][1]) for f in figs]
            assert rows[0] == rows[1] and rows[2] == rows[3] and rows[1] < rows[2], rows   # two charts a row
            assert figs[1]["whole"][0] > figs[0]["whole"][2] - 1
            for f in figs:
                assert not _overlap(f["title"], f["legend"]) and not _overlap(f["title"], f["modebar"]), f

            docs = ROOT / "docs"
            docs.mkdir(exist_ok=True)
            page.locator(".jp-OutputArea-output").first.screenshot(path=str(docs / "notebook_panel.png"))

            loss = page.locator(".jp-OutputArea .js-plotly-plot").first
            x0, y0, x1, y1 = figs[0]["plot"]
            page.mouse.move(x0 + 0.3 * (x1 - x0), y0 + 0.5 * (y1 - y0))
            page.mouse.down()
            page.mouse.move(x0 + 0.6 * (x1 - x0), y0 + 0.5 * (y1 - y0), steps=8)
            page.mouse.up()
            zoomed = page.evaluate(FIGURES_JS)[0]
            page.wait_for_timeout(6_500)                      # three chart refreshes (every 2 s at most) at least
            later = page.evaluate(FIGURES_JS)[0]
            assert later["last"] > zoomed["last"], "the chart stopped updating"
            assert later["range"] == pytest.approx(zoomed["range"]), (zoomed["range"], later["range"])
            assert loss.is_visible()

            page.locator('button[title="stop"]').click()
            page.get_by_text(re.compile(r"stop: applied at step \d+")).wait_for(timeout=30_000)
        except BaseException:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_watched_bench_runs_in_quick_mode(tmp_path):
    """bench/notebook_watched.py --quick (JupyterLab, headless Chromium, a real kernel) exits 0 and ends with
    its ratio lines, one per model (no timing assertion)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "notebook_watched.py"), "--quick"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert [ln.split(":")[0] for ln in lines[-2:]] == ["ratio medium", "ratio tiny"]
