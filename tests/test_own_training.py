"""Your own training, steered live: a user's model, batch structure, data loader, optimizer, scheduler and metrics.

* A small Transformer LM on text from Python's own library trains; a live ``set(lr=...)`` lands at the next
  step boundary; a bf16 switch mid-run works on CPU; ``val_acc`` is a token accuracy (<= 1) and perplexity is
  recorded.
* Dict batches with a dict-returning model, a Hugging Face style ``.loss`` model, a ``step_fn``, user SGD param
  groups with a user StepLR, an IterableDataset and a shuffled DataLoader with a padding ``collate_fn``: each
  trains, evaluates, checkpoints, and stopped in one process and resumed in another ends bit-identical to a run
  that never stopped.
* The user's optimizer groups keep their lr ratio through ``set(lr=...)``, the schedule and a resume, and the
  checkpoint holds that optimizer's state.
* A live batch-size change on data the workbench does not sample is refused, naming why.
* User metrics and the built-in F1/AUC reach ``tr.evals``, the run directory, TensorBoard; early stopping
  monitors one.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from workbench import Trainer
from workbench.checkpoint import load_checkpoint
from workbench.rundir import RunDB

import own_cases
from own_cases import make, trainer

HERE = Path(__file__).resolve().parent


def worker(spec: dict, tmp: Path) -> str:
    path = tmp / f"spec-{spec.get('stop_at')}-{bool(spec.get('resume'))}.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(HERE / "own_cases.py"), str(path)], capture_output=True, text=True,
                          timeout=240, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def final_weights(run_dir: Path) -> dict:
    ckpts = RunDB(run_dir / "run.db", readonly=True).read_checkpoints().sort_values("step")
    return load_checkpoint(ckpts.iloc[-1]["path"])["state"]["model"]


RESUME_CASES = {
    "lm": dict(stop=25, live={"10": {"lr": 1e-3}, "30": {"precision": "bf16"}}),
    "dict": dict(stop=27, live={"12": {"batch_size": 20}}),
    "hf": dict(stop=30, live={}),
    "step_fn": dict(stop=33, live={"5": {"lr": 2e-2}}),
    "groups": dict(stop=31, live={"20": {"lr": 0.05}}),
    "iterable": dict(stop=9, live={}),       # mid-epoch: 7 batches per epoch
    "loader": dict(stop=17, live={}),        # mid-epoch: 13 batches per epoch
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_own_training_resumes_in_a_new_process_bit_identical(case, tmp_path):
    c = RESUME_CASES[case]
    ref = trainer(case, tmp_path / "ref")
    live = {int(k): v for k, v in c["live"].items()}
    ref.on("step_end", lambda ctx: ref.set(**live[ctx.step]) if ctx.step in live else None)
    ref.run()
    assert ref.status == "finished" and ref.step_count == 60
    assert len(ref.evals) == 3 and ref.evals["val_loss"].map(math.isfinite).all()

    run_dir = tmp_path / "run"
    assert worker({"case": case, "run_dir": str(run_dir), "stop_at": c["stop"], "live": c["live"]},
                  tmp_path) == f"stopped {c['stop']}"
    assert worker({"case": case, "run_dir": str(run_dir), "resume": True, "live": c["live"]},
                  tmp_path) == "finished 60"
    steps = RunDB(run_dir / "run.db", readonly=True).read_steps()
    assert steps["step"].tolist() == list(range(1, 61))
    assert steps["train_loss"].tolist() == ref.history["train_loss"].tolist()
    assert steps["lr"].tolist() == ref.history["lr"].tolist()
    evals = RunDB(run_dir / "run.db", readonly=True).read_evals()
    assert evals["val_loss"].tolist() == ref.evals["val_loss"].tolist()
    a, b = final_weights(tmp_path / "ref"), final_weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_transformer_lm_live_lr_bf16_token_accuracy_and_perplexity(runs_root):
    tr = trainer("lm", None, runs_root=str(runs_root), max_steps=40)
    tr.start(paused=True)
    tr.step(10).wait(30)
    req = tr.set(lr=1e-3)
    req.wait(30)
    assert req.status == "applied" and req.step == 11
    tr.set(precision="bf16").wait(30)
    tr.resume()
    assert tr.join(120) == "finished"
    hist = tr.history
    assert hist.loc[hist["step"] == 10, "lr"].item() == pytest.approx(3e-3 * 10 / 20)
    assert hist.loc[hist["step"] == 11, "lr"].item() == pytest.approx(1e-3 * 11 / 20)
    assert set(hist.loc[hist["step"] > 11, "precision"]) == {"bf16"}
    ev = tr.evals
    assert ev["val_acc"].between(0, 1).all()
    assert (ev["val_ppl"] - ev["val_loss"].map(math.exp)).abs().max() < 1e-6 * ev["val_ppl"].max()
    assert ev["val_ppl"].iloc[-1] < len(own_cases.VOCAB)   # better than a uniform guess over the characters


def test_user_param_groups_keep_their_ratio_through_set_schedule_and_checkpoint(runs_root):
    tr = trainer("groups", None, runs_root=str(runs_root), max_steps=60)
    opt = tr.optimizer
    assert tr.controls.lr == 0.01 and tr.cfg.optimizer == "custom" and tr.cfg.schedule == "custom"
    tr.start(paused=True)
    tr.step(30).wait(30)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == pytest.approx([0.005, 0.05])          # StepLR halved both at step 25
    tr.set(lr=0.04).wait(30)
    tr.step(1).wait(30)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.2])
    path = tr.save_checkpoint()
    state = load_checkpoint(path)["state"]
    assert len(state["optimizer"]["state"]) == 4          # momentum buffers of the user's SGD, not a built-in one
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([0.02, 0.2])
    assert state["schedule"]["scheduler"]["base_lrs"] == pytest.approx([0.04, 0.4])
    tr.stop()
    tr.join(30)
    with pytest.raises(AttributeError, match="optimizer"):
        tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=0.1)


def test_weight_decay_spares_groups_made_without_it(runs_root):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3)
    args = make("dict", None, runs_root=str(runs_root), max_steps=5)
    tr = Trainer(**{**args, "model": model, "optimizer": opt})
    assert tr.controls.weight_decay == 0.01
    tr.start(paused=True)
    assert tr.set(weight_decay=0.1).wait(30).status == "applied"
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    tr.stop()
    tr.join(30)


def test_schedule_factory_and_multiplier(runs_root):
    args = make("dict", None, runs_root=str(runs_root), max_steps=10)
    tr = Trainer(**{**args, "optimizer": lambda params: torch.optim.SGD(params, lr=0.1),
                    "schedule": lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)})
    tr.run()
    assert tr.history["lr"].tolist() == pytest.approx([0.1 * 0.5 ** s for s in range(10)])
    args = make("dict", None, runs_root=str(runs_root), max_steps=10)
    tr = Trainer(**{**args, "schedule": lambda step: 1.0 / (step + 1)})
    tr.run()
    assert tr.history["lr"].tolist() == pytest.approx([1e-3 / (s + 1) for s in range(10)])


@pytest.mark.parametrize("case", ["iterable", "loader"])
def test_batch_size_change_on_loader_data_is_refused_naming_why(case, runs_root):
    tr = trainer(case, None, runs_root=str(runs_root), max_steps=5)
    with pytest.raises(ValueError, match="batch_size: cannot change.*map-style Dataset"):
        tr.set(batch_size=8)
    tr.set(lr=1e-2)  # other controls still change
    tr.run()
    assert tr.status == "finished" and tr.history["lr"].iloc[0] == pytest.approx(1e-2)


def test_iterable_epochs_end_where_the_stream_ends(runs_root):
    tr = trainer("iterable", None, runs_root=str(runs_root), max_steps=None, max_epochs=2, eval_every=0)
    tr.run()
    assert tr.status == "finished" and tr.step_count == 14     # 200 samples in batches of 32: 7 per epoch
    assert tr.history["epoch"].tolist() == [0] * 7 + [1] * 7
    assert tr.evals["step"].tolist() == [7, 14]                 # evaluated at each epoch's end


def test_user_metrics_f1_auc_and_early_stopping_on_one(runs_root):
    from sklearn.metrics import f1_score, roc_auc_score

    seen = {}

    def balanced_acc(preds, targets):
        seen["shapes"] = (tuple(preds.shape), tuple(targets.shape))
        hit = preds.argmax(-1) == targets
        return 0.5 * (hit[targets == 0].float().mean() + hit[targets == 1].float().mean())

    args = make("dict", None, runs_root=str(runs_root), max_steps=300, max_epochs=None, eval_every=10,
                tensorboard=True, monitor="val_auc", monitor_mode="max", early_stopping_patience=2, min_delta=0.02)
    tr = Trainer(**{**args, "metrics": {"balanced_acc": balanced_acc}})
    tr.run()
    ev = tr.evals
    assert {"val_f1", "val_auc", "val_balanced_acc"} <= set(ev.columns)
    assert seen["shapes"] == ((64, 2), (64,))
    assert tr.status == "finished" and tr.step_count < 300     # early stopping on val_auc
    assert any(e["kind"] == "early_stop" and e["data"]["monitor"] == "val_auc" for e in tr.event_list())
    # the built-in F1/AUC agree with scikit-learn's on the final weights
    val = tr.val_data
    with torch.no_grad():
        logits = tr.model(val.x)["logits"]
    probs = torch.softmax(logits, -1)[:, 1]
    from workbench.evalmetrics import binary_f1, roc_auc
    assert binary_f1(probs, val.y.bool()) == pytest.approx(f1_score(val.y, (probs > 0.5).long()))
    assert roc_auc(probs, val.y.bool()) == pytest.approx(roc_auc_score(val.y, probs))
    stored = RunDB(tr.run_dir / "run.db", readonly=True).read_eval_metrics()
    assert stored["val_balanced_acc"].tolist() == pytest.approx(ev["val_balanced_acc"].tolist())
    tr.runlog.recorder.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tr.run_dir / "tb")).Reload()
    assert {"val/f1", "val/auc", "val/balanced_acc"} <= set(acc.Tags()["scalars"])


def test_torchmetrics_objects_are_updated_per_batch(runs_root):
    torchmetrics = pytest.importorskip("torchmetrics")
    args = make("dict", None, runs_root=str(runs_root), max_steps=20, eval_every=10)
    tr = Trainer(**{**args, "metrics": {"f1_macro": torchmetrics.F1Score(task="multiclass", num_classes=2,
                                                                          average="macro")}})
    tr.run()
    assert tr.evals["val_f1_macro"].between(0, 1).all() and len(tr.evals) == 2


@pytest.mark.parametrize("bad, match", [
    (dict(optimizer=42), "optimizer: got int"),
    (dict(schedule=3.5), "schedule: got float"),
    (dict(metrics={"acc": lambda p, t: 0.0}), "built in"),
    (dict(metrics=["f1"]), "metrics: got list"),
    (dict(step_fn="loss"), "step_fn: got str"),
    (dict(train_data=42), "train_data: got int"),
    (dict(output_key=3), "output_key"),
])
def test_unsupported_objects_are_refused_naming_what_is_allowed(bad, match, runs_root):
    args = make("dict", None, runs_root=str(runs_root), max_steps=5)
    with pytest.raises((ValueError, TypeError), match=match) as err:
        Trainer(**{**args, **bad})
    assert "allowed" in str(err.value)


def test_a_batch_the_contract_cannot_read_fails_the_run_with_what_is_supported(runs_root):
    args = make("step_fn", None, runs_root=str(runs_root), max_steps=5)
    del args["step_fn"]
    tr = Trainer(**{**args, "loss_fn": nn.MSELoss()})
    tr.start()
    with pytest.raises(Exception, match="allowed: an \\(input, target\\) pair, a dict"):
        tr.join(30)
    assert tr.status == "failed"


def test_a_failure_in_evaluation_is_named_as_the_evaluation(runs_root):
    class FailsInEval(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 2)

        def forward(self, x):
            if not self.training:
                raise RuntimeError("no eval path")
            return self.lin(x)
    args = make("dict", None, runs_root=str(runs_root), max_steps=10, eval_every=3)
    tr = Trainer(**{**args, "model": FailsInEval()})
    tr.start()
    with pytest.raises(Exception, match="training failed in the evaluation after step 3: RuntimeError: no eval path"):
        tr.join(30)


def test_a_monitor_no_evaluation_measures_is_refused(runs_root):
    args = make("dict", None, runs_root=str(runs_root), max_steps=10, eval_every=5)
    with pytest.raises(ValueError, match="monitor: got 'val_f2'.*allowed: val_loss, val_acc, val_ppl, val_f1"):
        Trainer(**{**args, "monitor": "val_f2"})
    tr = Trainer(dataset="wine", model="mlp", max_steps=10, eval_every=5, monitor="val_f1", monitor_mode="max",
                 runs_root=str(runs_root), seed=0)   # three classes: no F1 of a positive class
    tr.start()
    with pytest.raises(Exception, match="monitor: 'val_f1' is not measured.*record val_loss, val_acc"):
        tr.join(30)
    assert tr.status == "failed"


def test_fork_of_a_run_with_its_own_optimizer_and_scheduler_gets_copies(runs_root):
    tr = trainer("groups", None, runs_root=str(runs_root), max_steps=40, checkpoint_every=20)
    tr.run()
    at20 = tr.checkpoints.query("step == 20")["path"].iloc[0]
    child = tr.fork(at20, lr=0.02)
    assert child.optimizer is not tr.optimizer and child.lr_control.scheduler is not tr.lr_control.scheduler
    assert child.lr_control.scheduler.optimizer is child.optimizer
    own = {id(p) for p in child.model.parameters()}
    assert all(id(p) in own for g in child.optimizer.param_groups for p in g["params"])
    child.run()
    assert child.status == "finished" and child.step_count == 40 and child.history["step"].min() == 1
    assert child.history.query("step > 20")["lr"].iloc[0] == pytest.approx(0.02)
    lrs = [g["lr"] for g in child.optimizer.param_groups]
    assert lrs[1] / lrs[0] == pytest.approx(10.0) and lrs[0] == pytest.approx(0.02 * 0.5)   # StepLR at 25
    assert [g["lr"] for g in tr.optimizer.param_groups] == pytest.approx([0.005, 0.05])    # the parent's untouched


def test_views_say_what_a_run_cannot_change_and_show_its_other_metrics(runs_root):
    from workbench.chartdata import chart_data
    from workbench.figures import all_figures
    from workbench.handle import open_run
    from workbench.notebook.widget import status_text

    tr = trainer("iterable", None, runs_root=str(runs_root), max_steps=14, eval_every=7)
    p = tr.panel()
    assert p.batch_size.disabled and "map-style Dataset" in p.batch_size.tooltip
    tr.run()
    assert "f1 " in status_text(tr) and "auc " in status_text(tr)
    for run in (tr, open_run(tr.run_dir)):
        assert run.fixed_controls == {"batch_size": tr.facts.fixed}
        assert {"val_f1", "val_auc"} <= set(run.eval_names)
        figs = all_figures(chart_data(run))
        assert {t.name for t in figs["metrics"].data} == {"f1", "auc"}
