"""Probe: why is a bare training loop slower in a background thread on CPU? (no workbench code)

The same Adam/MLP loop (64-W-W-10, random digits-sized data) runs in a background thread under
several conditions; each condition is a fresh subprocess, conditions alternate for ``--rounds``
rounds, and the table shows the median ms/step and the voluntary context switches per step (futex
sleeps, from /proc/self/task/*/status; Linux) of the background thread and of its OpenMP worker.

    .venv/bin/python bench/omp_probe.py [--width 64] [--bs 64] [--steps 600] [--rounds 3]

Conditions: main (the loop on the main thread), thread (main ran torch first, as in a notebook),
fresh (main never opened a parallel region), release (main ran torch, then gave back its idle pool
with workbench.cputhreads.release_idle_workers), nt1 (main ran torch; torch.set_num_threads(1) in
the thread).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

CONDITIONS = ("main", "thread", "fresh", "release", "nt1")


def ctx_switches() -> dict[int, int]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            for line in open(f"/proc/self/task/{tid}/status"):
                if line.startswith("voluntary_ctxt_switches"):
                    out[int(tid)] = int(line.split()[1])
        except OSError:
            pass
    return out


def loop(width: int, bs: int, steps: int, warm: int) -> float:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                              torch.nn.ReLU(), torch.nn.Linear(width, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.randn(1437, 64), torch.randint(0, 10, (1437,))
    lf = torch.nn.CrossEntropyLoss()
    times = []
    for _ in range(steps + warm):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(x), (bs,))
        loss = lf(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warm:]) * 1e3


def child(cond: str, width: int, bs: int, steps: int) -> dict:
    warm = 100
    if cond == "main":
        loop(width, bs, 50, 10)
        before = ctx_switches()
        ms = loop(width, bs, steps, warm)
        after = ctx_switches()
        main = threading.get_native_id()
        workers = sum(after[t] - before.get(t, 0) for t in after if t != main)
        return {"ms": ms, "thread_sw": (after[main] - before[main]) / (steps + warm),
                "worker_sw": workers / (steps + warm)}
    if cond != "fresh":
        loop(width, bs, 50, 10)  # the main thread runs torch work first, as in a notebook
    if cond == "release":
        from workbench.cputhreads import release_idle_workers
        release_idle_workers()
    res: dict = {}

    def run() -> None:
        if cond == "nt1":
            torch.set_num_threads(1)
        me = threading.get_native_id()
        before = ctx_switches()
        res["ms"] = loop(width, bs, steps, warm)
        after = ctx_switches()
        new = [t for t in after if t not in before]  # this thread's OpenMP worker(s)
        res["thread_sw"] = (after[me] - before[me]) / (steps + warm)
        res["worker_sw"] = sum(after[t] for t in new) / (steps + warm)
        res["threads_alive"] = len(after)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=CONDITIONS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.width, a.bs, a.steps)))
        return
    results: dict[str, list[dict]] = {c: [] for c in CONDITIONS}
    for _ in range(a.rounds):
        for c in CONDITIONS:
            out = subprocess.run([sys.executable, __file__, "--child", c, "--width", str(a.width), "--bs", str(a.bs),
                                  "--steps", str(a.steps)], capture_output=True, text=True, check=True).stdout
            results[c].append(json.loads(out.strip().splitlines()[-1]))
    print(f"MLP 64-{a.width}-{a.width}-10, bs {a.bs}, {a.steps} steps, median of {a.rounds} processes; "
          f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    print(f"{'condition':<10} {'ms/step':>8} {'sleeps/step (loop thread)':>26} {'sleeps/step (its workers)':>26}")
    for c, rs in results.items():
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        print(f"{c:<10} {med('ms'):8.3f} {med('thread_sw'):26.1f} {med('worker_sw'):26.1f}")
    print(f"ratio thread/main: {statistics.median(r['ms'] for r in results['thread']) / statistics.median(r['ms'] for r in results['main']):.2f}"
          f"  release/main: {statistics.median(r['ms'] for r in results['release']) / statistics.median(r['ms'] for r in results['main']):.2f}")


if __name__ == "__main__":
    main()
