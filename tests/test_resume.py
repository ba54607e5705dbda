"""workbench.resume: continuing a run from a checkpoint.

* A run stopped and resumed in a new process (once or twice, after live changes, mid-epoch, with gradient
  accumulation, in bf16, with saves on diagnosis ticks) ends bit-identical to one that never stopped:
  losses, lr, evals, alerts and final weights; every sample is still seen once per epoch.
* ``Trainer.from_checkpoint`` refuses a checkpoint that does not fit the model, reports a config that
  disagrees with the checkpoint field by field (the checkpoint's wins), and a new Trainer refuses a run
  directory that already holds a run.
* ``continue_from`` continues a run in its own directory with the run's own model, data and loss, once the
  run has ended; ``fork`` starts a new directory from the parent's weights with new controls and records
  its lineage.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workbench import Trainer
from workbench.checkpoint import CheckpointError, load_checkpoint
from workbench.rundir import RunDB

from conftest import cfg_for, final_model, run_worker, saved_run


def uninterrupted(run_dir: Path, live: dict, **kw) -> Trainer:
    tr = Trainer(cfg_for(run_dir, **kw))

    def hook(ctx):
        if ctx.step in live:
            tr.set(**live[ctx.step])
    tr.on("step_end", hook)
    tr.run()
    return tr


CASES = {
    "plain": dict(stops=[60], live={}, kw={}),
    "live_lr_and_batch_size_at_30": dict(stops=[60], live={30: {"lr": 3e-3, "batch_size": 50}}, kw={}),
    "stop_mid_epoch_after_change": dict(stops=[47], live={45: {"batch_size": 17}}, kw={}),
    "accumulate_2": dict(stops=[60], live={}, kw={"accumulate": 2}),
    "bf16_on_cpu": dict(stops=[60], live={}, kw={"precision": "bf16"}),
    "resumed_twice": dict(stops=[40, 80], live={30: {"lr": 2e-3}, 70: {"batch_size": 40}}, kw={}),
    # every save lands on a diagnosis tick, which is then put off one step; stop right there
    # (lr 1.0 blows the loss up at step 2: on_divergence=ignore lets it train on; alerts at 3, 21, 61)
    "saves_on_ticks_high_lr": dict(stops=[60], live={},
                                   kw={"checkpoint_every": 10, "lr": 1.0, "on_divergence": "ignore"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_in_a_new_process_is_bit_identical(case, tmp_path):
    c = CASES[case]
    ref = uninterrupted(tmp_path / "ref", c["live"], **c["kw"])
    assert ref.step_count == 120

    run_dir = tmp_path / "run"
    live = {str(k): v for k, v in c["live"].items()}
    out = run_worker({"cfg": cfg_for(run_dir, **c["kw"]), "stop_at": c["stops"][0], "live": live})
    assert out == f"stopped {c['stops'][0]}"
    for stop in c["stops"][1:]:
        assert run_worker({"resume": str(run_dir), "stop_at": stop, "live": live}) == f"stopped {stop}"
    assert run_worker({"resume": str(run_dir), "live": live}) == "finished 120"

    resumed = RunDB(run_dir / "run.db", readonly=True).read_steps()
    assert resumed["step"].tolist() == list(range(1, 121))
    assert resumed["train_loss"].tolist() == ref.history["train_loss"].tolist()
    assert resumed["lr"].tolist() == ref.history["lr"].tolist()
    a, b = final_model(tmp_path / "ref"), final_model(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evals = RunDB(run_dir / "run.db", readonly=True).read_evals()
    assert evals["val_loss"].tolist() == ref.evals["val_loss"].tolist()
    alerts = RunDB(run_dir / "run.db", readonly=True).read_events()
    alerts = alerts[alerts["kind"] == "alert"]
    expected = ref.events[ref.events["kind"] == "alert"]
    assert [(d["kind"], s) for d, s in zip(alerts["data"], alerts["step"])] == \
        [(d["kind"], s) for d, s in zip(expected["data"], expected["step"])]


def test_every_sample_once_per_epoch_across_stop_resume_and_batch_changes(tmp_path):
    run_dir, ids_file = tmp_path / "run", tmp_path / "ids.jsonl"
    cfg = cfg_for(run_dir, dataset="wine", batch_size=16, max_steps=40, eval_every=0)
    live = {"5": {"batch_size": 9}, "12": {"batch_size": 31}, "22": {"batch_size": 4}}
    run_worker({"cfg": cfg, "stop_at": 13, "live": live, "ids_file": str(ids_file)})
    run_worker({"resume": str(run_dir), "stop_at": 25, "live": live, "ids_file": str(ids_file)})
    run_worker({"resume": str(run_dir), "live": live, "ids_file": str(ids_file)})
    rows = [r for line in ids_file.read_text().splitlines() for r in json.loads(line)]
    assert [r[0] for r in rows] == list(range(1, 41))
    n = len(Trainer(cfg_for(tmp_path / "probe", dataset="wine")).train_data)
    by_epoch: dict[int, list[int]] = {}
    for _, epoch, ids in rows:
        by_epoch.setdefault(epoch, []).extend(ids)
    last = max(by_epoch)
    for epoch, ids in by_epoch.items():
        assert len(ids) == len(set(ids)), f"epoch {epoch}: a sample was seen twice"
        if epoch != last:
            assert sorted(ids) == list(range(n)), f"epoch {epoch}: a sample was skipped"


def test_a_checkpoint_that_does_not_fit_the_model_is_refused_with_its_path(tmp_path):
    tr = saved_run(tmp_path, steps=20)
    path = tr.run_dir / "checkpoints" / "step-00000020.pt"
    other = torch.nn.Sequential(torch.nn.Linear(64, 7), torch.nn.ReLU(), torch.nn.Linear(7, 10))
    train, val = tr.train_data, tr.val_data
    with pytest.raises(CheckpointError, match=r"step-00000020\.pt.*does not fit.*model"):
        Trainer.from_checkpoint(path, model=other, train_data=train, val_data=val,
                                loss_fn=torch.nn.CrossEntropyLoss())


def test_continue_from_a_checkpoint_keeps_the_runs_own_objects_and_waits_for_the_run_to_end(tmp_path):
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    tr = Trainer(dict(max_steps=None, max_epochs=None, batch_size=32, eval_every=0, seed=1, checkpoint_every=10,
                      layer_every=5, run_dir=str(tmp_path / "run"), tensorboard=False),
                 model=model, train_data=TensorDataset(x, y), loss_fn=torch.nn.CrossEntropyLoss())
    tr.start(paused=True)
    assert tr.step(20).wait(30).status == "applied"
    at10 = tr.run_dir / "checkpoints" / "step-00000010.pt"
    with pytest.raises(RuntimeError, match="stop it first"):
        tr.continue_from(at10)
    tr.stop().wait(30)
    tr.join(30)
    new = tr.continue_from(at10)
    assert new.run_dir == tr.run_dir and new.step_count == 10 and new.model is model
    assert new.train_data is tr.train_data and new.loss_fn is tr.loss_fn
    assert torch.equal(model[0].weight, load_checkpoint(at10)["state"]["model"]["0.weight"])


def test_fork_starts_from_parent_weights_with_new_controls(tmp_path):
    parent = saved_run(tmp_path, steps=40, every=20)
    at20 = parent.run_dir / "checkpoints" / "step-00000020.pt"
    child = parent.fork(checkpoint=at20, run_dir=tmp_path / "child", lr=5e-3)
    weights = load_checkpoint(at20)["state"]["model"]
    assert all(torch.equal(child.model.state_dict()[k], weights[k]) for k in weights)
    assert child.step_count == 20 and child.run_dir == tmp_path / "child"
    assert child.lineage == {"parent_run": str(parent.run_dir), "parent_step": 20, "parent_checkpoint": str(at20)}
    meta = RunDB(child.run_dir / "run.db", readonly=True).meta()
    assert meta["parent_run"] == str(parent.run_dir) and meta["parent_step"] == 20
    child.run()
    h = child.history.set_index("step")
    assert list(h.index) == list(range(1, 41))
    assert h.loc[20, "train_loss"] == parent.history.set_index("step").loc[20, "train_loss"]
    assert h.loc[21, "lr"] == pytest.approx(5e-3) and h.loc[20, "lr"] == pytest.approx(1e-3)
    ev = child.events
    assert ((ev["kind"] == "control") & (ev["step"] == 21)).any()
    assert ((ev["kind"] == "fork") & (ev["step"] == 20)).any()
    # default: fork from the newest checkpoint
    child2 = parent.fork(run_dir=tmp_path / "child2", batch_size=32)
    assert child2.step_count == 40


def test_config_that_disagrees_with_the_checkpoint_is_reported_field_by_field(tmp_path):
    tr = saved_run(tmp_path, steps=20)
    given = dict(cfg_for(tr.run_dir, max_steps=20, checkpoint_every=10, keep_checkpoints=10), lr=0.5, batch_size=8)
    with pytest.warns(UserWarning) as record:
        resumed = Trainer.from_checkpoint(tr.run_dir, cfg=given)
    text = " ".join(str(w.message) for w in record)
    assert "lr: checkpoint 0.001, given 0.5" in text and "batch_size: checkpoint 64, given 8" in text
    assert resumed.controls.lr == 1e-3


def test_a_new_trainer_refuses_a_run_dir_that_holds_a_run(tmp_path):
    tr = saved_run(tmp_path, steps=10)
    with pytest.raises(ValueError, match=r"run_dir: .* already holds a run \(up to step 10\).*from_checkpoint"):
        Trainer(cfg_for(tr.run_dir, max_steps=10))
