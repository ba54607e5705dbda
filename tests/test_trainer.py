"""workbench.trainer: the facade's lifecycle and public API.

A Trainer starts once (paused or running), reports its status, and ends stopped, finished or failed;
``join()`` returns the final status, or re-raises the failure of user code (model, loss, data) with its
traceback, which the run's event log and metadata also keep. A script that ends without stop()/join() has
its run stopped cleanly at a step boundary, with a checkpoint to resume from.
"""
from __future__ import annotations

import subprocess
import textwrap

import pytest
import torch

from workbench import Trainer, TrainingFailed
from workbench.rundir import RunDB

from conftest import PYTHON, ROOT, wait_for


def test_a_run_starts_once_and_reports_each_status_until_it_ends(runs_root):
    tr = Trainer(dataset="wine", max_steps=None, max_epochs=None, seed=0, runs_root=str(runs_root), eval_every=0,
                 tensorboard=False)
    assert tr.status == "idle" and not tr.is_alive and tr.step_count == 0
    assert tr.start(paused=True) is tr
    assert tr.is_alive
    wait_for(lambda: tr.status == "paused")  # the trainer thread says so as it begins
    with pytest.raises(RuntimeError, match=r"already started \(status paused\)"):
        tr.start()
    assert tr.step(4).wait(30).status == "applied" and tr.step_count == 4
    assert tr.stop().wait(30).status == "applied"
    assert tr.join(30) == "stopped" and not tr.is_alive and tr.status == "stopped"
    assert repr(tr) == f"Trainer(run_dir={str(tr.run_dir)!r}, status='stopped', step=4)"
    statuses = [d["status"] for d in tr.events.loc[tr.events["kind"] == "status", "data"]]
    assert statuses == ["paused", "stopped"]
    assert RunDB(tr.run_dir / "run.db", readonly=True).meta()["status"] == "stopped"


class FailsOnCall(torch.nn.Module):
    def __init__(self, fail_at: int):
        super().__init__()
        self.lin = torch.nn.Linear(8, 3)
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom on call 37")
        return self.lin(x)


def test_user_model_that_raises_fails_the_run_and_join_reraises(tiny_data, runs_root):
    tr = Trainer(model=FailsOnCall(37), train_data=tiny_data, batch_size=8, max_steps=1000, max_epochs=None,
                 seed=0, runs_root=str(runs_root), eval_every=0, tensorboard=False)
    tr.start()
    with pytest.raises(TrainingFailed) as err:
        tr.join(30)
    assert not tr.is_alive
    assert tr.status == "failed"
    assert "boom on call 37" in str(err.value) and "Traceback" in str(err.value)
    assert "forward" in tr.traceback
    assert tr.step_count == 36
    ev = tr.events
    assert (ev["kind"] == "error").any()
    assert "boom on call 37" in ev[ev["kind"] == "error"].iloc[-1]["data"]["error"]
    assert RunDB(tr.run_dir / "run.db", readonly=True).meta()["status"] == "failed"


EXITS_WHILE_TRAINING = textwrap.dedent("""
    import sys, time
    from workbench import Trainer
    tr = Trainer(dataset="digits", model="mlp", max_steps=None, max_epochs=None, runs_root=sys.argv[1], seed=0)
    tr.start()
    while tr.step_count < 30:
        time.sleep(0.01)
    print(tr.run_dir)
""")


def test_a_script_that_ends_mid_run_stops_cleanly_and_can_resume(runs_root):
    """No stop()/join(): at interpreter exit the trainer is stopped at a step boundary with a checkpoint
    (a daemon thread torn down inside torch would abort the process with 'terminate called ...')."""
    for _ in range(3):  # the abort was intermittent
        proc = subprocess.run([PYTHON, "-c", EXITS_WHILE_TRAINING, str(runs_root)], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "terminate called" not in proc.stderr
    run_dir = proc.stdout.strip().splitlines()[-1]
    db = RunDB(f"{run_dir}/run.db")
    ev = db.read_events()
    assert ev["kind"].eq("status").any() and ev[ev["kind"] == "status"].iloc[-1]["data"]["status"] == "stopped"
    ck = db.read_checkpoints()
    assert len(ck) >= 1 and (ck["tag"] == "stopped").any()
    db.close()
    resumed = Trainer.from_checkpoint(run_dir)
    assert resumed.step_count >= 30
