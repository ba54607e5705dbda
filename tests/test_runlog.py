"""workbench.runlog: the run's record in memory, and its way to the run directory.

The history has a row per step (step, epoch, train loss, lr, batch size, precision, grad norm, samples/s),
evals and per-layer rows at their steps, the same rows as the run's SQLite file; the polling reads the views
use (event_count/event_list, layer_count/layer_columns) give the rows of those tables, also for a record
loaded from the run directory; a downsampled series keeps the extremes.
"""
from __future__ import annotations

import torch

from workbench import Trainer, TrainConfig
from workbench.rundir import RunDB

from conftest import make_mlp


def test_a_row_per_step_evals_and_layer_rows_at_their_steps_and_the_same_rows_on_disk(runs_root):
    tr = Trainer(dataset="breast_cancer", model="mlp", max_steps=50, max_epochs=None, seed=0, eval_every=10,
                 layer_every=10, runs_root=str(runs_root))
    tr.run()
    h = tr.history
    for col in ("step", "epoch", "train_loss", "lr", "batch_size", "precision", "grad_norm", "samples_per_s"):
        assert col in h.columns
    assert h["step"].tolist() == list(range(1, 51))
    assert list(tr.evals["step"]) == [10, 20, 30, 40, 50]
    assert tr.evals["val_acc"].between(0, 1).all()
    lh = tr.layer_history
    assert sorted(set(lh["step"])) == [10, 20, 30, 40, 50]
    assert set(lh["layer"]) == {n for n, _ in tr.model.named_parameters()}
    assert (lh["update_ratio"] > 0).all()
    rd = tr.run_dir
    assert (rd / "config.yaml").exists() and (rd / "run.db").exists() and any((rd / "tb").iterdir())
    cfg = TrainConfig.from_yaml(rd / "config.yaml")
    assert cfg.seed == 0 and cfg.dataset == "breast_cancer"
    text = (rd / "config.yaml").read_text()
    assert "resolved:" in text and "torch:" in text
    db = RunDB(rd / "run.db", readonly=True)
    assert db.read_steps()["train_loss"].tolist() == h["train_loss"].tolist()
    assert len(db.read_layers()) == len(lh)


def test_a_downsampled_series_keeps_the_extremes(runs_root):
    tr = Trainer(dataset="wine", max_steps=300, max_epochs=None, seed=0, runs_root=str(runs_root),
                 eval_every=0, tensorboard=False)
    tr.run()
    x, y = tr.series("train_loss", n_out=100)
    assert len(x) <= 100
    full = tr.history["train_loss"]
    assert y.max() == full.max() and y.min() == full.min()


def test_polling_reads_give_the_rows_of_the_tables_also_after_a_resume(tiny_data, tmp_path):
    tr = Trainer(dict(max_steps=None, max_epochs=None, batch_size=32, eval_every=0, seed=1, checkpoint_every=10,
                      layer_every=5, run_dir=str(tmp_path / "run"), tensorboard=False),
                 model=make_mlp(), train_data=tiny_data, loss_fn=torch.nn.CrossEntropyLoss())
    tr.start(paused=True)
    assert tr.step(20).wait(30).status == "applied"
    tr.stop().wait(30)
    tr.join(30)
    new = tr.continue_from(tr.run_dir / "checkpoints" / "step-00000010.pt")  # its log read back from run.db
    events = new.events
    assert new.event_count == len(events) and len(new.event_list(2)) == len(events) - 2
    assert [e["kind"] for e in new.event_list(2)] == events["kind"].tolist()[2:]
    cols = tr.layer_columns()
    assert tr.layer_count == len(cols["step"]) == len(tr.layer_history) > 0
    assert [tr.layer_names[int(i)] for i in cols["layer"]] == tr.layer_history["layer"].tolist()
