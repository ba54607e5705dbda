"""Shared pieces of the benchmarks: the main thread's torch warm-up, a hand-written loop, medians.

Every bench runs both sides in one process, interleaved in chunks (A B A B ...), drops the first
round as warm-up and reports the median of per-step times. A Trainer's per-step time is read from
``trainer.history["time"]`` (wall time set right after each optimizer step): the difference between two
consecutive rows of one chunk is one full turn of the loop (boundary, fetch, step, read-back, logging,
diagnosis ticks), so nothing has to be added to the engine to time it.
"""
from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from workbench import Trainer  # noqa: E402
from workbench.sampler import epoch_permutation  # noqa: E402

DATE = "2026-11-25"


def notebook_warmup() -> None:
    """Torch work on the calling (main) thread, as a notebook always does before it starts a run:
    large enough that the thread opens OpenMP parallel regions and keeps an idle worker pool."""
    a = torch.randn(512, 512)
    for _ in range(20):
        a = torch.tanh(a @ a.T / 512)
    float(a.sum())


def runs_dir() -> str:
    return tempfile.mkdtemp(prefix="wb-bench-")


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3 if values else float("nan")


def trainer_step_times(tr: Trainer, first: int, last: int) -> list[float]:
    """Seconds per step for steps first+1..last, from consecutive history rows (one chunk)."""
    h = tr.history
    t = h.loc[(h["step"] >= first) & (h["step"] <= last), "time"].to_numpy()
    return list(np.diff(t))


def run_trainer_chunk(tr: Trainer, n: int, timeout: float = 600.0) -> list[float]:
    """Run exactly n steps of a paused trainer and return its per-step times."""
    start = tr.step_count
    req = tr.step(n).wait(timeout)
    if req.status != "applied":
        raise RuntimeError(f"step({n}) was {req.status}: {req.message}")
    return trainer_step_times(tr, start + 1, start + n)


def per_round_ratio(a: list[list[float]], b: list[list[float]], stat: Callable = statistics.median) -> float:
    """Median over rounds of stat(a's steps in round r) / stat(b's steps in round r).

    Each round's two chunks ran back to back, so a change in the machine's load between rounds cancels
    out of the ratio; the median over rounds drops a round that a neighbour process disturbed."""
    ratios = [stat(x) / stat(y) for x, y in zip(a, b) if x and y]
    return statistics.median(ratios) if ratios else float("nan")


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class HandLoop:
    """The user's own loop: same model copy, data tensors, batch order, optimizer and loss, no workbench."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int, batch_size: int,
                 lr: float, loss_fn: Callable, device: torch.device, amp_dtype: torch.dtype | None = None) -> None:
        self.model = copy.deepcopy(model)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.x, self.y, self.seed, self.bs, self.loss_fn = x, y, seed, batch_size, loss_fn
        self.device, self.amp_dtype = device, amp_dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.epoch, self.pos = 0, 0
        self.perm = epoch_permutation(len(x), seed, 0).to(x.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, n: int) -> list[float]:
        """n optimizer steps; returns the n-1 times between consecutive step ends."""
        ends = []
        for _ in range(n):
            if self.pos >= len(self.perm):
                self.epoch, self.pos = self.epoch + 1, 0
                self.perm = epoch_permutation(len(self.x), self.seed, self.epoch).to(self.x.device)
            idx = self.perm[self.pos:self.pos + self.bs]
            self.pos += len(idx)
            if self.amp_dtype is None:  # the plain loop a user writes
                loss = self.loss_fn(self.model(self.x[idx]), self.y[idx])
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
            else:
                with torch.autocast(self.device.type, dtype=self.amp_dtype):
                    loss = self.loss_fn(self.model(self.x[idx]), self.y[idx])
                self.opt.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
            self._sync()
            ends.append(time.perf_counter())
        return list(np.diff(ends))

    def run_in_thread(self, n: int) -> list[float]:
        """The same loop in a plain, fresh ``threading.Thread`` (what the workbench does, minus the workbench),
        started from a main thread that has just run torch work (so it holds an idle OpenMP pool)."""
        float((torch.ones(256, 256) @ torch.ones(256, 256)).sum())  # a parallel region on this thread
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(self.run(n)))
        t.start()
        t.join()
        return out[0]


def trainer_threads(tr: Trainer) -> int | None:
    """The intra-op thread count a started CPU Trainer chose (its latest ``cpu_threads`` event); None on a GPU
    run, which logs none."""
    ev = tr.events
    rows = ev.loc[ev["kind"] == "cpu_threads", "data"]
    return rows.iloc[-1].get("intra_op_threads") if len(rows) else None


def same_weights(*models: torch.nn.Module) -> bool:
    ref = list(models[0].parameters())
    return all(all(torch.equal(a.detach().cpu(), b.detach().cpu()) for a, b in zip(ref, m.parameters()))
               for m in models[1:])


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def env_line() -> str:
    import os
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs, {cuda}; "
            f"{DATE}")
