"""Checkpoint stall: the longest step while a checkpoint is being saved, over the median step.

    .venv/bin/python bench/checkpoint_stall.py [--quick] [--saves N] [--every K] [--models tiny,medium]
                                               [--writer auto|process|thread] [--breakdown]

Two Trainers with the same model, data and seed (default instrumentation, digits, Adam) run side by
side, interleaved in chunks (A B C A B C ...): A saves a checkpoint every K steps, B never does (the control),
and C is the hand-written loop (no workbench at all: the same model, data, batch order and Adam on the main
thread, as in bench/overhead.py, on the trainers' intra-op thread count).
Each A chunk is K steps long and has one save in its middle, so the save's background write finishes
inside the chunk. A save has two parts: the state is copied to host memory on the trainer thread
between two steps, then written (torch.save, fsync, rename) while training goes on: by the writer
process (``checkpoint_writer`` auto/process, the default) or by a writer thread (``--writer thread``).
A save's window runs from the end of the step it follows (the copy starts) to the
file's mtime (its last byte); every step whose interval overlaps a window counts as "during a save".

Figures, per model: the stall a save typically causes (the target: the median over saves of the longest
step during a save, over the median step, <= 2), the worst over all saves beside the hand-written loop's
own worst at the same places (reported, not held to 2: on a busy 2-core machine the hand loop alone goes
past it), and both again for the control B at the same step numbers. B runs the same diagnosis ticks,
layer statistics and recorder writes at those steps and the same host noise reaches both, so A's figure
minus B's is what the saves themselves cost; "time lost per save" sums that difference over a save's
window (median over saves), which counts what a writer thread's GIL share costs on every step it overlaps.
C's longest step over the same places of its own chunks, over its median step, is the floor this machine
sets: what the figure would be if a save and the workbench cost nothing. The first chunk of each side is
warm-up.
"""
from __future__ import annotations

import argparse
import bisect
import os
import statistics
import time
from typing import Callable

import numpy as np
import torch

from _common import HandLoop, Trainer, env_line, notebook_warmup, run_trainer_chunk, runs_dir, table, \
    trainer_threads

MODELS = {"tiny": dict(width=64, bs=64), "medium": dict(width=1024, bs=128)}


def _trainer(name: str, every: int, writer: str = "auto") -> Trainer:
    spec = MODELS[name]
    return Trainer(checkpoint_writer=writer, dataset="digits", model="mlp",
                   model_options={"depth": 2, "width": spec["width"]}, val_fraction=0.0,
                   lr=1e-3, batch_size=spec["bs"], max_steps=None, max_epochs=None, seed=0, eval_every=0,
                   runs_root=runs_dir(), device="cpu", checkpoint_every=every, keep_checkpoints=100_000)


