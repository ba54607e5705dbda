"""workbench.loop: the trainer thread's step loop.

* The math is a hand-written loop's: same init, same data order, bit-identical losses and weights.
* A batch-size change mid-epoch still shows every sample once per epoch.
* Pause stops at a step boundary (no step runs while paused); ``step(n)`` runs exactly n steps and pauses
  again; resume continues.
* A run ends at ``max_steps``/``max_epochs`` or when early stopping's patience runs out.
* Mixed precision (bf16, fp16) runs on the CPU and can be switched on live; every schedule runs, and a live
  lr change rescales the schedule's shape from the next step on.
* The trainer thread's intra-op thread count is its own (chosen per step's work, or ``cpu_threads``), with an
  event saying why; the caller's count is untouched and restored for threads started later.
"""
from __future__ import annotations

import copy
import math
import threading
import time

import numpy as np
import pytest
import torch

from workbench import Trainer
from workbench.cputhreads import cpu_count
from workbench.sampler import epoch_permutation

from conftest import make_mlp, wait_for


def test_identical_losses_to_a_hand_written_loop(tiny_data, runs_root):
    """200 steps, fp32, same init and data order: the workbench does not change the math."""
    seed, bs, steps = 7, 16, 200
    model = make_mlp(1)
    ref = copy.deepcopy(model)
    tr = Trainer(model=model, train_data=tiny_data, loss_fn=torch.nn.CrossEntropyLoss(), optimizer="sgd",
                 lr=0.05, momentum=0.9, batch_size=bs, max_steps=steps, max_epochs=None, seed=seed,
                 runs_root=str(runs_root), eval_every=0, tensorboard=False)
    tr.run()

    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    x_all, y_all = tiny_data.tensors
    losses, epoch, pos = [], 0, 0
    perm = epoch_permutation(len(tiny_data), seed, 0)
    while len(losses) < steps:
        if pos >= len(perm):
            epoch, pos = epoch + 1, 0
            perm = epoch_permutation(len(tiny_data), seed, epoch)
        idx = perm[pos:pos + bs]
        pos += len(idx)
        loss = torch.nn.functional.cross_entropy(ref(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert tr.history["train_loss"].tolist() == losses
    for a, b in zip(tr.model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_batch_size_change_mid_epoch_sees_every_sample_once(tiny_data, runs_root):
    seen: list[tuple[int, tuple[int, ...]]] = []
    tr = Trainer(model=make_mlp(), train_data=tiny_data, batch_size=16, max_epochs=3, seed=3,
                 runs_root=str(runs_root), eval_every=0, tensorboard=False)

    def hook(ctx):
        seen.append((ctx.epoch if ctx.sample_ids is None else ctx.step, ctx.sample_ids))
        if ctx.step == 4:
            tr.set(batch_size=23)      # mid-epoch (64 of 200 samples seen)
        if ctx.step == 15:
            tr.set(batch_size=7)       # mid second epoch
    tr.on("step_end", hook)
    tr.run()
    h = tr.history
    assert tr.status == "finished"
    assert set(h["batch_size"]) == {16, 23, 7}
    epochs = h["epoch"].tolist()
    ids_by_epoch: dict[int, list[int]] = {}
    for (step, ids), ep in zip(seen, epochs):
        ids_by_epoch.setdefault(ep, []).extend(ids)
    assert sorted(ids_by_epoch) == [0, 1, 2]
    for ep, ids in ids_by_epoch.items():
        assert sorted(ids) == list(range(200)), f"epoch {ep}: a sample was skipped or repeated"


def test_pause_holds_the_run_step_runs_exactly_n_and_resume_goes_on(runs_root):
    tr = Trainer(dataset="wine", model="mlp", max_steps=100_000, max_epochs=None, seed=0,
                 runs_root=str(runs_root), eval_every=0, tensorboard=False)
    tr.start()
    wait_for(lambda: tr.step_count >= 3)
    tr.pause().wait(10)
    assert tr.status == "paused"
    n = tr.step_count
    time.sleep(0.3)
    assert tr.step_count == n, "steps ran while paused"
    req = tr.step(3).wait(10)
    assert req.status == "applied" and tr.step_count == n + 3
    time.sleep(0.2)
    assert tr.step_count == n + 3 and tr.status == "paused"
    assert len(tr.history) == n + 3
    tr.resume().wait(10)
    wait_for(lambda: tr.step_count >= n + 10)
    assert tr.status == "running"
    tr.stop().wait(10)
    assert tr.join(10) == "stopped"


def test_a_run_ends_when_early_stopping_runs_out_of_patience_or_at_max_epochs(runs_root):
    tr = Trainer(dataset="digits", model="mlp", model_options={"width": 256}, dataset_options={"n_samples": 120},
                 lr=3e-3, max_epochs=500, eval_every=5, early_stopping_patience=3, seed=0,
                 runs_root=str(runs_root), tensorboard=False)
    tr.run()
    assert tr.status == "finished"
    assert (tr.events["kind"] == "early_stop").any()
    assert tr.history["epoch"].max() < 499
    tr2 = Trainer(dataset="wine", max_epochs=2, batch_size=32, seed=0, runs_root=str(runs_root), eval_every=0,
                  tensorboard=False)
    tr2.run()
    n_train = len(tr2.train_data)
    assert tr2.status == "finished" and tr2.step_count == 2 * math.ceil(n_train / 32)
    assert len(tr2.evals) == 2  # eval_every=0: at each epoch end


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu_and_can_switch_live(precision, runs_root):
    tr = Trainer(dataset="digits", max_steps=60, max_epochs=None, seed=0, runs_root=str(runs_root),
                 eval_every=30, tensorboard=False)

    def hook(ctx):
        if ctx.step == 20:
            tr.set(precision=precision)
    tr.on("step_end", hook)
    tr.run()
    h = tr.history
    assert h.loc[h["step"] <= 20, "precision"].eq("fp32").all()
    assert h.loc[h["step"] > 20, "precision"].eq(precision).all()
    assert np.isfinite(h["train_loss"]).all() and h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "warmup_cosine", "step", "plateau", "onecycle"])
def test_schedules_run_and_set_lr_rescales_the_shape(schedule, runs_root):
    opts = {"step": {"step_size": 10}, "plateau": {"patience": 0}}.get(schedule, {})
    tr = Trainer(dataset="wine", max_steps=40, max_epochs=None, seed=0, lr=0.01, schedule=schedule,
                 schedule_options=opts, runs_root=str(runs_root), eval_every=5, tensorboard=False)

    def hook(ctx):
        if ctx.step == 20:
            tr.set(lr=0.02)
    tr.on("step_end", hook)
    tr.run()
    lr = tr.history.set_index("step")["lr"]
    factor_before = tr.lr_control.builtin.factor(19) if schedule != "plateau" else None
    if schedule == "constant":
        assert lr.loc[21] == pytest.approx(0.02) and lr.loc[20] == pytest.approx(0.01)
    elif schedule != "plateau":
        # the shape continues: lr(step) = base * factor(step - 1)
        assert lr.loc[20] == pytest.approx(0.01 * factor_before)
        assert lr.loc[21] == pytest.approx(0.02 * tr.lr_control.builtin.factor(20))
    assert lr.max() <= 0.02 + 1e-12


def _thread_events(tr):
    ev = tr.events
    return list(ev.loc[ev["kind"] == "cpu_threads", "data"])


def _threads_in_new_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    t.start()
    t.join()
    return out[0]


def test_trainer_thread_count_is_its_own_and_restored(tiny_data, runs_root):
    """A small model's trainer thread runs on one thread; the caller's count is untouched, and threads
    started after the run begin with the caller's count again (torch gives a new thread the last count
    set anywhere). A batch-size change re-decides at the boundary, with an event."""
    before = torch.get_num_threads()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 3))  # 12,003 params
    tr = Trainer(model=model, train_data=tiny_data, loss_fn=torch.nn.CrossEntropyLoss(), batch_size=16,
                 max_steps=100_000, max_epochs=None, seed=0, runs_root=str(runs_root), eval_every=0,
                 tensorboard=False, diagnose=False)
    tr.start()
    wait_for(lambda: tr.step_count >= 3)
    assert torch.get_num_threads() == before
    first = _thread_events(tr)[0]
    assert first["intra_op_threads"] == 1 and first["why"].startswith("auto")
    req = tr.set(batch_size=200).wait(10)  # 12,003 x 200 = 2.4e6 multiply-adds: the caller's count
    assert req.status == "applied"
    large = min(before, max(1, cpu_count() - 1))  # one CPU stays free for the views (workbench.cputhreads)
    if large > 1:
        wait_for(lambda: len(_thread_events(tr)) == 2)
        assert _thread_events(tr)[1]["intra_op_threads"] == large
    tr.stop().wait(10)
    tr.join(10)
    assert torch.get_num_threads() == before
    assert _threads_in_new_thread() == before


def test_cpu_threads_setting_is_used(tiny_data, runs_root):
    tr = Trainer(model=make_mlp(0), train_data=tiny_data, loss_fn=torch.nn.CrossEntropyLoss(), batch_size=16,
                 max_steps=3, max_epochs=None, seed=0, runs_root=str(runs_root), eval_every=0, tensorboard=False,
                 cpu_threads=2)
    tr.run()
    assert _thread_events(tr)[0]["intra_op_threads"] == 2 and _thread_events(tr)[0]["why"] == "cpu_threads=2"
