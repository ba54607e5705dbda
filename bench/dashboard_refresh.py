"""How long one refresh of the dashboard's live view takes on a very long run.

Builds a run directory whose run.db holds N step rows (default 1,000,000) written through
``RunDB.insert_steps`` — a SYNTHETIC but realistic run: a noisy exponentially decaying loss with rare
spikes, a warmup-cosine lr, grad norms, evals every 50 steps, per-layer stats of 6 tensors every 25 steps,
control/checkpoint/alert events — then times the function the live fragment runs on each refresh,
``app.live.live_payload`` (the run handle's refresh + ``chart_data`` + every figure of
``workbench.figures``), as the dashboard watches a run trained by another process.

    .venv/bin/python bench/dashboard_refresh.py            # 10^6 rows (about a minute to build)
    .venv/bin/python bench/dashboard_refresh.py --quick    # 10^4 rows, for CI

Reported: the first refresh (it loads the whole history) separately; then p50/p99 of repeated refreshes,
idle (nothing new: the figures are reused) and live (50 new steps, an eval and layer rows arrive before
each refresh, so all six figures are rebuilt; writing the rows is not timed), after ``gc.freeze()`` of the
imported modules as the dashboard does; the JSON size/time of the figures (what the chart grid, ``app.charts``,
sends); the most points in any trace. The budget is 300 ms for a refresh (p50 of the live case).
"""
from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app import charts, live  # noqa: E402
from workbench.handle import RemoteRun  # noqa: E402
from workbench import figures  # noqa: E402
from workbench.config import TrainConfig  # noqa: E402
from workbench.rundir import RunDB  # noqa: E402

BUDGET_MS = 300.0
LAYERS = ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias")
EVAL_EVERY, LAYER_EVERY, CKPT_EVERY = 50, 25, 5000


