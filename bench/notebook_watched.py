"""Training throughput of a run watched by the notebook panel in JupyterLab, against the same run alone.

    .venv/bin/python bench/notebook_watched.py [--quick] [--rounds R] [--medium-steps N] [--tiny-steps N]

What runs: a real JupyterLab server (``jupyter lab`` on 127.0.0.1 and a free port) and headless Chromium
(Playwright, /usr/bin/chromium) with the bench's notebook open in it; the notebook's cells run in the
server's real kernel, as a user's would. Each side trains the same CLI-like run (scikit-learn digits, batch
128, MLP 64-1024-1024-10 "medium" and 64-64-64-10 "tiny", seed 0) in its background thread while the cell
waits with ``await watch(tr)``:

* alone: no panel (JupyterLab open on the notebook, idle);
* watched: ``tr.panel()`` displayed in the cell, drawn live by the browser (status at <= 2 Hz, charts
  every 2 s at most), every widget and chart update going through the kernel's comm channel to Chromium.

Sides alternate (alone, watched, then watched, alone, ...) for ``--rounds`` rounds. A step's time is the
difference of consecutive ``history["time"]`` rows (the first 50 steps of each run left out). The table
reports the MEAN step first, then the median; the last lines are the watched/alone ratios of the mean step
(goal <= 1.10).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
GOAL = 1.10
WARM = 50            # steps of each run left out of its mean (thread start, first allocations)

SETUP = '''\
import json
import numpy as np
from IPython.display import display
from workbench import Trainer
from workbench.notebook import watch

SIZES = {sizes!r}
ROUNDS = {rounds}
results = {{name: {{"alone": [], "watched": []}} for name in SIZES}}


def config(width, steps):
    return dict(dataset="digits", model="mlp", model_options={{"width": width, "depth": 2}}, batch_size=128,
                max_steps=steps, max_epochs=None, eval_every=max(100, steps // 10), seed=0, runs_root="runs",
                tensorboard=False)
'''

MEASURE = '''\
for r in range(ROUNDS):
    for name, (width, steps) in SIZES.items():
        for side in (("alone", "watched") if r % 2 == 0 else ("watched", "alone")):
            tr = Trainer(config(width, steps))
            panel = None
            if side == "watched":
                panel = tr.panel()
                display(panel)
            tr.start()
            await watch(tr)
            t = tr.history["time"].to_numpy()[{warm}:]
            dt = np.diff(t)
            results[name][side].append([float(dt.mean()), float(np.median(dt)), int(len(dt))])
            if panel is not None:
                panel.close()
            print(name, side, f"{{dt.mean() * 1e3:.3f}} ms/step")
with open("results.json.tmp", "w") as f:
    json.dump(results, f)
import os
os.replace("results.json.tmp", "results.json")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_notebook(path: Path, cells: list[str]) -> None:
    """A notebook file holding these code cells, for the python3 kernel."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, str(path))


@contextlib.contextmanager
def jupyter_lab(root_dir: Path, log_path: Path) -> Iterator[str]:
    """``jupyter lab`` serving ``root_dir`` on 127.0.0.1 and a free port; yields the base URL with its token.
    Stopped by its process group (SIGTERM, then SIGKILL)."""
    port, token = free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.port={port}", "--ServerApp.ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}", "--ServerApp.port_retries=0",
           "--ServerApp.allow_root=True", "--LabApp.extension_manager=readonly", "--LabApp.news_url=",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    env = {**os.environ, "JUPYTER_PLATFORM_DIRS": "1", "PYTHONPATH": str(ROOT)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root_dir, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"jupyter lab did not start; its log:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
        yield f"{url}/lab/tree/{{}}?token={token}"
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)


def run_all_cells(page, url: str) -> None:
    """Open a notebook in JupyterLab, accept the kernel it asks for, wait until that kernel is idle, and run
    all its cells from the Run menu."""
    page.goto(url)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    select = page.locator(".jp-Dialog button.jp-mod-accept")
    end = time.monotonic() + 90
    while not page.get_by_text("| Idle").count():
        if select.count():
            select.first.click()       # "Select Kernel": the notebook's own python3
        if time.monotonic() > end:
            raise RuntimeError("the notebook's kernel did not become idle in 90 s")
        page.wait_for_timeout(250)
    no_news = page.get_by_role("button", name="No", exact=True)
    if no_news.count():
        no_news.first.click()          # JupyterLab's "get notified about Jupyter news?" toast
    if page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").count():
        page.keyboard.press("Control+b")   # hide the file browser: the notebook gets the width
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()


def launch_chromium(pw):
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round of short runs (CI smoke run)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--medium-steps", type=int, default=1500)
    ap.add_argument("--tiny-steps", type=int, default=5000)
    ap.add_argument("--timeout", type=float, default=None, help="seconds to wait for the notebook (default: by steps)")
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds
    sizes = {"medium": (1024, 200 if args.quick else args.medium_steps),
             "tiny": (64, 300 if args.quick else args.tiny_steps)}
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="wb-bench-nb-"))
    write_notebook(work / "watched.ipynb", [SETUP.format(sizes=sizes, rounds=rounds), MEASURE.format(warm=WARM)])
    # generous: a loaded machine runs the medium MLP at 70+ ms a step (8 ms when quiet)
    budget = args.timeout or 300 + rounds * sum(steps * (0.15 if name == "medium" else 0.02) * 2
                                                for name, (_, steps) in sizes.items())
    with jupyter_lab(work, work / "lab.log") as url, sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            run_all_cells(page, url.format("watched.ipynb"))
            end = time.monotonic() + budget
            while not (work / "results.json").exists():
                errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
                if time.monotonic() > end or page.locator(".jp-RenderedText[data-mime-type="
                                                          "'application/vnd.jupyter.error']").count():
                    page.screenshot(path=str(work / "failure.png"), full_page=True)
                    raise RuntimeError(f"the bench notebook did not finish (see {work}/failure.png); "
                                       f"{errors.count()} stderr outputs")
                time.sleep(1.0)
        finally:
            browser.close()
    results = json.loads((work / "results.json").read_text())
    print(f"notebook panel watched in JupyterLab (headless Chromium, real kernel) vs the same run alone; "
          f"digits, batch 128, {rounds} round(s), sides interleaved; first {WARM} steps of each run left out")
    print(f"{'model':<8} {'side':<8} {'mean ms':>8} {'median ms':>10} {'runs':>5} {'steps/run':>10}")
    ratios = {}
    for name, sides in results.items():
        means = {}
        for side in ("alone", "watched"):
            runs = sides[side]
            means[side] = sum(r[0] for r in runs) / len(runs)
            median = sorted(r[1] for r in runs)[len(runs) // 2]
            print(f"{name:<8} {side:<8} {means[side] * 1e3:8.3f} {median * 1e3:10.3f} {len(runs):5d} {runs[0][2]:10d}")
        ratios[name] = means["watched"] / means["alone"]
    for name, r in ratios.items():
        print(f"ratio {name}: watched / alone mean step {r:.2f} (goal <= {GOAL:.2f}; "
              f"{'met' if r <= GOAL else 'NOT met'})")


if __name__ == "__main__":
    main()
