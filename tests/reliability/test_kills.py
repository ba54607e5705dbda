"""SIGKILL a training process again and again, at random moments and inside checkpoint writes.

After every kill and the next start: no file under a final name is partial, no temp file or shared memory of
the killed processes is left, every checkpoint on disk is in the table, no history row is missing, the work
lost is bounded by the checkpoint interval, and the run, finished at last, ends with the weights of a run
that was never killed. ``WORKBENCH_KILLS`` sets how many kills (default: 20 where ``CI`` is set, else 8; each costs about 3 s).
"""
from __future__ import annotations

import os
import random
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch

from workbench import Trainer
from workbench.checkpoint import checkpoint_files, load_checkpoint
from workbench.rundir import RunDB

from conftest import PYTHON, ROOT, wait_for

pytestmark = pytest.mark.slow

EVERY = 20
STEPS = 600
KILLS = int(os.environ.get("WORKBENCH_KILLS") or (20 if os.environ.get("CI") else 8))  # CI: 20; a local run: 8


def _cfg(run_dir: Path) -> dict:
    return dict(dataset="digits", model="mlp", model_options={"width": 384, "dropout": 0.1}, max_steps=STEPS,
                max_epochs=None, batch_size=32, eval_every=0, seed=7, run_dir=str(run_dir), tensorboard=False,
                checkpoint_every=EVERY, keep_checkpoints=3, keep_best=0)


TRAIN = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path
    from workbench import Trainer
    cfg = json.loads(sys.argv[1])
    run = Path(cfg["run_dir"])
    if run.exists() and not list((run / "checkpoints").glob("step-*.pt")):
        shutil.rmtree(run)  # killed before its first checkpoint: nothing to resume, so start again
    tr = Trainer.from_checkpoint(run) if run.exists() else Trainer(cfg)
    print("started", flush=True)
    tr.run()
""")


def _state(run_dir: Path) -> tuple[int | None, list[int], set[str]]:
    db = RunDB(run_dir / "run.db", readonly=True)
    try:
        steps = db.read_steps()["step"].astype(int).tolist()
        table = {Path(p).name for p in db.read_checkpoints()["path"]}
        return db.last_step(), steps, table
    finally:
        db.close()


def _shm_of(pids: set[int]) -> list[str]:
    found = []
    for folder in ("/dev/shm", "/tmp"):
        if os.path.isdir(folder):
            found += [f for f in os.listdir(folder) if any(f.startswith(f"workbench-{p}-") for p in pids)]
    return found


def test_kills_lose_nothing_written_and_end_like_a_run_never_killed(tmp_path):
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir)
    rng = random.Random(21)
    killed_pids: set[int] = set()
    inside_writes = lost_max = 0
    for i in range(KILLS):
        proc = subprocess.Popen([PYTHON, "-c", TRAIN, __import__("json").dumps(cfg)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "started", proc.stderr.read()
        folder = run_dir / "checkpoints"
        if i % 2:  # inside a write: as soon as a temp file of a save shows up
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline and not list(folder.glob(".step-*.tmp")):
                time.sleep(0.0005)
            inside_writes += bool(list(folder.glob(".step-*.tmp")))
        else:
            time.sleep(rng.uniform(0.05, 1.5))
        if proc.poll() is not None:  # it finished first: nothing left to kill
            break
        proc.kill()
        proc.wait(30)
        killed_pids.add(proc.pid)
        # nothing under a final name is partial
        files = checkpoint_files(folder)
        for _, p in files:
            load_checkpoint(p)
        last, steps, _ = _state(run_dir)
        if files and last is not None:
            newest = max(s for s, _ in files)
            lost_max = max(lost_max, last - newest)
            # rows flushed up to the newest checkpoint (and past it): none is missing before it
            assert set(range(1, newest + 1)) <= set(steps), f"kill {i}: history hole before step {newest}"
    assert inside_writes >= min(3, KILLS // 4), "too few kills landed inside a write to prove anything"
    # the work a kill can lose: the save in flight and the waiting one, a checkpoint interval each at most
    assert lost_max <= 3 * EVERY
    # the last start finishes the run; stale temp files are gone, the table holds every file on disk
    proc = subprocess.run([PYTHON, "-c", TRAIN, __import__("json").dumps(cfg)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    assert _shm_of(killed_pids) == []
    last, steps, table = _state(run_dir)
    assert steps == list(range(1, STEPS + 1)) and last == STEPS
    assert {p.name for _, p in checkpoint_files(run_dir / "checkpoints")} == table
    # the weights and Adam state equal an uninterrupted run's
    ref = Trainer(_cfg(tmp_path / "ref")).run()
    a = load_checkpoint(run_dir / "checkpoints" / f"step-{STEPS:08d}.pt")["state"]
    b = load_checkpoint(ref.run_dir / "checkpoints" / f"step-{STEPS:08d}.pt")["state"]
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sb if isinstance(sb[k], torch.Tensor))
