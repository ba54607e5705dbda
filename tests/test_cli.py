"""workbench.cli: the ``workbench`` command (real subprocesses) and its functions (main, run_trainer).

* ``train`` finishes and writes the run directory, applies ``--set`` overrides (dotted keys too), prints a
  progress bar and a summary with the resume and TensorBoard commands; a typo in a key exits 2 listing the
  valid keys, without a traceback or a run.
* ``runs`` lists the runs; ``resume`` of a finished run finishes at once; usage errors exit 2 with the
  reason; ``--version``; the dashboard command line.
* Ctrl-C (SIGINT, in-process or to a real process) stops the run cleanly at a step boundary with a
  checkpoint, and the run resumes; a failed run exits 1 without a traceback.
* A teaching scenario runs from the command line and reports its alert.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from workbench import TrainConfig, Trainer, __version__, cli
from workbench.cli import build_parser, dashboard_argv
from workbench.rundir import RunDB

from conftest import ROOT, wait_for

FAST = ["--set", "max_steps=30", "--set", "seed=1", "--set", "eval_every=10", "--set", "device=cpu"]


def workbench(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter (python -m workbench.cli, same as the console script)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def meta_status(run_dir: Path) -> str:
    db = RunDB(run_dir / "run.db", readonly=True)
    try:
        return db.meta()["status"]
    finally:
        db.close()


def last_step(run_dir: Path) -> int:
    """The newest recorded step of a run that may still be starting (0 when nothing is readable yet)."""
    if not (run_dir / "run.db").exists():
        return 0
    try:
        db = RunDB(run_dir / "run.db", readonly=True)
        try:
            return db.last_step() or 0
        finally:
            db.close()
    except Exception:  # noqa: BLE001 - the writer may not have created the tables yet
        return 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One real 30-step run (with a dotted override), shared by the tests below: (cwd, run_dir, result)."""
    cwd = tmp_path_factory.mktemp("cli")
    run_dir = cwd / "runs" / "first"
    res = workbench("train", *FAST, "--set", "model_options.depth=3", "--run-dir", str(run_dir), cwd=cwd)
    return cwd, run_dir, res


# ------------------------------------------------------------------------------------------- train
def test_train_finishes_and_writes_the_run_dir(trained) -> None:
    _, run_dir, res = trained
    assert res.returncode == 0, res.stderr
    for name in ("run.db", "config.yaml", "checkpoints", "tb"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "checkpoints").glob("step-*.pt"))
    assert meta_status(run_dir) == "finished"
    # the summary paragraph
    assert "Run finished at step 30 of 30" in res.stdout
    assert "Final train loss" in res.stdout and "Best val loss" in res.stdout and "Best val acc" in res.stdout
    assert f"workbench resume {run_dir}" in res.stdout
    assert f"tensorboard --logdir {run_dir / 'tb'}" in res.stdout
    assert f"workbench dashboard --runs {run_dir.parent}" in res.stdout
    # the progress bar went to stderr: step / total and the postfix
    assert "30/30" in res.stderr and "loss=" in res.stderr and "lr=" in res.stderr


def test_train_applies_overrides_including_dotted_keys(trained) -> None:
    _, run_dir, _ = trained
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["max_steps"] == 30 and saved["seed"] == 1
    assert saved["model_options"] == {"depth": 3}
    assert saved["run_dir"] == str(run_dir)


def test_typo_key_exits_2_and_lists_valid_keys(tmp_path: Path) -> None:
    res = workbench("train", "--set", "lrr=1", "--no-progress", cwd=tmp_path)
    assert res.returncode == 2
    assert "error:" in res.stderr and "'lrr'" in res.stderr
    assert "valid keys:" in res.stderr and "lr" in res.stderr and "max_steps" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


def test_runs_lists_the_run(trained) -> None:
    cwd, run_dir, _ = trained
    res = workbench("runs", str(run_dir.parent), cwd=cwd)
    assert res.returncode == 0, res.stderr
    header, row = res.stdout.strip().splitlines()[:2]
    assert header.split()[:4] == ["run", "status", "step", "best"]
    assert row.split()[:3] == ["first", "finished", "30"]
    assert re.search(r"\d+\.\d{4}\s+\d{4}-\d\d-\d\d \d\d:\d\d$", row)


def test_resume_of_a_finished_run_finishes_at_once(trained, capsys: pytest.CaptureFixture[str]) -> None:
    _, run_dir, _ = trained
    assert cli.main(["resume", str(run_dir), "--no-progress"]) == 0
    assert "Run finished at step 30" in capsys.readouterr().out
    assert meta_status(run_dir) == "finished"


