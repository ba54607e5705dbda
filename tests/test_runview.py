"""RunView reads a run directory like the Trainer's own API; chart data and figures are bounded and shared."""
from __future__ import annotations

import time

import numpy as np
import pytest

from workbench import Trainer, figures
from workbench.chartdata import chart_data, layer_matrix
from workbench.runview import RunView


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tr = Trainer(dataset="digits", max_steps=300, max_epochs=None, seed=0, runs_root=str(root), eval_every=30,
                 layer_every=10, checkpoint_every=100, tensorboard=False)

    def hook(ctx):
        if ctx.step == 120:
            tr.set(lr=2e-3, source="dashboard")
    tr.on("step_end", hook)
    tr.run()
    return tr


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


def test_chart_data_and_figures_are_the_same_for_both_sources(finished_run):
    a, b = chart_data(finished_run, n_out=100), chart_data(RunView(finished_run.run_dir), n_out=100)
    for name in ("train_loss", "lr", "grad_norm", "val_loss", "val_acc"):
        np.testing.assert_array_equal(a.series[name][1], b.series[name][1])
    assert a.points <= 100
    kinds = {m["kind"] for m in a.markers}
    assert {"control", "checkpoint"} <= kinds
    assert any(m["label"] == "lr: 0.001 -> 0.002" for m in a.markers)
    figs = figures.all_figures(a, log_y=True)
    assert set(figs) == {"loss", "lr", "grad_norm", "val_acc", "layer_grad_norm", "update_ratio"}
    assert all(figures.trace_points(f) <= 100 for f in figs.values())
    steps, layers, z = layer_matrix(a.layers)
    assert layers[0].endswith("weight") and z.shape == (len(layers), len(steps))
    assert figs["loss"].layout.yaxis.type == "log"
    comp = figures.compare_figure({"a": a, "b": b})
    assert len(comp.data) == 2


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
        deadline = time.monotonic() + 60
        while not view.alerts or tr.status != "paused":  # the divergence policy pauses the run
            assert time.monotonic() < deadline
            time.sleep(0.05)
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
