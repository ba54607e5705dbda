"""Control latency: how many steps pass between ``set()`` returning and the change showing in history.

    .venv/bin/python bench/control_latency.py [--quick] [--n N] [--models tiny,medium]

A Trainer (default config: evals, recorder, TensorBoard, layer stats, diagnosis) runs freely; the
main thread calls ``set(lr=...)`` at random moments (0-20 ms apart), reads ``trainer.step_count`` the
moment ``set()`` returns (k), and waits for the request; ``request.step`` (s) is the first step that
ran with the change. Latency = s - k - 1 = the steps logged after set() returned that still ran
with the old value (0: the very next step has it; 1: a step was already in flight). A read of k that
races the trainer can see s <= k; such samples count as 0. Every sample is checked against history:
row s has the new lr, row s-1 the old one.
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np

from _common import Trainer, env_line, notebook_warmup, runs_dir, table

MODELS = {"tiny": dict(width=64, bs=64), "medium": dict(width=1024, bs=128)}


def measure(name: str, n: int) -> dict:
    spec = MODELS[name]
    tr = Trainer(dataset="digits", model="mlp", model_options={"depth": 2, "width": spec["width"]}, lr=1e-3,
                 batch_size=spec["bs"], max_steps=None, max_epochs=None, seed=0, runs_root=runs_dir(), device="cpu")
    tr.start()
    rng = random.Random(0)
    samples, wall, checks = [], [], []
    lr = 1e-3
    while tr.step_count < 20:
        time.sleep(0.01)
    for i in range(n):
        time.sleep(rng.uniform(0, 0.02))
        lr = 1e-3 if lr != 1e-3 else 2e-3
        req = tr.set(lr=lr)
        k = tr.step_count
        t0 = time.perf_counter()
        req.wait(30)
        wall.append(time.perf_counter() - t0)
        if req.status != "applied":
            raise RuntimeError(f"set() was {req.status}: {req.message}")
        samples.append(max(0, req.step - k - 1))
        checks.append((req.step, lr))
    while tr.step_count <= checks[-1][0]:
        time.sleep(0.01)
    tr.stop().wait(60)
    tr.join()
    h = tr.history.set_index("step")["lr"]
    ok = all(np.isclose(h[s], v) and not np.isclose(h[s - 1], v) for s, v in checks)
    a = np.asarray(samples)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": int(a.max()),
            "wall_p50_ms": float(np.median(wall)) * 1e3, "wall_p99_ms": float(np.percentile(wall, 99)) * 1e3,
            "history_ok": ok, "n": len(a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--models", default="tiny,medium")
    a = ap.parse_args()
    n = a.n or (10 if a.quick else 300)
    print(f"# bench/control_latency.py  {env_line()}")
    notebook_warmup()
    rows, finals = [], []
    for name in a.models.split(","):
        r = measure(name, n)
        rows.append([name, r["n"], r["p50"], r["p99"], r["max"], r["wall_p50_ms"], r["wall_p99_ms"], r["history_ok"]])
        finals.append(f"{name} {r['p99'] / 1.0:.2f}")
    print(table(rows, ["model", "samples", "p50 steps", "p99 steps", "max steps", "p50 ms to applied",
                       "p99 ms to applied", "history shows each change at request.step"]))
    print("\nratio control latency p99 / 1-step target: " + ", ".join(finals))


if __name__ == "__main__":
    main()