# ------------------------------------------------------------------------------------------- main() in-process
def test_runs_empty_and_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["runs", str(tmp_path / "nothing")]) == 0
    assert capsys.readouterr().out.strip() == f"no runs under {tmp_path / 'nothing'}"
    assert cli.main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["train", "--set", "lr=-1", "--runs", str(tmp_path)]) == 2
    assert "lr: got -1" in capsys.readouterr().err
    assert cli.main(["train", "--set", "lr.x=1", "--runs", str(tmp_path)]) == 2
    assert "dotted keys work for: dataset_options, model_options, schedule_options" in capsys.readouterr().err
    assert cli.main(["train", "--set", "noequals"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert cli.main(["resume", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["resume", str(tmp_path)]) == 2  # a folder without checkpoints
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_build_config_merges_dotted_keys_over_the_demo_config(tmp_path: Path) -> None:
    cfg = cli.build_config(str(ROOT / "configs" / "demo.yaml"), ["model_options.depth=2", "lr=1e-3"],
                           run_dir=str(tmp_path / "r"), runs_root=str(tmp_path))
    assert cfg.model_options == {"depth": 2, "width": 256}
    assert cfg.lr == 1e-3 and cfg.schedule == "warmup_cosine" and cfg.max_epochs == 1500
    assert cfg.run_dir == str(tmp_path / "r") and cfg.runs_root == str(tmp_path)
    # order does not matter: the overrides are validated together
    cfg = cli.build_config(None, ["schedule=cosine", "max_epochs=null", "max_steps=10"])
    assert (cfg.schedule, cfg.max_epochs, cfg.max_steps) == ("cosine", None, 10)


# ------------------------------------------------------------------------------------------- run_trainer()
def test_ctrl_c_stops_cleanly_and_the_run_resumes(tmp_path: Path) -> None:
    """A real SIGINT to this process while run_trainer waits on a run (paused at step 5, so the stop lands
    at a known step): the CLI's handler asks the run to stop, and it stops with a checkpoint."""
    run_dir = tmp_path / "stopme"
    trainer = Trainer(TrainConfig(max_steps=40, seed=1, device="cpu", eval_every=10, run_dir=str(run_dir)))
    trainer.start(paused=True)
    assert trainer.step(5).wait(30).status == "applied"
    pytest_handler = signal.getsignal(signal.SIGINT)

    def ctrl_c() -> None:  # once run_trainer has put its own SIGINT handler in place
        wait_for(lambda: signal.getsignal(signal.SIGINT) is not pytest_handler)
        os.kill(os.getpid(), signal.SIGINT)

    pressed = threading.Thread(target=ctrl_c)
    pressed.start()
    out, err = io.StringIO(), io.StringIO()
    assert cli.run_trainer(trainer, progress=False, out=out, err=err) == 0
    pressed.join(30)
    assert signal.getsignal(signal.SIGINT) is pytest_handler  # put back
    assert trainer.status == "stopped" and trainer.step_count < 40
    assert "Run stopped at step 5" in err.getvalue() and f"workbench resume {run_dir}" in err.getvalue()
    assert "Run stopped" in out.getvalue()
    assert meta_status(run_dir) == "stopped"

    # `workbench resume` picks it up from the stop checkpoint and runs to the end
    out = io.StringIO()
    assert cli.run_trainer(Trainer.from_checkpoint(run_dir), progress=True, out=out, err=io.StringIO()) == 0
    assert "Run finished at step 40 of 40" in out.getvalue()


class Exploding(torch.nn.Module):
    """An MLP for digits that raises on its third forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 10)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom in forward")
        return self.lin(x)


def test_failed_run_exits_1_without_a_traceback(tmp_path: Path) -> None:
    trainer = Trainer(TrainConfig(max_steps=10, seed=1, device="cpu", run_dir=str(tmp_path / "bad")), model=Exploding())
    out, err = io.StringIO(), io.StringIO()
    assert cli.run_trainer(trainer, progress=False, out=out, err=err) == 1
    assert "error: training failed: RuntimeError: boom in forward" in err.getvalue()
    assert "Traceback" not in err.getvalue() + out.getvalue()
    assert "Run failed" in out.getvalue() and "event log" in out.getvalue()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX-only here")
def test_sigint_to_a_real_process_stops_the_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "long"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "train", "--set", "max_steps=1000000",
                             "--set", "max_epochs=null", "--set", "device=cpu", "--run-dir", str(run_dir)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while last_step(run_dir) < 5 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)  # wait until it is training (steps recorded), not still starting up
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Run stopped at step" in err and f"workbench resume {run_dir}" in err
    assert "Run stopped" in out
    assert meta_status(run_dir) == "stopped"
    assert list((run_dir / "checkpoints").glob("step-*.pt"))


def test_scenario_runs_from_the_cli_and_reports_its_alert(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "train", "--scenario", "lr_too_high", "--no-progress",
                           "--runs", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr   # the run ended diverged: said once, and not a success
    assert "Watch for:" in proc.stderr and "[critical] divergence" in proc.stderr
    assert proc.stderr.count("stopping it here") == 1 and proc.stderr.count("[critical] divergence") == 1
    assert proc.stdout.count("Run diverged at step") == 1
    listing = subprocess.run([sys.executable, "-m", "workbench.cli", "scenarios"], capture_output=True, text=True,
                             timeout=60)
    assert listing.returncode == 0 and "deep_sigmoid" in listing.stdout and "vanishing_gradients" in listing.stdout
    bad = subprocess.run([sys.executable, "-m", "workbench.cli", "train", "--scenario", "nope"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "allowed: lr_too_high" in bad.stderr


def test_cli_dashboard_command_line(tmp_path):
    args = build_parser().parse_args(["dashboard", "--runs", str(tmp_path), "--port", "8999", "--demo"])
    argv = dashboard_argv(args)
    assert argv[1:4] == ["-m", "streamlit", "run"] and argv[4] == str(ROOT / "app" / "dashboard.py")
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"
    assert argv[argv.index("--server.port") + 1] == "8999"
    assert argv[argv.index("--") + 1:] == ["--runs", str(tmp_path.resolve()), "--demo"]

