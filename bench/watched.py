"""Does watching a run in the dashboard slow it down? Training throughput of a CLI run with the dashboard open
on it in headless Chromium (the Live tab on that run) against the same run alone, interleaved; and the
dashboard's own CPU per refresh, the Streamlit server and the browser apart.

Each round trains the same run twice, once alone and once watched (the order alternates between rounds): a
``workbench train`` process on the 8x8 digits with an MLP (medium: 64-1024-1024-10; tiny: 64-64-64-10),
batch 128, stopped through its inbox once ``--steps`` steps were timed. Watched, a fresh ``streamlit run
app/dashboard.py`` serves the run's folder and a Chromium this script starts (its own process group, driven
over CDP by Playwright) shows the Live tab on the run; the timed steps start once the live loss chart has
drawn and the page has had SETTLE_S to finish loading. A step's time is the difference between consecutive
rows of the run's step table (wall time after each optimizer step), so the figure is the run's own.

    .venv/bin/python bench/watched.py             # 3 rounds, medium and tiny, 1,500 / 10,000 timed steps
    .venv/bin/python bench/watched.py --quick     # 1 round, tiny, 300 steps: shows the bench works

Reported per model: mean (and median) ms/step alone and watched, their ratio (target <= 1.10); the server's
and the browser's CPU seconds per second of watching and per live refresh (one a second). Then the batch-size
cliff: samples/s of a run changed live from batch 64 to 256 against a fresh run at 256 (target: the fresh one
at most 1.2x faster). The last line is the ratio line. Chromium: /usr/bin/chromium (--headless --no-sandbox
--disable-gpu).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app import settings  # noqa: E402
from workbench.runview import RunView  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
WORKBENCH = Path(sys.executable).with_name("workbench")
MODELS = {"medium": 1024, "tiny": 64}
LOSS_POINTS_JS = "() => { const gd = document.getElementById('chart-loss'); " \
                 "return gd && gd._fullData && gd._fullData.length ? gd._fullData[0].x.length : 0; }"
TICK = os.sysconf("SC_CLK_TCK")
SETTLE_S = 5.0   # after the live loss chart first draws, before the timed steps (the page finishes loading)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid``."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:             # fields after the command: state, ppid, pgrp, ...
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def start_training(root: Path, width: int) -> tuple[subprocess.Popen, Path]:
    sets = ["dataset=digits", "model=mlp", f"model_options.width={width}", "model_options.depth=2",
            "batch_size=128", "max_steps=1000000", "max_epochs=null", "eval_every=50", "seed=0"]
    cmd = [str(WORKBENCH), "train", "--runs", str(root), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: any(root.glob("*/run.db")), 60, "the run directory")
    return proc, next(root.glob("*/run.db")).parent


def step_count(view: RunView) -> int:
    view.refresh()
    return int(view.snapshot()["step"])


def step_times(run_dir: Path, t0: float, n: int) -> np.ndarray:
    """Seconds per step of the first ``n`` steps logged after wall time ``t0``."""
    view = RunView(run_dir)
    try:
        t = view.history["time"].to_numpy()
    finally:
        view.close()
    t = t[t >= t0][: n + 1]
    return np.diff(t)


def one_side(root: Path, width: int, steps: int, watched: bool, pw) -> dict:
    proc, run_dir = start_training(root, width)
    server = browser = chromium = None
    view = RunView(run_dir)
    try:
        wait_until(lambda: step_count(view) >= 20, 120, "the first steps")
        cpu = {}
        if watched:
            port, cdp = free_port(), free_port()
            server = subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "dashboard.py"), "--server.address",
                 "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
                 "--browser.gatherUsageStats", "false", "--", "--runs", str(root)],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            url = f"http://127.0.0.1:{port}"

            def healthy() -> bool:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                        return r.read().strip() == b"ok"
                except OSError:
                    return False

            wait_until(healthy, 90, "the dashboard server")
            chromium = subprocess.Popen(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={cdp}",
                 f"--user-data-dir={root / 'chromium'}", "--no-first-run", "--disable-background-networking",
                 "--window-size=1400,1000", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            wait_until(lambda: _cdp_up(cdp), 60, "chromium's debugging port")
            browser = pw.chromium.connect_over_cdp(f"http://127.0.0.1:{cdp}")
            page = browser.contexts[0].pages[0] if browser.contexts and browser.contexts[0].pages \
                else browser.new_page()
            page.set_viewport_size({"width": 1400, "height": 1000})
            page.goto(url)
            frame = page.wait_for_selector("iframe[title*=chart_grid]", timeout=90_000).content_frame()
            frame.wait_for_function(f"({LOSS_POINTS_JS})() > 0", timeout=90_000)
            time.sleep(SETTLE_S)   # a user watches for minutes: the page's first load is not what they pay
            cpu = {"server": group_cpu_s(server.pid), "browser": group_cpu_s(chromium.pid)}
        t0, w0 = time.time(), time.monotonic()
        start = step_count(view)
        wait_until(lambda: step_count(view) >= start + steps + 5, 1800, "the timed steps")
        seconds = time.monotonic() - w0
        if watched:
            cpu = {k: (group_cpu_s(p.pid) - cpu[k]) / seconds for k, p in (("server", server), ("browser", chromium))}
        view.ask("stop", {}, source="api")
        proc.wait(120)
        return {"times": step_times(run_dir, t0, steps), "cpu": cpu, "seconds": seconds}
    finally:
        view.close()
        if browser is not None:
            browser.close()
        for p in (chromium, server, proc):
            if p is not None and p.poll() is None:
                stop_group(p)


def _cdp_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=2):
            return True
    except OSError:
        return False


def batch_change(steps: int, root: Path, rounds: int = 3) -> tuple[float, float, int]:
    """Samples/s of a run changed live from batch 64 to 256 (the demo's MLP) after the change, and of a fresh
    run at 256, over ``steps`` steps each (50 steps after the start or the change are left out), plus the
    intra-op thread count the trainers chose at 256; medians over ``rounds`` interleaved pairs."""
    from workbench import Trainer

    def trainer(bs: int) -> Trainer:
        return Trainer(dataset="digits", model="mlp", model_options={"width": 128, "depth": 2}, batch_size=bs,
                       max_steps=None, max_epochs=None, schedule="constant", eval_every=0, seed=0, tensorboard=False,
                       runs_root=str(root))

    def rate(tr: Trainer, first: int) -> float:
        h = tr.history
        rows = h[(h["step"] >= first) & (h["step"] <= first + steps)]
        return float(rows["batch_size"].iloc[1:].sum() / (rows["time"].iloc[-1] - rows["time"].iloc[0]))

    def run(tr: Trainer, change: bool) -> float:
        tr.start()
        wait_until(lambda: tr.step_count >= 100, 300, "the first steps")
        start = tr.step_count
        if change:
            tr.set(batch_size=256).wait(30)
            start = tr.step_count
        wait_until(lambda: tr.step_count >= start + 50 + steps + 1, 1800, "the timed steps")
        tr.stop().wait(30)
        tr.join(60)
        return rate(tr, start + 50)

    lives, freshes = [], []
    for r in range(rounds):   # interleaved, the order alternating: the machine's load drifts
        for change in ((True, False) if r % 2 == 0 else (False, True)):
            tr = trainer(64 if change else 256)
            (lives if change else freshes).append(run(tr, change))
    ev = tr.events
    threads = int(ev.loc[ev["kind"] == "cpu_threads", "data"].iloc[-1]["intra_op_threads"])
    return statistics.median(lives), statistics.median(freshes), threads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round, tiny model, 300 steps")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args(argv)
    rounds, models = (1, ["tiny"]) if args.quick else (args.rounds, args.models)
    steps = {"medium": 1500, "tiny": 10_000}   # about 30 s and 12 s: several refreshes each
    if args.quick:
        steps = {"medium": 300, "tiny": 300}
    from playwright.sync_api import sync_playwright

    base = Path(tempfile.mkdtemp(prefix="wb-watched-"))
    try:
        return report(base, rounds, models, steps, args.quick, sync_playwright)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def report(base: Path, rounds: int, models: list[str], steps: dict[str, int], quick: bool, sync_playwright) -> int:
    results: dict[str, dict[str, list]] = {m: {"alone": [], "watched": [], "cpu": []} for m in models}
    with sync_playwright() as pw:
        for r in range(rounds):
            for m in models:
                order = (False, True) if r % 2 == 0 else (True, False)
                for watched in order:
                    side = "watched" if watched else "alone"
                    res = one_side(base / f"{m}-{r}-{side}", MODELS[m], steps[m], watched, pw)
                    results[m][side].append(res["times"])
                    if watched:
                        results[m]["cpu"].append(res["cpu"])
                    print(f"round {r} {m:6s} {side:7s}: mean {np.mean(res['times']) * 1e3:7.3f} ms/step over "
                          f"{len(res['times'])} steps" + (f"; CPU server {res['cpu']['server']:.2f}, browser "
                                                          f"{res['cpu']['browser']:.2f} cores" if watched else ""),
                          flush=True)
    ratios = []
    print(f"\nrefresh every {settings.LIVE_REFRESH_S:g} s; Chromium {CHROMIUM}; {os.cpu_count()} CPUs")
    print(f"{'model':8s} {'alone ms':>9s} {'watched ms':>11s} {'ratio':>6s} {'median ratio':>13s} "
          f"{'server CPU/refresh':>19s} {'browser CPU/refresh':>20s}")
    for m in models:
        alone = np.concatenate(results[m]["alone"])
        seen = np.concatenate(results[m]["watched"])
        ratio = float(np.mean(seen) / np.mean(alone))
        ratios.append(f"{m} {ratio:.2f}")
        per = settings.LIVE_REFRESH_S
        srv = statistics.mean(c["server"] for c in results[m]["cpu"]) * per
        brw = statistics.mean(c["browser"] for c in results[m]["cpu"]) * per
        print(f"{m:8s} {np.mean(alone) * 1e3:9.3f} {np.mean(seen) * 1e3:11.3f} {ratio:6.2f} "
              f"{np.median(seen) / np.median(alone):13.2f} {srv * 1e3:16.0f} ms {brw * 1e3:17.0f} ms")
    live, fresh, threads = batch_change(300 if quick else 3000, base / "batch", 2 if quick else 3)
    print(f"live batch change 64 -> 256: {live:,.0f} samples/s after it, a fresh run at 256: {fresh:,.0f} "
          f"({threads} intra-op thread(s)); fresh/live {fresh / live:.2f} (target <= 1.2)")
    print("ratio watched/alone mean step (target <= 1.10): " + ", ".join(ratios)
          + f"; batch change fresh/live {fresh / live:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
