"""The Trainer's contract: same math as a hand-written loop, live controls, pause/step, failures, logs."""
from __future__ import annotations

import copy
import math
import subprocess
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from workbench import Trainer, TrainConfig, TrainingFailed
from workbench.rundir import RunDB
from workbench.sampler import epoch_permutation

from conftest import PYTHON, ROOT, make_mlp


def wait_for(cond, timeout=30.0, interval=0.01):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(interval)
    raise AssertionError("condition not met in time")


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


def test_set_lr_from_another_thread_shows_at_the_next_step(runs_root):
    tr = Trainer(dataset="digits", model="mlp", max_steps=100_000, max_epochs=None, seed=0,
                 runs_root=str(runs_root), eval_every=0, tensorboard=False)
    tr.start()
    wait_for(lambda: tr.step_count >= 5)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("req", tr.set(lr=0.0123)))
    t.start()
    t.join()
    req = out["req"].wait(10)
    tr.stop().wait(10)
    tr.join(10)
    assert req.status == "applied"
    h = tr.history.set_index("step")
    assert h.loc[req.step, "lr"] == pytest.approx(0.0123)
    assert h.loc[req.step - 1, "lr"] == pytest.approx(1e-3)
    ev = tr.events
    ctl = ev[ev["kind"] == "control"].iloc[-1]
    assert ctl["step"] == req.step and ctl["source"] == "api"
    assert ctl["data"] == {"field": "lr", "old": 1e-3, "new": 0.0123}
    # the same record is in the run's SQLite event log
    db_events = RunDB(tr.run_dir / "run.db", readonly=True).read_events()
    assert ((db_events["kind"] == "control") & (db_events["step"] == req.step)).any()


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


def test_pause_step_resume(runs_root):
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


def test_step_while_running_is_refused(runs_root):
    tr = Trainer(dataset="wine", max_steps=100_000, max_epochs=None, seed=0, runs_root=str(runs_root),
                 eval_every=0, tensorboard=False).start()
    req = tr.step(2).wait(10)
    tr.stop()
    tr.join(10)
    assert req.status == "refused" and "paused" in req.message


BAD_CONTROLS = [
    ({"lr": -0.1}, "lr"), ({"lr": 0}, "lr"), ({"lr": float("nan")}, "lr"), ({"lr": float("inf")}, "lr"),
    ({"lr": "fast"}, "lr"), ({"batch_size": 0}, "batch_size"), ({"batch_size": -4}, "batch_size"),
    ({"batch_size": 2.5}, "batch_size"), ({"batch_size": 10**6}, "batch_size"),
    ({"precision": "fp8"}, "precision"), ({"learning_rate": 0.1}, "learning_rate"),
    ({"grad_clip": -1.0}, "grad_clip"), ({"accumulate": 0}, "accumulate"), ({"weight_decay": -0.1}, "weight_decay"),
]


def test_bad_controls_raise_and_the_run_goes_on(runs_root):
    tr = Trainer(dataset="wine", max_steps=100_000, max_epochs=None, seed=0, runs_root=str(runs_root),
                 eval_every=0, tensorboard=False).start()
    wait_for(lambda: tr.step_count >= 2)
    before = tr.controls.state_dict()
    for controls, field in BAD_CONTROLS:
        with pytest.raises((ValueError, TypeError)) as err:
            tr.set(**controls)
        assert field in str(err.value), (controls, str(err.value))
        assert str(list(controls.values())[0])[:4] in str(err.value) or field == "learning_rate"
    n = tr.step_count
    wait_for(lambda: tr.step_count >= n + 5)
    assert tr.status == "running"
    assert tr.controls.state_dict() == before
    assert np.isfinite(tr.history["train_loss"]).all()
    tr.stop()
    assert tr.join(10) == "stopped"


