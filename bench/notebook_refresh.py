"""Notebook panel refresh cost over a long real run: time per chart update, and points per trace.

    .venv/bin/python bench/notebook_refresh.py [--quick] [--steps N] [--interval S] [--n-out K]

A real Trainer (logistic regression on ``moons``, batch 8, one intra-op thread: a tiny model gains nothing
from more, and the second core is left to the panel) trains N steps (default 100,000) in its background
thread. A ``workbench.notebook.Panel`` watches it with its own thread poller at the defaults (status at most 2 Hz,
charts at most every 2 s), as in a notebook; every refresh that redraws the charts is timed, wall clock and the
poller thread's own CPU time (wall minus CPU is time spent waiting for the GIL or a core) (status, controls, ``chart_data`` from the
metric store's downsampled series, the six FigureWidgets' trace updates in ``batch_update``, alerts,
checkpoint table). Live changes (lr, batch size) and periodic checkpoints add markers along the way.
After the run, 20 full redraws (``Panel.redraw()``: caches dropped, every trace rewritten) on the finished
100k-step store give the cost of the heaviest refresh without a concurrent trainer.

The table reports p50/p99/max ms of the chart refreshes per quarter of the run (and of the cheap
status-only ones) and the most points in any one trace; the last line is the ratio of the worst chart
refresh p99 to the 50 ms budget (< 1 means within budget).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import Trainer, env_line, runs_dir, table
from workbench.notebook import Panel

BUDGET_MS = 50.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 steps (CI smoke run)")
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--interval", type=float, default=0.5, help="poller interval in seconds (0.5 = 2 Hz)")
    ap.add_argument("--chart-interval", type=float, default=2.0, help="seconds between chart redraws (panel default)")
    ap.add_argument("--n-out", type=int, default=1000, help="points per downsampled series (panel default)")
    args = ap.parse_args()
    steps = 2_000 if args.quick else args.steps
    torch.set_num_threads(1)

    tr = Trainer(dataset="moons", model="logreg", batch_size=8, lr=0.05, optimizer="sgd", max_steps=steps,
                 max_epochs=None, eval_every=max(50, steps // 200), checkpoint_every=max(100, steps // 10),
                 keep_checkpoints=3, tensorboard=False, seed=0, runs_root=runs_dir())
    panel = Panel(tr, poll="thread", interval=args.interval, chart_interval=args.chart_interval, n_out=args.n_out)
    timed: list[tuple[int, float, int, float]] = []   # (step seen, wall s, points, CPU s) per chart redraw
    other: list[float] = []                            # wall s of refreshes that redrew only status/controls
    refresh = panel.refresh

    def timed_refresh(force: bool = False, throttle: bool = False) -> bool:
        t0, c0, n0 = time.perf_counter(), time.thread_time(), panel.chart_redraws
        changed = refresh(force, throttle)
        if panel.chart_redraws > n0:
            timed.append((panel._key[1], time.perf_counter() - t0, panel.points(), time.thread_time() - c0))
        elif changed:
            other.append(time.perf_counter() - t0)
        return changed

    panel.refresh = timed_refresh   # the poller's tick calls self.refresh(): every poll is measured
    changes = {steps // 4: {"lr": 0.02}, steps // 2: {"batch_size": 16}, 3 * steps // 4: {"lr": 0.01}}
    t_start = time.perf_counter()
    tr.start()
    while tr.is_alive:
        due = [s for s in changes if tr.step_count >= s]
        for s in due:
            tr.set(**changes.pop(s))
        time.sleep(0.05)
    status = tr.join()
    train_s = time.perf_counter() - t_start
    time.sleep(3 * args.interval)   # the poller draws the end of the run
    panel.poller.stop()
    final, final_cpu = [], []
    del panel.refresh               # the poller is stopped: time the panel's own method from here on
    for _ in range(20):
        t0, c0 = time.perf_counter(), time.thread_time()
        panel.redraw()              # drop every cache and rewrite all six charts
        final.append(time.perf_counter() - t0)
        final_cpu.append(time.thread_time() - c0)
    points = panel.points()
    panel.close()

    rows = []
    quarters = [(q * steps // 4, (q + 1) * steps // 4) for q in range(4)]
    for lo, hi in quarters:
        sel = [r for r in timed if lo < r[0] <= hi or (lo == 0 and r[0] == 0)]
        if sel:
            ms, cpu = np.array([r[1] for r in sel]) * 1e3, np.array([r[3] for r in sel]) * 1e3
            rows.append([f"live, steps {lo:,}-{hi:,}", len(ms), float(np.percentile(ms, 50)),
                         float(np.percentile(ms, 99)), float(ms.max()), float(np.percentile(cpu, 50)),
                         float(np.percentile(cpu, 99)), max(r[2] for r in sel)])
    f, fc = np.array(final) * 1e3, np.array(final_cpu) * 1e3
    if other:
        o = np.array(other) * 1e3
        rows.append(["live, status-only refreshes", len(o), float(np.percentile(o, 50)), float(np.percentile(o, 99)),
                     float(o.max()), float("nan"), float("nan"), 0])
    rows.append([f"full redraw, {tr.step_count:,} steps", len(f), float(np.percentile(f, 50)),
                 float(np.percentile(f, 99)), float(f.max()), float(np.percentile(fc, 50)),
                 float(np.percentile(fc, 99)), points])
    print(f"notebook panel refresh: {tr.step_count:,} steps of logreg/moons (status {status}) in {train_s:.1f} s "
          f"({tr.step_count / train_s:,.0f} steps/s) while the panel polled every {args.interval} s; "
          f"n_out {args.n_out}")
    print(env_line())
    print(table(rows, ["refreshes", "n", "p50 ms", "p99 ms", "max ms", "CPU p50 ms", "CPU p99 ms",
                       "max points/trace"]))
    worst_p99 = max(r[3] for r in rows if not r[0].startswith("live, status"))
    live = [r[1] for r in timed]
    print(f"{len(live)} chart redraws in {train_s:.1f} s = {len(live) / train_s:.1f} Hz (bound {1 / args.chart_interval:.0f} Hz), "
          f"{len(other)} status-only refreshes (status bound {1 / args.interval:.0f} Hz); "
          f"most points in one trace {points} (bound: n_out {args.n_out}, heatmap <= 200 columns)")
    print(f"ratio worst p99 / {BUDGET_MS:.0f} ms budget: {worst_p99 / BUDGET_MS:.2f} "
          f"(p99 {worst_p99:.1f} ms; {'within' if worst_p99 < BUDGET_MS else 'OVER'} budget)")


if __name__ == "__main__":
    main()
