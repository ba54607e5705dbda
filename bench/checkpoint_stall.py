"""Checkpoint stall: the longest step while a checkpoint is being saved, over the median step.

    .venv/bin/python bench/checkpoint_stall.py [--quick] [--steps N] [--every K] [--models tiny,medium]

A Trainer (default instrumentation, digits, Adam) runs N steps with ``checkpoint_every=K`` (nothing
else saves: no evals, so no best-k saves). A save has two parts: the state is copied to host memory
on the trainer thread between two steps, then written (torch.save, fsync, rename, retention) by the
writer thread while training goes on. A save's window runs from its event-log time (the copy starts)
to the file's mtime (the last byte written); every step whose interval overlaps a window counts as
"during a save". The stall ratio is the longest such step over the median of all steps. The periodic
saves are interleaved with ordinary steps by construction (A B A B ...); the first 2K steps are warm-up.
Because a maximum also catches stalls that have nothing to do with saving (another process, a full
garbage collection), the table also gives the worst step outside any save and, per save, its worst step
over the median step, as a median over saves (the typical stall a save causes).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from _common import Trainer, env_line, notebook_warmup, runs_dir, table

MODELS = {"tiny": dict(width=64, bs=64), "medium": dict(width=1024, bs=128)}


def measure(name: str, steps: int, every: int) -> dict:
    spec = MODELS[name]
    tr = Trainer(dataset="digits", model="mlp", model_options={"depth": 2, "width": spec["width"]}, val_fraction=0.0,
                 lr=1e-3, batch_size=spec["bs"], max_steps=steps, max_epochs=None, seed=0, eval_every=0,
                 runs_root=runs_dir(), device="cpu", checkpoint_every=every, keep_checkpoints=100_000)
    tr.run()
    h = tr.history
    step, t = h["step"].to_numpy(), h["time"].to_numpy()
    dt = np.diff(t)                      # dt[i] is the time of step step[i+1]
    lo, hi = t[:-1], t[1:]
    ev = tr.events
    saves = ev[(ev["kind"] == "checkpoint") & ev["data"].map(lambda d: d.get("reason") == "periodic")]
    windows, copy_steps = [], np.zeros(len(dt), dtype=bool)
    for _, row in saves.iterrows():
        if row["step"] <= 2 * every:
            continue
        path = row["data"]["path"]
        end = os.stat(path).st_mtime if os.path.exists(path) else row["time"]
        windows.append((row["time"], end))
        copy_steps |= step[1:] == row["step"] + 1  # the copy runs after step s, inside step s+1's interval
    during = np.zeros(len(dt), dtype=bool)
    per_save = []  # the longest step of each save's window
    for start, end in windows:
        inside = (hi >= start) & (lo <= end)
        during |= inside
        if inside.any():
            per_save.append(float(dt[inside].max()))
    warm = step[1:] > 2 * every
    med = float(np.median(dt[warm]))
    worst = float(dt[during & warm].max()) if (during & warm).any() else float("nan")
    worst_copy = float(dt[copy_steps & warm].max()) if (copy_steps & warm).any() else float("nan")
    later = during & ~copy_steps & warm
    worst_write = float(dt[later].max()) if later.any() else float("nan")
    outside = ~during & warm
    worst_outside = float(dt[outside].max()) if outside.any() else float("nan")
    write_ms = statistics.median(e - s for s, e in windows) * 1e3 if windows else float("nan")
    size = os.path.getsize(saves.iloc[-1]["data"]["path"]) if len(saves) else 0
    typical = statistics.median(per_save) / med if per_save else float("nan")
    copy_median = float(np.median(dt[copy_steps & warm])) * 1e3 if (copy_steps & warm).any() else float("nan")
    return {"median_ms": med * 1e3, "worst_ms": worst * 1e3, "ratio": worst / med, "saves": len(windows),
            "copy_ms": worst_copy * 1e3, "typical_ratio": typical, "copy_median_ms": copy_median,
            "write_worst_ms": worst_write * 1e3, "outside_ms": worst_outside * 1e3,
            "steps_during": int((during & warm).sum()), "write_ms": write_ms, "size_mb": size / 1e6,
            "p99_ms": float(np.percentile(dt[warm], 99)) * 1e3}


def copy_part(name: str, reps: int) -> dict:
    """The synchronous part of a save, alone: the NaN/inf check and the host copy of the full state,
    as the trainer did it before (``ck.has_nonfinite`` + ``ck.to_cpu``: fresh tensors each save) and
    as it does now (fused norms, then a copy into the previous save's buffers). Interleaved, medians."""
    from workbench import checkpoint as ck
    from workbench.trainer import _host_copy, _nonfinite

    spec = MODELS[name]
    tr = Trainer(dataset="digits", model="mlp", model_options={"depth": 2, "width": spec["width"]}, val_fraction=0.0,
                 lr=1e-3, batch_size=spec["bs"], max_steps=5, max_epochs=None, seed=0, eval_every=0,
                 runs_root=runs_dir(), device="cpu", tensorboard=False)
    tr.run()  # Adam state exists now
    state = tr.state_dict()
    buffers: dict = {}
    old, new = [], []
    for r in range(reps + 1):
        t0 = time.perf_counter()
        ck.has_nonfinite(state["state"]["model"])
        ck.to_cpu(state)
        t1 = time.perf_counter()
        _nonfinite(state["state"]["model"])
        _host_copy(state, buffers)
        t2 = time.perf_counter()
        if r:
            old.append(t1 - t0)
            new.append(t2 - t1)
    return {"old_ms": statistics.median(old) * 1e3, "new_ms": statistics.median(new) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--every", type=int, default=None)
    ap.add_argument("--models", default="tiny,medium")
    a = ap.parse_args()
    print(f"# bench/checkpoint_stall.py  {env_line()}")
    notebook_warmup()
    rows, finals = [], []
    for name in a.models.split(","):
        every = a.every or (10 if a.quick else 50)
        steps = a.steps or (every * 5 if a.quick else (3000 if name == "tiny" else 800))
        r = measure(name, steps, every)
        rows.append([name, r["median_ms"], r["p99_ms"], r["worst_ms"], r["ratio"], r["typical_ratio"],
                     r["copy_median_ms"], r["copy_ms"], r["write_worst_ms"], r["outside_ms"], r["saves"], r["steps_during"], r["write_ms"],
                     r["size_mb"]])
        finals.append(f"{name} {r['ratio']:.2f} (median save {r['typical_ratio']:.2f})")
    print(f"\ncheckpoint_every={a.every or (10 if a.quick else 50)}; windows from the copy to the file's last write")
    print(table(rows, ["model", "median step ms", "p99 step ms", "worst step during save ms", "worst/median",
                       "median save: its worst step/median", "copy step ms (median)", "worst copy step ms",
                       "worst step while writing ms", "worst step outside saves ms", "saves",
                       "steps during saves", "save window ms", "file MB"]))
    copy_rows = []
    for name in a.models.split(","):
        c = copy_part(name, 5 if a.quick else 40)
        copy_rows.append([name, c["old_ms"], c["new_ms"], c["old_ms"] / c["new_ms"]])
    print("\nsynchronous part of a save on the trainer thread (NaN/inf check + host copy of the state), medians:")
    print(table(copy_rows, ["model", "before: has_nonfinite + to_cpu ms", "now: fused norms + reused buffers ms",
                            "speed-up"]))
    print("\nratio checkpoint stall (worst step during a save / median step): " + ", ".join(finals))


if __name__ == "__main__":
    main()