def test_many_threads_may_set_at_once(runs_root):
    tr = Trainer(dataset="wine", max_steps=100_000, max_epochs=None, seed=0, runs_root=str(runs_root),
                 eval_every=0, tensorboard=False).start()
    reqs = []
    lock = threading.Lock()

    def worker(i):
        for j in range(5):
            r = tr.set(lr=1e-3 * (1 + i + 10 * j), source="notebook")
            with lock:
                reqs.append(r)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in reqs:
        assert r.wait(10).status == "applied"
    tr.stop()
    tr.join(10)
    assert len(reqs) == 40
    assert (tr.events["kind"] == "control").sum() >= 1


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


def test_failing_hook_is_disabled_not_fatal(runs_root):
    calls = []

    def bad(ctx):
        calls.append(ctx.step)
        raise KeyError("oops")
    tr = Trainer(dataset="wine", max_steps=20, max_epochs=None, seed=0, runs_root=str(runs_root),
                 eval_every=0, tensorboard=False)
    tr.on("step_end", bad)
    good = []
    handle = tr.on("step_end", lambda ctx: good.append(ctx.step))
    with pytest.warns(UserWarning, match="disabled"):
        tr.run()
    assert tr.status == "finished" and calls == [1]
    assert good == list(range(1, 21))
    assert (tr.events["kind"] == "hook_error").sum() == 1
    handle.remove()
    with pytest.raises(ValueError, match="step_end"):
        tr.on("step_ended", print)


def test_stop_and_set_from_inside_a_hook(runs_root):
    tr = Trainer(dataset="wine", max_steps=10_000, max_epochs=None, seed=0, runs_root=str(runs_root),
                 eval_every=0, tensorboard=False)

    def hook(ctx):
        if ctx.step == 5:
            tr.set(lr=0.002)
        if ctx.step == 9:
            tr.stop()
    tr.on("step_end", hook)
    tr.start()
    assert tr.join(20) == "stopped"
    assert tr.step_count == 9
    assert tr.history.set_index("step").loc[6, "lr"] == pytest.approx(0.002)


def test_early_stopping_and_max_epochs_finish(runs_root):
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
    factor_before = tr.schedule.factor(19) if schedule != "plateau" else None
    if schedule == "constant":
        assert lr.loc[21] == pytest.approx(0.02) and lr.loc[20] == pytest.approx(0.01)
    elif schedule != "plateau":
        # the shape continues: lr(step) = base * factor(step - 1)
        assert lr.loc[20] == pytest.approx(0.01 * factor_before)
        assert lr.loc[21] == pytest.approx(0.02 * tr.schedule.factor(20))
    assert lr.max() <= 0.02 + 1e-12


