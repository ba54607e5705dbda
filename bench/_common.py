"""Shared pieces of the benchmarks: the main thread's torch warm-up, a hand-written loop, medians.

Every bench runs both sides in one process, interleaved in chunks (A B A B ...), drops the first
round as warm-up and reports the median of per-step times. A Trainer's per-step time is read from
``trainer.history["time"]`` (wall time set right after each optimizer step): the difference between two
consecutive rows of one chunk is one full turn of the loop (boundary, fetch, step, read-back, logging,
diagnosis ticks), so nothing has to be added to the engine to time it.
"""
from __future__ import annotations

import collections
import copy
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import workbench  # noqa: E402
from workbench import Trainer  # noqa: E402
from workbench.sampler import epoch_permutation  # noqa: E402

PACKAGE = str(Path(workbench.__file__).parent)


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
            self._step()
            self._sync()
            ends.append(time.perf_counter())
        return list(np.diff(ends))

    def run_chunk(self, n: int) -> float:
        """n optimizer steps with one device sync at the end (the loop's throughput, as a user's loop that
        logs only now and then runs on a GPU); returns the chunk's wall seconds."""
        self._sync()
        t0 = time.perf_counter()
        for _ in range(n):
            self._step()
        self._sync()
        return time.perf_counter() - t0

    def _step(self) -> None:
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


# The loop's read-back boundaries: where a Trainer reads device values back on purpose (every ``sync_every``
# steps, layer statistics, evaluation, checkpoints, diagnosis and the good-state ring run only there), as
# (module, class, function).
READ_BACK = (("runlog", "RunLog", "flush"), ("runlog", "RunLog", "record_layers"), ("loop", "Loop", "evaluate"),
             ("checkpointing", "Checkpointer", "save"), ("watch", "Watch", "check"), ("rollback", "GoodStates", "keep"))


def read_back_missing() -> list[str]:
    """The READ_BACK entries that no longer name a function of the engine (the list must follow renames)."""
    import importlib

    missing = []
    for module, cls, fn in READ_BACK:
        owner = getattr(importlib.import_module(f"workbench.{module}"), cls, None)
        if owner is None or not callable(getattr(owner, fn, None)):
            missing.append(f"workbench.{module}.{cls}.{fn}")
    return missing


def host_syncs(tr: Trainer, n: int, debug: bool = True) -> dict[str, Any]:
    """Run ``n`` steps of a paused CUDA Trainer under torch's sync debug mode and sort every synchronizing
    call by where it came from: one of the loop's read-back boundaries (``READ_BACK``) or anywhere else.
    ``other_sites`` names the workbench line nearest to each of the others. ``debug=False`` leaves the
    mode alone (a CPU run has none: the same path, nothing to count)."""
    seen: list[tuple[bool, str]] = []

    def show(message, category, filename, lineno, file=None, line=None):  # runs on the thread that synced
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]
        at = {(Path(f.filename).stem, f.name) for f in frames}
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
        seen.append((any((m, fn) in at for m, _, fn in READ_BACK), where))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        if debug:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            req = tr.step(n).wait(600)
        finally:
            if debug:
                torch.cuda.set_sync_debug_mode("default")
    if req.status != "applied":
        raise RuntimeError(f"step({n}) was {req.status}: {req.message}")
    other = [w for rb, w in seen if not rb]
    return {"steps": n, "read_back_syncs": len(seen) - len(other), "other_syncs": len(other),
            "other_sites": dict(collections.Counter(other))}


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
    return (f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs, {cuda}, "
            f"CPU kernels {torch.backends.cpu.get_cpu_capability()}; {time.strftime('%Y-%m-%d %H:%M')}")
