"""workbench.handle: one handle on a run, whether this process trains it or another one does.

* ``open_run(run_dir)`` gives a LocalRun for a trainer registered in workbench.registry and a RemoteRun
  (a RunView of the directory) otherwise; for the same finished run both read the same snapshot, the same
  ``series("train_loss")``, the same alerts (``alert_list``) and the same event kinds.
* ``RemoteRun.ask`` steers a run another live process trains, and refuses at once, saying why, a run that
  has ended and a run whose trainer process is gone.
* ``launch`` creates, registers and starts a run; ``resume`` refuses a run still training (here or in
  another process) and continues an ended one in its own directory; ``fork`` starts a new directory from a
  checkpoint with changed controls and records its lineage, and refuses bad controls before it makes any
  directory.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench import TrainConfig, Trainer, handle, registry
from workbench.handle import LocalRun, RemoteRun

from conftest import kill, make_mlp, training_process, wait_for


@pytest.fixture
def root(runs_root):
    """The runs folder; every trainer registered under it is stopped, and every shared view closed, after."""
    yield runs_root
    registry.stop_all(under=runs_root)
    handle.close_all()


def finished_with_alerts(root: Path) -> Trainer:
    """A finished 30-step tiny run (mid-epoch) whose data raise two pre-flight alerts: one class has a ninth of
    the other's samples, and the val rows are copies of train rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = torch.zeros(200, dtype=torch.long)
    y[:20] = 1
    tr = Trainer(model=make_mlp(), train_data=torch.utils.data.TensorDataset(x, y),
                 val_data=torch.utils.data.TensorDataset(x[:40], y[:40]), loss_fn=torch.nn.CrossEntropyLoss(),
                 batch_size=16, max_steps=30, max_epochs=None, seed=0, eval_every=0, tensorboard=False,
                 runs_root=str(root))
    return tr.run()


def wine(root: Path, **kw) -> TrainConfig:
    cfg = dict(dataset="wine", model="mlp", max_steps=None, max_epochs=None, seed=0, eval_every=0,
               tensorboard=False, runs_root=str(root))
    cfg.update(kw)
    return TrainConfig(**cfg)


def same(a, b) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


def test_both_handles_of_a_finished_run_read_the_same_record(root):
    tr = finished_with_alerts(root)
    registry.add(tr)
    local = handle.open_run(tr.run_dir)
    assert isinstance(local, LocalRun) and local.trainer is tr
    registry.remove(tr.run_dir)
    remote = handle.open_run(tr.run_dir)
    assert isinstance(remote, RemoteRun) and handle.open_run(tr.run_dir) is remote  # one shared view

    a, b = local.snapshot(), remote.snapshot()
    assert set(a) == set(b)
    assert Path(a.pop("run_dir")).resolve() == Path(b.pop("run_dir")).resolve()
    ea, eb = a.pop("last_eval"), b.pop("last_eval")
    assert ea and set(ea) == set(eb) and all(same(ea[k], eb[k]) and type(ea[k]) is type(eb[k]) for k in ea), (ea, eb)
    assert all(same(a[k], b[k]) for k in a), (a, b)
    assert a["status"] == "finished" and a["step"] == 30

    for x, y in zip(local.series("train_loss"), remote.series("train_loss")):
        np.testing.assert_array_equal(x, y)
    alerts = [(x["kind"], x["id"], x["step"], x["open"]) for x in local.alert_list()]
    assert alerts == [(x["kind"], x["id"], x["step"], x["open"]) for x in remote.alert_list()]
    assert sorted(kind for kind, *_ in alerts) == ["class_imbalance", "data_leakage"]
    assert local.events["kind"].tolist() == remote.events["kind"].tolist()