def _step_times(tr: Trainer, firsts: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """(step, seconds) of every step but the first of each chunk (its interval holds the pause)."""
    h = tr.history
    step, t = h["step"].to_numpy(), h["time"].to_numpy()
    keep = (np.diff(step) == 1) & ~np.isin(step[1:], list(firsts))
    return step[1:][keep], np.diff(t)[keep]


def measure(name: str, saves: int, every: int, writers: tuple[str, ...] = ("auto",)) -> list[dict]:
    """One saving side per writer (A), one control (B) and the hand-written loop (C), all interleaved;
    a result per A."""
    sides, b = [_trainer(name, every, w) for w in writers], _trainer(name, 0)
    x, y = b.train_data.tensors
    hand = HandLoop(b.model, x, y, seed=b.cfg.seed, batch_size=b.cfg.batch_size, lr=b.cfg.lr, loss_fn=b.loss_fn,
                    device=b.device)
    hand_chunks: list[list[float]] = []
    threads: list[int] = []  # the trainers' intra-op count, read once they have started

    def hand_chunk() -> None:
        # on the trainers' intra-op thread count (one for the tiny MLP): a team on every core meets more of
        # the machine's noise, and the floor is meant for the loop the trainers run
        if not threads:
            threads.append(trainer_threads(b))
        mine = torch.get_num_threads()
        torch.set_num_threads(threads[0])
        try:
            hand_chunks.append(hand.run(every))
        finally:
            torch.set_num_threads(mine)

    firsts = _drive([*sides, b], saves, every, hand_chunk)
    found = [_windows(a, firsts, every) for a in sides]
    floor = _hand_floor(found[0], firsts, hand_chunks[1:])
    return [_figures(a, b, firsts, every, f) | floor | {"writer": w, "mode": a.checkpointer.mode}
            for a, f, w in zip(sides, found, writers)]


def _drive(trainers: list[Trainer], saves: int, every: int, hand: Callable[[], None] | None = None) -> set[int]:
    """Run the trainers interleaved in chunks of ``every`` steps, each chunk with one save of a saving side in
    its middle, ``saves`` timed chunks after one of warm-up; stop them. ``hand``, when given, runs one chunk
    of the hand-written loop after the trainers' chunks, after the same pause. Returns the first step number
    of every chunk (the same on every side; its interval holds the pause between chunks)."""
    if any(tr.checkpointer.mode == "process" for tr in trainers):  # the writer process imports torch (~1 s) first
        from workbench.ckptproc import client
        client().ready.wait(60)
    firsts: set[int] = set()
    for tr in trainers:
        tr.start(paused=True)
        run_trainer_chunk(tr, every // 2)  # a saving side's chunks now have their save in the middle
    for _ in range(saves + 1):  # chunk 0 is warm-up
        firsts.add(trainers[0].step_count + 1)
        for tr in trainers:
            time.sleep(0.1)  # the same short pause before every chunk
            run_trainer_chunk(tr, every)
        if hand is not None:
            time.sleep(0.1)
            hand()
    for tr in trainers:
        tr.stop().wait(120)
        tr.join()
    return firsts


def _warm_steps(every: int) -> int:
    """The steps ``_drive`` runs before its first timed chunk: the half chunk, then chunk 0 (warm-up)."""
    return every // 2 + every


def _hand_floor(windows: list[tuple[np.ndarray, float, int]], firsts: set[int], chunks: list[list[float]]) -> dict:
    """The noise floor: the hand-written loop's (no workbench at all) longest step over each save's window
    (``_windows``), taken at the same places in its own chunks (step s of the chunk that starts at step f is
    the loop's (s - f)-th step of the same round), over its own median step."""
    starts = sorted(firsts)[1:]  # the timed chunks (chunk 0 is warm-up), as the loop's chunks
    worst = []
    for steps, _, _ in windows:
        c = bisect.bisect_right(starts, int(steps[0])) - 1
        if not 0 <= c < len(chunks):
            continue
        offsets = [int(s) - starts[c] for s in steps if 1 <= int(s) - starts[c] <= len(chunks[c])]
        if offsets:
            worst.append(max(chunks[c][j - 1] for j in offsets))
    med = statistics.median(x for ch in chunks for x in ch)
    return {"hand_ratio": max(worst) / med if worst else float("nan"),
            "hand_typical": statistics.median(worst) / med if worst else float("nan"), "hand_median_ms": med * 1e3,
            "hand_over2": sum(w > 2 * med for w in worst)}


def _windows(a: Trainer, firsts: set[int], every: int) -> list[tuple[np.ndarray, float, int]]:
    """Each timed periodic save of ``a``: (the step numbers whose interval overlaps its window, the window's
    length in seconds, the file's size). A window runs from the end of the save's step (the copy starts)
    to the file's mtime (its last byte)."""
    h = a.history
    row_time = dict(zip(h["step"].to_numpy().tolist(), h["time"].to_numpy().tolist()))
    step_a, _ = _step_times(a, firsts)
    lo = np.array([row_time.get(int(s) - 1, np.nan) for s in step_a])
    hi = np.array([row_time[int(s)] for s in step_a])
    ev = a.events
    periodic = ev[(ev["kind"] == "checkpoint") & ev["data"].map(lambda d: d.get("reason") == "periodic")]
    warm = _warm_steps(every)
    out = []
    for _, row in periodic.iterrows():
        s = int(row["step"])
        if s <= warm or s not in row_time:
            continue
        path = row["data"]["path"]
        end = max(os.stat(path).st_mtime, row["time"]) if os.path.exists(path) else row["time"]
        inside = (hi > row_time[s]) & (lo <= end)
        if inside.any():
            out.append((step_a[inside], end - row_time[s], os.path.getsize(path) if os.path.exists(path) else 0))
    return out


def _figures(a: Trainer, b: Trainer, firsts: set[int], every: int, found: list[tuple[np.ndarray, float, int]]) -> dict:
    """A's figures against B's at the same steps; ``found``: A's save windows (``_windows``)."""
    step_a, dt_a = _step_times(a, firsts)
    step_b, dt_b = _step_times(b, firsts)
    warm = _warm_steps(every)
    windows = [w for w, _, _ in found]
    lengths = [n for _, n, _ in found]
    sizes = [z for _, _, z in found]
    by_step_b = dict(zip(step_b.tolist(), dt_b.tolist()))
    by_step_a = dict(zip(step_a.tolist(), dt_a.tolist()))
    med_a = float(np.median(dt_a[step_a > warm]))
    med_b = float(np.median(dt_b[step_b > warm]))
    worst_a = [max(by_step_a[int(s)] for s in w) for w in windows]
    worst_b = [max((by_step_b[int(s)] for s in w if int(s) in by_step_b), default=float("nan")) for w in windows]
    # What a save costs training in all: over its window, A's steps minus B's at the same step numbers.
    lost = [sum(by_step_a[int(s)] - by_step_b[int(s)] for s in w if int(s) in by_step_b) for w in windows]
    during = np.isin(step_a, np.concatenate(windows)) if windows else np.zeros(len(step_a), bool)
    outside = ~during & (step_a > warm)
    copy = np.isin(step_a, [int(w[0]) for w in windows])
    # Step by step after the save's step s (s+1 holds the copy), as a ratio to each side's median step.
    saved = [int(w[0]) - 1 for w in windows]
    def med(xs: list[float]) -> float:
        return statistics.median(xs) if xs else float("nan")  # (quick mode: chunks shorter than 7 steps)
    after = {k: (med([by_step_a[s + k] for s in saved if s + k in by_step_a]) / med_a,
                 med([by_step_b[s + k] for s in saved if s + k in by_step_b]) / med_b) for k in range(1, 7)}
    # How often a step at s+k is a stall (over 3x the median step), per side: where rare stalls come from.
    over = {k: (sum(by_step_a.get(s + k, 0.0) > 3 * med_a for s in saved),
                sum(by_step_b.get(s + k, 0.0) > 3 * med_b for s in saved)) for k in range(1, 9)}
    return {"after": after, "over": over, "median_ms": med_a * 1e3, "control_median_ms": med_b * 1e3,
            "saves": len(windows),
            "ratio": max(worst_a) / med_a, "typical": statistics.median(worst_a) / med_a,
            "control_ratio": np.nanmax(worst_b) / med_b, "control_typical": float(np.nanmedian(worst_b)) / med_b,
            "over2": sum(w > 2 * med_a for w in worst_a), "control_over2": sum(w > 2 * med_b for w in worst_b),
            "copy_ms": float(np.median(dt_a[copy])) * 1e3, "lost_ms": statistics.median(lost) * 1e3,
            "steps_per_save": statistics.median(len(w) for w in windows),
            "window_ms": statistics.median(lengths) * 1e3, "size_mb": statistics.median(sizes) / 1e6,
            "outside_ms": float(dt_a[outside].max()) * 1e3 if outside.any() else float("nan"),
            "p99_ms": float(np.percentile(dt_a[step_a > warm], 99)) * 1e3}


def copy_part(name: str, reps: int) -> dict:
    """The synchronous part of a save, alone: the NaN/inf check and the host copy of the full state, done
    the naive way (``ck.has_nonfinite`` + ``ck.to_cpu``: fresh tensors each save) and the workbench's way
    (fused norms, then a copy into the previous save's buffers). Interleaved, medians."""
    from workbench import checkpoint as ck
    from workbench.checkpointing import host_copy, nonfinite

    spec = MODELS[name]
    tr = Trainer(dataset="digits", model="mlp", model_options={"depth": 2, "width": spec["width"]}, val_fraction=0.0,
                 lr=1e-3, batch_size=spec["bs"], max_steps=5, max_epochs=None, seed=0, eval_every=0,
                 runs_root=runs_dir(), device="cpu", tensorboard=False)
    tr.run()  # Adam state exists now
    state = tr.state_dict()
    buffers: dict = {}
    naive, ours = [], []
    for r in range(reps + 1):
        t0 = time.perf_counter()
        ck.has_nonfinite(state["state"]["model"])
        ck.to_cpu(state)
        t1 = time.perf_counter()
        nonfinite(state["state"]["model"])
        host_copy(state, buffers)
        t2 = time.perf_counter()
        if r:
            naive.append(t1 - t0)
            ours.append(t2 - t1)
    return {"naive_ms": statistics.median(naive) * 1e3, "ours_ms": statistics.median(ours) * 1e3}


def breakdown(name: str, saves: int, every: int) -> tuple[list[list], float, float]:
    """Where a save's time on the trainer thread goes, measured inside the running loop (a part costs
    there two to three times what it costs called again and again alone: after ``every`` steps of
    training its code and data are out of the caches). Each part is timed only while a periodic save
    runs; figures are medians over saves. Returns (rows, median save ms, median step ms)."""
    import workbench.checkpointing as C
    from workbench.runlog import RunLog

    tr = _trainer(name, every)
    times: dict[str, list[float]] = {}
    in_save = [False]
    undo: list[tuple[object, str, object]] = []

    def timed(owner: object, attr: str, label: str, always: bool = False) -> None:
        fn = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            if not (in_save[0] or always):
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times.setdefault(label, []).append(time.perf_counter() - t0)

        own = vars(owner)  # a class, a module, or an instance whose method comes from its class
        undo.append((owner, attr, attr in own, own.get(attr)))
        setattr(owner, attr, wrapper)

    save = C.Checkpointer.save

    def saving(self, **kwargs):
        in_save[0] = True
        t0 = time.perf_counter()
        try:
            return save(self, **kwargs)
        finally:
            times.setdefault("whole save", []).append(time.perf_counter() - t0)
            in_save[0] = False

    parts = [(RunLog, "flush", "flush of queued step rows"),
             (C.Checkpointer, "states", "state dicts, all components"),
             *[(comp, "state_dict", f"  state dict: {n}") for n, comp in tr.checkpointer.parts.items()],
             (C, "nonfinite", "NaN/inf check of the weights"),
             (C, "host_copy", "host copy + message (walk, fused copy)"),
             (type(tr.checkpointer.writer), "submit", "hand-off to the writer")]
    C.Checkpointer.save = saving
    try:
        for owner, attr, label in parts:
            timed(owner, attr, label)
        _drive([tr], saves, every)
    finally:
        C.Checkpointer.save = save
        for owner, attr, had, original in reversed(undo):
            if had:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)  # its class's method shows through again
    step = float(np.median(np.diff(tr.history["time"].to_numpy())[every:])) * 1e3
    order = ["whole save"] + [label for _, _, label in parts]
    rows = [[label, statistics.median(times[label][1:] or times[label]) * 1e3, len(times[label])]
            for label in order if label in times]
    return rows, rows[0][1], step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--saves", type=int, default=None, help="timed saves per model (default 60 tiny, 16 medium)")
    ap.add_argument("--every", type=int, default=None, help="checkpoint_every (default 50)")
    ap.add_argument("--models", default="tiny,medium")
    ap.add_argument("--writer", default="auto",
                    help="checkpoint_writer of the saving side: auto (the writer process where it can run), process, "
                         "thread, or several, comma-separated (e.g. process,thread: one saving side each, all "
                         "interleaved with the one control)")
    ap.add_argument("--breakdown", action="store_true",
                    help="instead: time each part of a save on the trainer thread inside the running loop")
    a = ap.parse_args()
    print(f"# bench/checkpoint_stall.py  {env_line()}")
    notebook_warmup()
    every = a.every or (10 if a.quick else 50)
    if a.breakdown:
        finals = []
        for name in a.models.split(","):
            rows, whole, step = breakdown(name, a.saves or (2 if a.quick else 40), every)
            print(f"\n{name}: the parts of a periodic save on the trainer thread, in the running loop "
                  f"(median over saves; the first save dropped); median step {step:.3f} ms")
            print(table(rows, ["part", "ms (median)", "calls"]))
            finals.append(f"{name} {whole / step:.2f} ({whole:.3f} ms / {step:.3f} ms)")
        print("\nratio save on the trainer thread / median step: " + ", ".join(finals))
        return
    rows, finals, after_rows, over_rows, over2_rows = [], [], [], [], []
    writers = tuple(w.strip() for w in a.writer.split(","))
    for name in a.models.split(","):
        saves = a.saves or (2 if a.quick else (60 if name == "tiny" else 16))
        for r in measure(name, saves, every, writers):
            label = name if len(writers) == 1 else f"{name} ({r['mode']})"
            rows.append([label, r["median_ms"], r["p99_ms"], r["copy_ms"], r["lost_ms"], r["ratio"], r["typical"],
                         r["control_ratio"], r["control_typical"], r["hand_ratio"], r["hand_typical"], r["outside_ms"],
                         r["saves"], r["steps_per_save"], r["window_ms"], r["size_mb"]])
            after_rows.append([label] + [f"{x:.2f} / {y:.2f}" for x, y in r["after"].values()])
            over_rows.append([label] + [f"{x} / {y}" for x, y in r["over"].values()])
            over2_rows.append([label, r["saves"], r["over2"], r["control_over2"], r["hand_over2"]])
            finals.append(f"{label} {r['typical']:.2f} (control without saves {r['control_typical']:.2f}; worst "
                          f"save {r['ratio']:.2f}, the hand-written loop's worst at the same places "
                          f"{r['hand_ratio']:.2f})")
    print(f"\ncheckpoint_every={every}, checkpoint_writer={a.writer}; A saves, B (control) does not, C is the "
          "hand-written loop; windows from the copy to the file's last write")
    print(table(rows, ["model", "median step ms", "p99 step ms", "copy step ms (median)", "time lost per save ms",
                       "worst step during saves/median", "median over saves of its worst step/median (target)",
                       "control: same steps, worst/median", "control: median over saves",
                       "hand-written loop: same places, worst/median", "hand-written loop: median over saves",
                       "worst step outside saves ms", "saves", "steps per save", "save window ms", "file MB"]))
    print("\nthe steps after a save's step s, median over saves, / median step: saving side / control at the "
          "same steps (s+1 holds the copy; a diagnosis tick due at s waits until s+1 is done)")
    print(table(after_rows, ["model"] + [f"s+{k}" for k in range(1, 7)]))
    print("\nhow many saves had a step over 3x the median step at s+k: saving side / control at the same steps")
    print(table(over_rows, ["model"] + [f"s+{k}" for k in range(1, 9)]))
    print("\nsaves whose window held a step over 2x the median step (the target, per save): saving side, the "
          "control at the same steps, the hand-written loop at the same places")
    print(table(over2_rows, ["model", "saves", "saving side", "control", "hand-written loop"]))
    copy_rows = []
    for name in a.models.split(","):
        c = copy_part(name, 5 if a.quick else 40)
        copy_rows.append([name, c["naive_ms"], c["ours_ms"], c["naive_ms"] / c["ours_ms"]])
    print("\nsynchronous part of a save on the trainer thread (NaN/inf check + host copy of the state), medians:")
    print(table(copy_rows, ["model", "naive: has_nonfinite + to_cpu ms", "workbench: fused norms + reused buffers ms",
                            "speed-up"]))
    print("\nratio checkpoint stall (median over saves of the longest step during a save / median step): "
          + ", ".join(finals))


if __name__ == "__main__":
    main()