def test_tensorboard_reader_sees_the_same_train_loss(runs_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr = Trainer(dataset="moons", model="mlp", max_steps=80, max_epochs=None, seed=0, eval_every=20,
                 runs_root=str(runs_root))
    tr.run()
    acc = EventAccumulator(str(tr.run_dir / "tb"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "val/loss", "val/acc"} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("train/loss")
    h = tr.history
    assert [e.step for e in events] == h["step"].tolist()
    np.testing.assert_array_equal(np.array([e.value for e in events], dtype=np.float32),
                                  h["train_loss"].to_numpy(dtype=np.float32))
    assert [e.step for e in acc.Scalars("val/loss")] == tr.evals["step"].tolist()


def test_history_layers_and_run_directory(runs_root):
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


def test_downsampled_series_keeps_extremes(runs_root):
    tr = Trainer(dataset="wine", max_steps=300, max_epochs=None, seed=0, runs_root=str(runs_root),
                 eval_every=0, tensorboard=False)
    tr.run()
    x, y = tr.series("train_loss", n_out=100)
    assert len(x) <= 100
    full = tr.history["train_loss"]
    assert y.max() == full.max() and y.min() == full.min()


SECOND_PROCESS = textwrap.dedent("""
    import json, sys, time
    from workbench.rundir import RunDB
    db = RunDB(sys.argv[1], readonly=False)
    seen = 0
    end = time.time() + 30
    while time.time() < end:
        seen = len(db.read_steps())
        if seen >= 20:
            break
        time.sleep(0.05)
    ok = db.post_control({"lr": 0.004}, source="dashboard")
    bad = db.post_control({"lr": -1}, source="dashboard")
    out = {"seen": seen, "ok": db.wait_control(ok, 20), "bad": db.wait_control(bad, 20)}
    print(json.dumps(out, default=str))
""")


def test_second_process_reads_live_metrics_and_posts_controls(runs_root):
    import json

    tr = Trainer(dataset="digits", max_steps=1_000_000, max_epochs=None, seed=0, runs_root=str(runs_root),
                 eval_every=0, tensorboard=False).start()
    proc = subprocess.run([PYTHON, "-c", SECOND_PROCESS, str(tr.run_dir / "run.db")], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    tr.stop()
    tr.join(20)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["seen"] >= 20
    assert out["ok"]["status"] == "applied"
    step = out["ok"]["step"]
    assert tr.history.set_index("step").loc[step, "lr"] == pytest.approx(0.004)
    ev = tr.events
    assert ((ev["kind"] == "control") & (ev["source"] == "dashboard") & (ev["step"] == step)).any()
    assert out["bad"]["status"] == "refused" and "lr" in out["bad"]["message"]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*'lrr'.*valid keys: dataset"):
        TrainConfig.from_dict({"lrr": 0.1})
    with pytest.raises(ValueError, match="optimizer.*allowed: sgd, adam, adamw"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp64")
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")
    with pytest.raises(ValueError, match="schedule_options.*'warmup'"):
        TrainConfig(schedule="cosine", schedule_options={"warmup": 3})
    p = tmp_path / "c.yaml"
    p.write_text("dataset: wine\nlr: 3e-4\nbatch_size: 32\n")
    cfg = TrainConfig.from_yaml(p)
    assert cfg.lr == 3e-4 and cfg.batch_size == 32
    cfg.to_yaml(tmp_path / "d.yaml")
    assert TrainConfig.from_yaml(tmp_path / "d.yaml") == cfg
    p.write_text("dataset: wine\nbatchsize: 32\n")
    with pytest.raises(ValueError, match=r"c\.yaml.*'batchsize'"):
        TrainConfig.from_yaml(p)


def test_bad_construction_arguments(tiny_data, runs_root):
    with pytest.raises(ValueError, match="batch_size.*1 to 200"):
        Trainer(model=make_mlp(), train_data=tiny_data, batch_size=500, runs_root=str(runs_root))
    with pytest.raises(ValueError, match="dataset"):
        Trainer(dataset="mnist", runs_root=str(runs_root))
    with pytest.raises(ValueError, match="device.*cuda"):
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        Trainer(dataset="wine", device="cuda", runs_root=str(runs_root))


def test_user_dataset_without_tensors(runs_root):
    class Squares(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            x = torch.tensor([i / 64.0])
            return x, x ** 2
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    tr = Trainer(model=model, train_data=Squares(), val_data=Squares(), loss_fn=torch.nn.MSELoss(), batch_size=16,
                 max_steps=40, max_epochs=None, eval_every=20, seed=0, runs_root=str(runs_root), tensorboard=False)
    tr.run()
    assert tr.task == "regression" and tr.evals["val_acc"].isna().all()
    assert tr.history["train_loss"].iloc[-1] < tr.history["train_loss"].iloc[0]


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


def test_cpu_threads_policy():
    """One intra-op thread for a step under SMALL_STEP_WORK multiply-adds, else the caller's count;
    ``cpu_threads`` overrides; deterministic (sizes only)."""
    from workbench.cputhreads import SMALL_STEP_WORK, choose_threads

    assert choose_threads(None, 10_000, 64, 8)[0] == 1
    assert choose_threads(None, SMALL_STEP_WORK, 1, 8)[0] == 8
    n, why = choose_threads(3, 10, 1, 8)
    assert n == 3 and "cpu_threads=3" in why
    with pytest.raises(ValueError, match="cpu_threads"):
        TrainConfig(cpu_threads=0)
    with pytest.raises(TypeError, match="cpu_threads"):
        TrainConfig(cpu_threads="two")


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
    if before > 1:
        wait_for(lambda: len(_thread_events(tr)) == 2)
        assert _thread_events(tr)[1]["intra_op_threads"] == before
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
