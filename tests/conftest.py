"""Shared helpers and fixtures: tiny, fast, seeded runs under a temporary runs root.

Every helper a test module needs that another one needs too is written here, once:

* ``runs_root``, ``tiny_data``, ``make_mlp``: an empty runs folder, 200 samples of a 3-class rule, an MLP;
* ``wait_for``: poll a condition (never a timed assertion: the timeout only ends a wait that went wrong);
* ``WORKER``, ``run_worker``, ``cfg_for``, ``final_model``: a run trained (or resumed) in a new process;
* ``saved_run``: a finished run with a checkpoint every ``every`` steps;
* ``finished_run``: one finished 300-step digits run (evals, layer rows, checkpoints, a live lr change),
  shared read-only by the modules that read a run's record;
* ``training_process``: a run trained by another Python process, which the test can kill.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    return root


@pytest.fixture
def tiny_data() -> torch.utils.data.TensorDataset:
    """200 samples, 8 features, 3 classes (a linear rule plus noise)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = (x[:, :3].argmax(dim=1)).long()
    return torch.utils.data.TensorDataset(x, y)


def make_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, poll: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(poll)


# ---------------------------------------------------------------------------- a run in a new process
WORKER = textwrap.dedent("""
    import json, sys
    from workbench import Trainer
    spec = json.loads(sys.argv[1])
    tr = Trainer.from_checkpoint(spec["resume"]) if "resume" in spec else Trainer(spec["cfg"])
    live = {int(k): v for k, v in spec.get("live", {}).items()}
    ids = []
    def hook(ctx):
        ids.append([ctx.step, int(ctx.metrics["epoch"]), list(ctx.sample_ids)])
        if ctx.step in live:
            tr.set(**live[ctx.step])
        if ctx.step == spec.get("stop_at"):
            tr.stop()
    tr.on("step_end", hook)
    tr.run()
    if spec.get("ids_file"):
        with open(spec["ids_file"], "a") as f:
            f.write(json.dumps(ids) + "\\n")
    print(tr.status, tr.step_count)
""")


def run_worker(spec: dict) -> str:
    """Train (``cfg``) or resume (``resume``: a run dir) in a new process; ``live``: {step: controls} set at
    that step; ``stop_at``: stop there; ``ids_file``: append each step's sample ids. Returns "status steps"."""
    proc = subprocess.run([PYTHON, "-c", WORKER, json.dumps(spec)], capture_output=True, text=True, timeout=180,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def cfg_for(run_dir: Path, **kw) -> dict:
    """A 120-step digits run with dropout (so the RNG matters) in ``run_dir``."""
    cfg = dict(dataset="digits", model="mlp", model_options={"width": 64, "dropout": 0.1}, max_steps=120,
               max_epochs=None, batch_size=64, eval_every=25, seed=11, run_dir=str(run_dir), tensorboard=False)
    cfg.update(kw)
    return cfg


def final_model(run_dir: Path) -> dict:
    """The model weights of the step-120 checkpoint of ``run_dir``."""
    from workbench.checkpoint import load_checkpoint

    path = max((run_dir / "checkpoints").glob("step-00000120.pt"))
    return load_checkpoint(path)["state"]["model"]


def saved_run(tmp_path: Path, steps: int = 40, every: int = 10):
    """A finished ``cfg_for`` run of ``steps`` steps in ``tmp_path/run``, with a checkpoint every ``every``."""
    from workbench import Trainer

    tr = Trainer(cfg_for(tmp_path / "run", max_steps=steps, checkpoint_every=every, keep_checkpoints=10))
    tr.run()
    return tr


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished 300-step digits run: evals every 30 steps, layer rows every 10, checkpoints every 100, and
    its lr changed to 2e-3 at step 120 (source dashboard). Read it; do not change it."""
    from workbench import Trainer

    root = tmp_path_factory.mktemp("runs")
    tr = Trainer(dataset="digits", max_steps=300, max_epochs=None, seed=0, runs_root=str(root), eval_every=30,
                 layer_every=10, checkpoint_every=100, tensorboard=False)

    def hook(ctx):
        if ctx.step == 120:
            tr.set(lr=2e-3, source="dashboard")
    tr.on("step_end", hook)
    tr.run()
    return tr


# ---------------------------------------------------------------------------- a run in another process
TRAINS_UNTIL_KILLED = textwrap.dedent("""
    import sys
    from workbench import Trainer
    tr = Trainer(dataset="wine", model="mlp", max_steps=None, max_epochs=None, seed=0, eval_every=0,
                 tensorboard=False, runs_root=sys.argv[1])
    tr.start()
    print(tr.run_dir, flush=True)
    tr.join()
""")


@contextmanager
def training_process(root: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Another Python process trains a run under ``root`` with no end set; yields (process, run dir) once the
    run has recorded steps and says it is running. The process is killed (SIGKILL) on leaving, if alive."""
    from workbench.rundir import RunDB

    proc = subprocess.Popen([PYTHON, "-c", TRAINS_UNTIL_KILLED, str(root)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        run_dir = Path(proc.stdout.readline().strip())
        assert run_dir.name, proc.stderr.read() if proc.poll() is not None else "no run dir printed"

        def running() -> bool:
            if not (run_dir / "run.db").exists():
                return False
            db = RunDB(run_dir / "run.db", readonly=True)
            try:
                return db.meta().get("status") == "running" and (db.last_step() or 0) > 0
            finally:
                db.close()
        wait_for(running, timeout=60)
        yield proc, run_dir
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def stop_group(proc: subprocess.Popen, wait_s: float = 15) -> None:
    """Stop a server started in its own session: SIGTERM to its process group, SIGKILL if it has not ended
    within ``wait_s`` (its children, a browser or a kernel, go with it)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def kill(proc: subprocess.Popen) -> None:
    """End ``proc`` at once (SIGKILL: no exit handler runs, so its run still says it is running)."""
    proc.kill()
    proc.wait(30)
    assert proc.returncode == -9 if os.name == "posix" else proc.returncode != 0
