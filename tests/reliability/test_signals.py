"""SIGTERM and SIGINT to ``workbench train`` (a real process): the run stops at the next step boundary with
a checkpoint of that step within ``STOP_WITHIN_S`` seconds of the signal (0.2-0.4 s measured), the process
exits 0 within ``EXIT_WITHIN_S`` (the interpreter's teardown of torch and pandas is most of that: 3-15 s on two
cores at a load average of 10), run.db says ``stopped``, and ``workbench resume D`` then ends with the weights, Adam state and loss history of a run that
was never stopped.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from workbench import Trainer
from workbench.checkpoint import checkpoint_files, load_checkpoint
from workbench.rundir import RunDB

from conftest import PYTHON, ROOT, cfg_for, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name != "posix", reason="POSIX signals")]

STEPS = 1200
STOP_WITHIN_S = 10.0  # from the signal to the run's "stopped" status: one step, one checkpoint, closing run.db
EXIT_WITHIN_S = 60.0  # from the signal to the process's exit


def _cfg(run_dir: Path) -> dict:
    # checkpoints rarer than the stop: the file the resume starts from is the one the signal made
    return cfg_for(run_dir, max_steps=STEPS, model_options={"width": 128, "dropout": 0.1}, batch_size=32,
                   eval_every=300, checkpoint_every=500, keep_checkpoints=5)


def _workbench(*args: str) -> list[str]:
    return [PYTHON, "-m", "workbench.cli", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _read(run_dir: Path):
    db = RunDB(run_dir / "run.db", readonly=True)
    try:
        return db.meta(), db.read_steps(), db.read_events(), db.last_step()
    finally:
        db.close()


def _last_step(run_dir: Path) -> int:
    if not (run_dir / "run.db").exists():
        return 0
    return _read(run_dir)[3] or 0


@pytest.fixture(scope="module")
def never_stopped(tmp_path_factory) -> Trainer:
    return Trainer(_cfg(tmp_path_factory.mktemp("ref") / "run")).run()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_with_a_checkpoint_and_the_resume_is_exact(tmp_path, never_stopped, sig):
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in _cfg(run_dir).items() if k != "run_dir"}))
    proc = subprocess.Popen(_workbench("train", "--config", str(config), "--run-dir", str(run_dir), "--no-progress"),
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _last_step(run_dir) >= 20 or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        signalled, signalled_at = time.monotonic(), time.time()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert took < EXIT_WITHIN_S, f"exited {took:.1f} s after {sig.name}"
    name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    assert f"{name}: stopping after the current step" in err and "Run stopped at step" in err, err[-3000:]
    meta, steps, events, last = _read(run_dir)
    assert meta["status"] == "stopped"
    stopped = events[(events["kind"] == "status") & (events["data"].map(lambda d: d.get("status")) == "stopped")]
    assert len(stopped) == 1 and stopped["time"].iloc[0] - signalled_at < STOP_WITHIN_S
    assert 20 <= last < STEPS, last
    # the checkpoint of the step it stopped at, in the table, written for the stop
    assert max(s for s, _ in checkpoint_files(run_dir / "checkpoints")) == last
    ckpt = events[events["kind"] == "checkpoint"].iloc[-1]
    assert ckpt["step"] == last and ckpt["data"]["reason"] == "stopped" and ckpt["source"] == "cli"
    assert steps["step"].tolist() == list(range(1, last + 1))

    resumed = subprocess.run(_workbench("resume", str(run_dir), "--no-progress"), cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    meta, steps, _, last = _read(run_dir)
    assert meta["status"] == "finished" and last == STEPS
    ref_steps = _read(never_stopped.run_dir)[1]
    assert steps["step"].tolist() == ref_steps["step"].tolist()
    assert steps["train_loss"].tolist() == ref_steps["train_loss"].tolist()  # every step's loss, bit for bit
    a = load_checkpoint(run_dir / "checkpoints" / f"step-{STEPS:08d}.pt")["state"]
    b = load_checkpoint(never_stopped.run_dir / "checkpoints" / f"step-{STEPS:08d}.pt")["state"]
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert len(a["optimizer"]["state"]) == len(b["optimizer"]["state"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k, v in sb.items():
            assert torch.equal(sa[k], v) if isinstance(v, torch.Tensor) else sa[k] == v, k