def test_both_handles_say_the_same_epoch_of_a_run_that_ended_at_an_epoch_boundary(root):
    tr = Trainer(wine(root, max_epochs=2)).run()
    registry.add(tr)
    local = handle.open_run(tr.run_dir).snapshot()
    registry.remove(tr.run_dir)
    remote = handle.open_run(tr.run_dir).snapshot()
    assert local["epoch"] == remote["epoch"] == int(tr.history["epoch"].iloc[-1]) == 1
    assert local["step"] == remote["step"] == tr.step_count


def test_a_remote_run_refuses_a_request_at_once_when_the_run_has_ended(root):
    tr = finished_with_alerts(root)
    remote = handle.open_run(tr.run_dir)
    assert isinstance(remote, RemoteRun)
    with pytest.raises(RuntimeError, match=r"the run has ended \(status finished\); fork it"):
        remote.ask("set", {"lr": 2e-3})


def test_a_remote_run_steers_a_live_process_and_refuses_once_its_process_is_gone(root):
    with training_process(root) as (proc, run_dir):
        remote = handle.open_run(run_dir)
        assert isinstance(remote, RemoteRun)
        ticket = remote.ask("set", {"lr": 2e-3}).wait(30)
        assert ticket.state()["status"] == "applied"
        wait_for(lambda: remote.meta["controls"]["lr"] == pytest.approx(2e-3))
        with pytest.raises(ValueError, match=rf"still going in another process \(pid {proc.pid}\); stop it first"):
            handle.resume(run_dir)
        kill(proc)
        assert remote.status == "running"  # what its directory still says
        with pytest.raises(RuntimeError, match=rf"no process is training this run \(its trainer, pid {proc.pid}, "
                                               rf"is gone\); resume it"):
            remote.ask("pause")


def test_launch_registers_and_starts_a_run_and_resume_continues_it_once_it_has_ended(root):
    tr = handle.launch(wine(root), paused=True)
    assert registry.get(tr.run_dir) is tr and tr.is_alive and tr.run_dir.parent == root
    wait_for(lambda: tr.status == "paused")
    assert isinstance(handle.open_run(tr.run_dir), LocalRun)
    assert tr.step(10).wait(30).status == "applied"
    with pytest.raises(ValueError, match="still going in this process; stop it first, or fork it"):
        handle.resume(tr.run_dir)
    tr.stop().wait(30)
    assert tr.join(30) == "stopped"
    again = handle.resume(tr.run_dir, paused=True)
    assert again is not tr and registry.get(tr.run_dir) is again
    assert again.run_dir == tr.run_dir and again.step_count == 10 and again.is_alive
    resumed = again.events[again.events["kind"] == "resume"]
    assert resumed["step"].tolist() == [10]


def test_fork_makes_a_new_run_with_its_lineage_and_refuses_bad_controls_before_making_a_directory(root):
    parent = handle.launch(wine(root), paused=True)
    assert parent.step(10).wait(30).status == "applied"
    at10 = parent.save_checkpoint(tag="fork-here")
    before = sorted(root.iterdir())
    with pytest.raises(ValueError, match=r"lr: got -1"):
        handle.fork(parent.run_dir, at10, {"lr": -1}, runs_root=root)
    parent.stop().wait(30)
    parent.join(30)
    registry.remove(parent.run_dir)  # now a run nobody trains: checked with what its directory says
    with pytest.raises(ValueError, match=r"batch_size: got 0"):
        handle.fork(parent.run_dir, at10, {"batch_size": 0}, runs_root=root)
    assert sorted(root.iterdir()) == before

    child = handle.fork(parent.run_dir, at10, {"lr": 5e-3}, runs_root=root)
    assert child.run_dir.parent == root and child.run_dir.name == f"{parent.run_dir.name}-fork"
    assert registry.get(child.run_dir) is child and child.is_alive
    assert child.lineage == {"parent_run": str(parent.run_dir), "parent_step": 10, "parent_checkpoint": str(at10)}
    wait_for(lambda: child.controls.lr == pytest.approx(5e-3))
    assert ((child.events["kind"] == "fork") & (child.events["step"] == 10)).any()
