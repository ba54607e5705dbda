"""workbench.runview: a run seen from its directory, as another process sees it.

RunView reads what the trainer recorded like the Trainer's own API (status, history, evals, snapshot,
checkpoints, downsampled series), incrementally (a refresh with nothing new reads nothing); it steers a live
run through the run's SQLite inbox: controls and commands checked before posting, outcomes (applied,
refused with the reason) read back, and an alert's actions and dismissals, which the trainer checks.
"""
from __future__ import annotations

import numpy as np
import pytest

from workbench import Trainer
from workbench.runview import RunView

from conftest import wait_for


def test_runview_reads_what_the_trainer_recorded(finished_run):
    tr = finished_run
    view = RunView(tr.run_dir)
    assert view.status == "finished"
    assert view.history["train_loss"].tolist() == tr.history["train_loss"].tolist()
    assert view.evals["step"].tolist() == tr.evals["step"].tolist()
    snap = view.snapshot()
    assert snap["step"] == 300 and snap["controls"]["lr"] == pytest.approx(2e-3)
    assert set(view.checkpoints["step"]) <= {100, 200, 300} | set(tr.evals["step"])
    x1, y1 = view.series("train_loss", n_out=50)
    x2, y2 = tr.series("train_loss", n_out=50)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert view.refresh() == 0  # incremental: nothing new since the last read


def test_runview_steers_a_live_run_in_this_process_through_the_inbox(tmp_path):
    tr = Trainer(dataset="wine", max_steps=1_000_000, max_epochs=None, seed=0, runs_root=str(tmp_path),
                 eval_every=0, tensorboard=False).start()
    try:
        _steer(tr)
    finally:
        tr.stop()
        tr.join(20)
    assert tr.status == "stopped"


def _steer(tr):
    view = RunView(tr.run_dir)
    with pytest.raises(ValueError, match="lr"):
        view.set(lr=-1)
    ok = view.wait(view.set(lr=0.005), timeout=20)
    assert ok["status"] == "applied" and tr.controls.lr == pytest.approx(0.005)
    with pytest.raises(ValueError, match="precision"):
        view.set(precision="fp8")
    refused = view.wait(view.command("step", n=2), timeout=20)   # step(n) needs a paused run
    assert refused["status"] == "refused" and "paused" in refused["message"]
    paused = view.wait(view.command("pause"), timeout=20)
    assert paused["status"] == "applied" and tr.status == "paused"
    stepped = view.wait(view.command("step", n=3), timeout=20)
    assert stepped["status"] == "applied"
    with pytest.raises(ValueError, match="action"):
        view.command("explode")


def test_runview_dismisses_and_applies_alert_actions_through_the_inbox(tmp_path):
    """What the dashboard does for a run another process trains: an alert's action (a rollback here) and a
    dismiss go through the run's SQLite inbox; the trainer checks them and refuses what does not exist."""
    from workbench.scenarios import scenario_config

    tr = Trainer(scenario_config("lr_too_high", runs_root=str(tmp_path), tensorboard=False, max_steps=100_000,
                                 checkpoint_every=1))  # a finite checkpoint to roll back to
    tr.start()
    try:
        view = RunView(tr.run_dir)
        wait_for(lambda: view.alerts and tr.status == "paused", timeout=60)  # the divergence policy pauses it
        alert = next(a for a in view.alerts if a["kind"] == "divergence")
        back = next(i for i, act in enumerate(alert["actions"]) if act.get("rollback"))
        done = view.wait(view.apply_action(alert["id"], back), timeout=20)
        assert done["status"] == "applied", done["message"]
        assert (tr.events["kind"] == "rollback").any()
        assert tr.controls.lr == pytest.approx(alert["actions"][back]["controls"]["lr"])
        missing = view.wait(view.apply_action(alert["id"], 99), timeout=20)
        assert missing["status"] == "refused" and "index" in missing["message"]
        assert view.wait(view.dismiss(10_000), timeout=20)["status"] == "refused"
        assert view.wait(view.dismiss(alert["id"]), timeout=20)["status"] == "applied"
        assert next(a for a in view.alerts if a["id"] == alert["id"])["dismissed"]
        assert next(a for a in tr.alerts if a.id == alert["id"]).dismissed
    finally:
        tr.stop()
        tr.join(20)


def test_a_request_to_an_ended_run_is_refused_at_once_not_left_pending(finished_run):
    view = RunView(finished_run.run_dir)
    try:
        with pytest.raises(RuntimeError, match=r"the run has ended \(status finished\)"):
            view.ask("set", {"lr": 1e-3})
        with pytest.raises(RuntimeError, match="has ended"):
            view.command("pause")
    finally:
        view.close()
