"""Precision: fp32 vs bf16 vs fp16 step time, and step time right after a live switch vs a fresh run.

    .venv/bin/python bench/precision.py [--quick] [--rounds R] [--chunk N] [--device cuda|cpu]

Needs a CUDA GPU (on a CPU-only machine it says so and exits 0 with --quick, 2 without). ``--device cpu``
runs the same procedure on the CPU as a functional check of the script only (no CPU target).

Network: the PyTorch AMP recipe's (3 x Linear 4096 + ReLU, MSE, bs 512, random data), Adam.
1. One Trainer per precision, started paused; interleaved chunks of N steps (fp32 bf16 fp16 fp32 ...);
   a chunk's time is the wall time of ``step(N).wait()`` (it ends with the read-back of the chunk's
   values, so it includes all GPU work); first round is warm-up; median over rounds.
2. Live switch: a "switcher" Trainer at fp32 gets ``set(precision=p)`` and then runs a chunk; a fresh
   Trainer started at p (already warm) runs a chunk right after; ratio switched/fresh, median over rounds
   (the switcher goes back to fp32 before the next precision).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from _common import Trainer, env_line, runs_dir, table


def make(precision: str, device: str, root: str, quick: bool) -> Trainer:
    torch.manual_seed(0)
    width = 512 if quick and device == "cpu" else 4096
    layers = []
    for _ in range(3):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1])
    g = torch.Generator().manual_seed(0)
    n = 4096
    data = torch.utils.data.TensorDataset(torch.randn(n, width, generator=g), torch.randn(n, width, generator=g))
    return Trainer(model=net, train_data=data, loss_fn=torch.nn.MSELoss(), lr=1e-4, batch_size=512, max_steps=None,
                   max_epochs=None, seed=0, eval_every=0, runs_root=root, device=device, precision=precision)


def chunk_time(tr: Trainer, n: int) -> float:
    t0 = time.perf_counter()
    req = tr.step(n).wait(600)
    if req.status != "applied":
        raise RuntimeError(f"step({n}) was {req.status}: {req.message}")
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    print(f"# bench/precision.py  {env_line()}")
    device = a.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print("bench/precision.py needs a CUDA GPU (fp16/bf16 speed is a GPU question); none here, nothing measured.")
        print("ratio precision: n/a (needs a GPU)")
        sys.exit(0 if a.quick else 2)
    rounds = a.rounds or (2 if a.quick else 6)
    n = a.chunk or (5 if a.quick else 50)
    root = runs_dir()
    precisions = ["fp32", "bf16", "fp16"]
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        precisions.remove("bf16")
    trs = {p: make(p, device, root, a.quick) for p in precisions}
    switcher = make("fp32", device, root, a.quick)
    for t in (*trs.values(), switcher):
        t.start(paused=True)
    steady: dict[str, list[float]] = {p: [] for p in precisions}
    switched: dict[str, list[float]] = {p: [] for p in precisions[1:]}
    for r in range(rounds):
        for p, t in trs.items():
            dt = chunk_time(t, n)
            if r:
                steady[p].append(dt)
        chunk_time(switcher, n)  # fp32, warm
        for p in precisions[1:]:
            switcher.set(precision=p).wait(60)
            s = chunk_time(switcher, n)
            f = chunk_time(trs[p], n)
            if r:
                switched[p].append(s / f)
            switcher.set(precision="fp32").wait(60)
            chunk_time(switcher, max(1, n // 5))
    for t in (*trs.values(), switcher):
        t.stop().wait(120)
        t.join()
    fp32 = statistics.median(steady["fp32"])
    rows = [[p, statistics.median(v) * 1e3, fp32 / statistics.median(v),
             statistics.median(switched[p]) if p in switched else "-"] for p, v in steady.items()]
    print(f"\n{device}, AMP recipe network, bs 512, {rounds - 1} timed rounds of {n} steps")
    print(table(rows, ["precision", "ms/step", "speed-up vs fp32", "right after live switch / fresh run"]))
    print("\nratio precision (after a live switch / fresh run): "
          + ", ".join(f"{p} {statistics.median(v):.3f}" for p, v in switched.items()))


if __name__ == "__main__":
    main()