def synthetic_steps(start: int, stop: int, total: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Step rows [start, stop): a realistic-looking loss curve (decay + noise + rare spikes), lr, grad norm."""
    s = np.arange(start, stop, dtype=np.int64)
    frac = s / total
    base = 0.04 + 2.26 * np.exp(-s / (0.05 * total)) + 0.15 * np.exp(-s / (0.5 * total))
    loss = base * rng.lognormal(0.0, 0.25, len(s))
    spikes = rng.random(len(s)) < 2e-5
    loss[spikes] *= rng.uniform(3, 8, spikes.sum())
    warm = max(1, int(0.02 * total))
    lr = 1e-3 * np.where(s < warm, (s + 1) / warm, 0.5 * (1 + np.cos(math.pi * np.clip(frac, 0, 1))))
    grad = (0.3 + 1.5 * np.exp(-s / (0.1 * total))) * rng.lognormal(0.0, 0.3, len(s))
    return {"step": s, "epoch": s // 23, "train_loss": loss, "lr": lr, "batch_size": np.full(len(s), 64),
            "grad_norm": grad, "samples_per_s": rng.normal(15000, 800, len(s)), "time": 1.7e9 + s * 0.004}


def rows_of(cols: dict[str, np.ndarray]) -> list[dict]:
    keys = list(cols)
    return [dict(zip(keys, vals)) for vals in zip(*(cols[k].tolist() for k in keys))]


def write_steps(db: RunDB, start: int, stop: int, total: int, rng: np.random.Generator) -> None:
    """Steps, evals, layer rows and events for steps [start, stop) (1-based step numbers)."""
    for lo in range(start, stop, 100_000):
        hi = min(stop, lo + 100_000)
        cols = synthetic_steps(lo, hi, total, rng)
        db.insert_steps([{**r, "precision": "fp32"} for r in rows_of(cols)])
        ev = np.arange(((lo + EVAL_EVERY - 1) // EVAL_EVERY) * EVAL_EVERY, hi, EVAL_EVERY)
        ev = ev[ev > 0]
        if len(ev):
            vl = 0.09 + 2.2 * np.exp(-ev / (0.05 * total)) + 0.02 * (ev / total) + rng.normal(0, 0.004, len(ev))
            db.insert_evals([{"step": int(e), "val_loss": float(v), "val_acc": float(min(0.99, 1.0 - v / 2.5)),
                              "time": 1.7e9 + e * 0.004} for e, v in zip(ev, vl)])
        ls = np.arange(((lo + LAYER_EVERY - 1) // LAYER_EVERY) * LAYER_EVERY, hi, LAYER_EVERY)
        ls = ls[ls > 0]
        rows = []
        for st in ls.tolist():
            decay = math.exp(-st / (0.1 * total))
            for i, name in enumerate(LAYERS):
                g = (0.05 + decay) * (0.5 + i / 6) * float(rng.lognormal(0, 0.2))
                rows.append({"step": st, "layer": name, "grad_norm": g, "param_norm": 5.0 + i,
                             "update_ratio": 1e-3 * (0.2 + 3 * decay) * float(rng.lognormal(0, 0.2))})
        if rows:
            db.insert_layers(rows)
        for st in range(((lo + CKPT_EVERY - 1) // CKPT_EVERY) * CKPT_EVERY, hi, CKPT_EVERY):
            if st > 0:
                db.log_event(step=st, kind="checkpoint", source="trainer",
                             data={"path": f"step-{st:08d}.pt", "reason": "periodic", "tag": None})


def build_run(root: Path, n: int, seed: int = 0) -> Path:
    """A run directory with ``n`` synthetic step rows (and evals, layer stats, events) in its run.db."""
    rng = np.random.default_rng(seed)
    run = root / f"synthetic-{n}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "tb").mkdir()
    TrainConfig(name=run.name, max_steps=n, max_epochs=None, seed=seed).to_yaml(run / "config.yaml",
                                                                                extra={"synthetic": True})
    db = RunDB(run / "run.db")
    db.set_meta(status="running", started=time.time(), total_steps=n + 10_000, n_train=1437, pid=0,
                controls={"lr": 1e-3, "batch_size": 64, "precision": "fp32", "grad_clip": None, "accumulate": 1,
                          "weight_decay": 0.0}, layer_names=list(LAYERS), dataset="digits", model="mlp",
                synthetic=True)
    write_steps(db, 1, n + 1, n, rng)
    for i, st in enumerate(np.linspace(n * 0.1, n * 0.9, 8).astype(int).tolist()):
        db.log_event(step=st, kind="control", source="dashboard",
                     data={"field": "lr", "old": 1e-3 / (i + 1), "new": 1e-3 / (i + 2)})
    db.log_event(step=int(n * 0.3), kind="alert", source="trainer",
                 data={"id": 1, "kind": "loss_spike", "severity": "warning", "step": int(n * 0.3),
                       "message": "synthetic", "evidence": "synthetic", "actions": [], "confidence": 0.5})
    db.close()
    return run


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="step rows in the synthetic run (default 10^6)")
    ap.add_argument("--quick", action="store_true", help="10^4 rows and fewer repeats (CI)")
    ap.add_argument("--repeats", type=int, default=None, help="timed refreshes per case (default 50; quick: 15)")
    ap.add_argument("--dir", default=None, help="where to build the run and keep it (default: a temp folder, "
                                                 "removed at the end)")
    args = ap.parse_args(argv)
    n = 10_000 if args.quick else args.rows
    repeats = args.repeats or (15 if args.quick else 50)
    root = Path(args.dir or tempfile.mkdtemp(prefix="wb-dash-bench-"))

    t0 = time.perf_counter()
    run = build_run(root, n)
    build_s = time.perf_counter() - t0
    print(f"SYNTHETIC run: {n:,} step rows written through RunDB.insert_steps (+ evals every {EVAL_EVERY}, "
          f"{len(LAYERS)} layer rows every {LAYER_EVERY} steps, events) in {build_s:.1f} s -> {run}")

    live.freeze_long_lived()   # as the dashboard does once per process, after its imports
    w = RemoteRun(run)
    t0 = time.perf_counter()
    p = live.live_payload(w)
    first_ms = (time.perf_counter() - t0) * 1e3
    max_points = max(figures.trace_points(f) for f in p.figures.values())

    idle = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        p = live.live_payload(w)
        idle.append((time.perf_counter() - t0) * 1e3)
        max_points = max(max_points, max(figures.trace_points(f) for f in p.figures.values()))

    writer = RunDB(run / "run.db")
    rng = np.random.default_rng(1)
    step = n + 1
    live_ms, json_ms, json_kb = [], [], []
    for _ in range(repeats):
        write_steps(writer, step, step + 50, n, rng)   # what a trainer logs between two refreshes (not timed)
        step += 50
        t0 = time.perf_counter()
        p = live.live_payload(w)
        live_ms.append((time.perf_counter() - t0) * 1e3)
        t1 = time.perf_counter()
        size = sum(len(charts.figure_json(f)) for f in p.figures.values())
        json_ms.append((time.perf_counter() - t1) * 1e3)
        json_kb.append(size / 1024)
        max_points = max(max_points, max(figures.trace_points(f) for f in p.figures.values()))
    writer.close()
    w.close()
    assert p.snapshot["step"] == step - 1, (p.snapshot["step"], step - 1)

    print()
    print(f"| case (synthetic run, {n:,} steps) | n | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    print(f"| first refresh (loads the whole history) | 1 | {first_ms:.0f} | - | - |")
    print(f"| refresh, nothing new (figures reused) | {repeats} | {pct(idle, 50):.1f} | {pct(idle, 99):.1f} | {max(idle):.1f} |")
    print(f"| refresh, 50 new steps + eval + layer rows each (all figures rebuilt) | {repeats} | {pct(live_ms, 50):.1f} | {pct(live_ms, 99):.1f} | "
          f"{max(live_ms):.1f} |")
    print(f"| + figures to JSON (sent to the chart grid, {statistics.median(json_kb):.0f} KiB) | {repeats} | "
          f"{pct(json_ms, 50):.1f} | {pct(json_ms, 99):.1f} | {max(json_ms):.1f} |")
    print(f"\nmost points in any trace: {max_points} (6 figures)")
    ok = pct(live_ms, 50) < BUDGET_MS
    print(f"SUMMARY dashboard refresh, synthetic {n:,}-step run: first {first_ms / 1e3:.2f} s, then p50 "
          f"{pct(live_ms, 50):.0f} ms / p99 {pct(live_ms, 99):.0f} ms per refresh (idle p50 {pct(idle, 50):.0f} ms), "
          f"<= {max_points} points per trace: {'PASS' if ok else 'FAIL'} (budget {BUDGET_MS:.0f} ms)")
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok or args.quick else 1   # --quick (CI, shared machines): report, never fail on timing


if __name__ == "__main__":
    raise SystemExit(main())
