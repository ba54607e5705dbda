"""workbench.checkpointing: checkpoints of a run while it trains.

* A save on demand works while the run goes on; periodic saves follow ``checkpoint_every``.
* The NaN guard: weights holding NaN/inf are never saved (a good checkpoint is never overwritten by them);
  a save on a layer-statistics step trusts only the parameters that step measured finite.
* Retention keeps the newest ``keep_checkpoints`` plus the best ``keep_best`` by the monitored metric;
  user-tagged ones always stay. Stale temporary files of an interrupted save are removed.
* The host copy reuses its buffers from save to save and keeps tied weights tied.
"""
from __future__ import annotations

import torch

from workbench import Trainer
from workbench.checkpoint import load_checkpoint
from workbench.checkpointing import host_copy

from conftest import cfg_for, saved_run, wait_for


def test_retention_keeps_newest_k_plus_best_k(tmp_path):
    tr = Trainer(cfg_for(tmp_path / "run", max_steps=90, checkpoint_every=10, eval_every=10, keep_checkpoints=2,
                         keep_best=1, lr=2e-2))
    tr.run()
    saved = tr.events[tr.events["kind"] == "checkpoint"]
    latest = {}
    for _, ev in saved.iterrows():
        latest[ev["data"]["path"]] = (ev["step"], ev["data"]["metric"], ev["time"])
    newest = sorted(latest, key=lambda p: (latest[p][0], latest[p][2]))[-2:]
    best = sorted(latest, key=lambda p: (latest[p][1], -latest[p][0]))[:1]
    expected = set(newest) | set(best)
    on_disk = {str(p) for p in (tr.run_dir / "checkpoints").glob("*.pt")}
    assert on_disk == expected
    assert set(tr.checkpoints["path"]) == expected
    # the best one follows the monitored metric
    best_step = int(tr.evals.loc[tr.evals["val_loss"].idxmin(), "step"])
    assert best_step in set(tr.checkpoints["step"])
    manual = tr.save_checkpoint(tag="keepme")
    assert manual.exists() and "keepme" in set(tr.checkpoints["tag"])


def test_save_checkpoint_on_demand_while_running(tmp_path):
    tr = Trainer(cfg_for(tmp_path / "run", max_steps=100_000))
    tr.start()
    wait_for(lambda: tr.step_count >= 5)
    path = tr.save_checkpoint(tag="midway")
    tr.stop()
    tr.join(20)
    assert path.exists() and load_checkpoint(path)["step"] > 0


def test_nan_weights_are_never_saved_and_layer_norms_vouch_only_for_parameters(tmp_path):
    """A periodic save on a layer-statistics step skips checking the parameters whose norms that step
    found finite, and nothing else: a NaN buffer, or NaN parameters, still stop the save."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    tr = Trainer(cfg_for(tmp_path / "run", max_steps=None, checkpoint_every=5, layer_every=5, eval_every=0,
                         on_divergence="ignore"), model=model)
    ckdir = tr.run_dir / "checkpoints"

    def five_steps() -> None:  # and wait for the save at their end (a step request resolves before it)
        target = tr.step_count + 5
        assert tr.step(5).wait(30).status == "applied"
        wait_for(lambda: ((tr.events["step"] == target) & tr.events["kind"].str.startswith("checkpoint")).any())

    tr.start(paused=True)
    five_steps()
    with torch.no_grad():
        model[1].running_var[0] = float("nan")  # a buffer: the training forward does not read it
    five_steps()
    with torch.no_grad():
        model[1].running_var.fill_(1.0)
        model[3].bias[0] = float("nan")  # a parameter: every later loss, grad and update is NaN
    five_steps()
    tr.stop().wait(30)
    tr.join(30)
    skipped = tr.events.query("kind == 'checkpoint_skipped'")["step"].tolist()
    assert skipped == [10, 15, 15]  # the last: the save when the run stops
    assert (ckdir / "step-00000005.pt").exists() and not list(ckdir.glob("step-0000001[05].pt"))
    assert all(torch.isfinite(t).all() for t in load_checkpoint(ckdir / "step-00000005.pt")["state"]["model"].values()
               if t.is_floating_point())


def test_stale_temporary_files_are_removed_when_a_trainer_opens_the_run(tmp_path):
    tr = saved_run(tmp_path, steps=10)
    stale = tr.run_dir / "checkpoints" / ".step-00000010.pt.abc123.tmp"
    stale.write_bytes(b"partial")
    Trainer.from_checkpoint(tr.run_dir)
    assert not stale.exists()


def test_host_copy_reuses_buffers_and_keeps_tied_weights_tied():
    w = torch.randn(8, 4)
    state = {"model": {"enc": w, "dec": w, "b": torch.zeros(4)}, "opt": [{"m": torch.ones(3)}, 7], "rng": (1, 2)}
    buffers: dict = {}
    first = host_copy(state, buffers)
    assert first["model"]["enc"] is first["model"]["dec"]  # one buffer, as torch.save would store it
    assert first["model"]["enc"].data_ptr() != w.data_ptr() and torch.equal(first["model"]["enc"], w)
    assert first["opt"][1] == 7 and first["rng"] == (1, 2) and first["model"] is not state["model"]
    w.add_(1)
    second = host_copy(state, buffers)
    assert second["model"]["enc"] is first["model"]["enc"]  # the same host memory, refreshed
    assert torch.equal(second["model"]["enc"], w) and len(buffers) == 3
