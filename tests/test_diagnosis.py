"""Diagnosis behaviour: policies (pause, rollback), one alert per episode, dismissal, actions, resume."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workbench import Trainer
from workbench.checkpoint import load_checkpoint
from workbench.diagnosis import Action, Alert
from workbench.diagnosis.data_checks import preflight
from workbench.scenarios import get, scenario_config


def test_rollback_recovers_from_a_pushed_divergence(runs_root):
    """lr x100 via set(): the run rewinds to the last good state, lowers the lr, carries on, ends finite."""
    tr = Trainer(dataset="digits", model="mlp", optimizer="sgd", lr=0.05, momentum=0.9, max_steps=500,
                 max_epochs=None, on_divergence="rollback", good_state_every=25, checkpoint_every=50,
                 keep_checkpoints=20, eval_every=50, seed=0, runs_root=str(runs_root), tensorboard=False)

    def hook(ctx):
        if ctx.step == 150:
            tr.set(lr=5.0, source="notebook")
    tr.on("step_end", hook)
    tr.run()
    assert tr.status == "finished"
    h = tr.history.set_index("step")
    before = float(h.loc[130:150, "train_loss"].median())
    div = [a for a in tr.alerts if a.kind == "divergence"]
    assert div and div[0].step > 150
    ev = tr.events
    rb = ev[ev["kind"] == "rollback"]
    assert len(rb) >= 1
    first = rb.iloc[0]["data"]
    assert first["to_state_of_step"] <= 150
    assert first["lr_new"] == pytest.approx(min(first["lr_old"] * 0.1, 0.05))  # never above the good state's lr
    episode = h.loc[151:div[-1].step, "train_loss"]
    worst = episode[np.isfinite(episode)].max() if np.isfinite(episode).any() else math.inf
    final = float(h["train_loss"].iloc[-20:].median())
    assert math.isfinite(final) and final < worst and final < before * 1.5
    assert tr.controls.lr < 5.0
    assert ((ev["kind"] == "control") & (ev["source"] == "policy")).any()
    # a non-finite state never became a checkpoint
    for path in tr.checkpoints["path"]:
        state = load_checkpoint(path)["state"]["model"]
        assert all(torch.isfinite(t).all() for t in state.values())


def test_pause_policy_explains_then_the_action_recovers(runs_root):
    tr = Trainer(scenario_config("lr_too_high", runs_root=str(runs_root), tensorboard=False, good_state_every=5,
                                 on_divergence="pause"))
    alerts = []
    tr.on("alert", lambda ctx: alerts.append(dict(ctx.data)))
    tr.start()
    deadline = 60
    import time
    t0 = time.time()
    while tr.status != "paused" and time.time() - t0 < deadline:
        time.sleep(0.02)
    assert tr.status == "paused"
    div = next(a for a in tr.alerts if a.kind == "divergence")
    assert div.severity == "critical" and "learning rate" in div.message
    assert any(a["kind"] == "divergence" for a in alerts)
    assert tr.diagnose()["health"] == "critical"
    assert ((tr.events["kind"] == "policy") & (tr.events["source"] == "policy")).any()
    # the pause policy keeps no in-memory ring: "roll back" falls back to the newest finite checkpoint,
    # which does not exist yet -> refused with a reason; lowering the lr (action 1) works
    req = tr.apply_action(div.id, 1).wait(10)
    assert req.status == "applied"
    assert tr.controls.lr == pytest.approx(0.3)
    with pytest.raises(ValueError, match="index"):
        tr.apply_action(div.id, 7)
    tr.stop()
    tr.join(20)


def test_one_alert_per_episode_and_dismissal_mutes(runs_root):
    tr = Trainer(scenario_config("lr_too_low", runs_root=str(runs_root), tensorboard=False, max_steps=400))
    seen = []

    def hook(ctx):
        kinds = [a for a in tr.alerts if a.kind == "lr_too_low"]
        if kinds and not seen:
            seen.append(kinds[0].id)
            tr.dismiss(kinds[0].id, source="notebook")
    tr.on("step_end", hook)
    tr.run()
    low = [a for a in tr.alerts if a.kind == "lr_too_low"]
    assert len(low) == 1 and low[0].dismissed
    assert "lr_too_low" in tr.diagnose()["muted"]
    assert all(a.kind != "lr_too_low" for a in tr.diagnose()["alerts"])
    ev = tr.events
    d = ev[ev["kind"] == "dismiss"]
    assert len(d) == 1 and d.iloc[0]["source"] == "notebook" and d.iloc[0]["data"]["kind"] == "lr_too_low"
    # the same scenario without dismissal: still one lr_too_low alert in 400 steps (one per episode)
    tr2 = Trainer(scenario_config("lr_too_low", runs_root=str(runs_root), tensorboard=False, max_steps=400))
    tr2.run()
    assert sum(a.kind == "lr_too_low" for a in tr2.alerts) == 1


def test_alerts_and_detector_state_survive_resume(runs_root):
    tr = Trainer(scenario_config("lr_too_low", runs_root=str(runs_root), tensorboard=False, max_steps=200))
    tr.run()
    before = [(a.id, a.kind, a.step) for a in tr.alerts]
    assert before
    resumed = Trainer.from_checkpoint(tr.run_dir)
    assert [(a.id, a.kind, a.step) for a in resumed.alerts] == before
    ckpt = load_checkpoint(tr.checkpoints.iloc[-1]["path"])
    assert ckpt["state"]["detectors"]["alerts"]


def test_apply_action_with_controls_and_advice(runs_root):
    tr = Trainer(dataset="wine", max_steps=100_000, max_epochs=None, seed=0, runs_root=str(runs_root),
                 tensorboard=False, eval_every=0)
    tr.start(paused=True)
    alert = Alert("plateau", "info", 0, "a. b. c.", "numbers", actions=[Action("Lower the lr", {"lr": 1e-4}),
                                                                       Action("Advice", hint="schedule=plateau")])
    tr.watch.diagnoser.alerts.append(alert)  # as a detector would, to test the action path alone
    assert tr.apply_action(alert.id, 0, source="dashboard").wait(10).status == "applied"
    assert tr.controls.lr == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="advice"):
        tr.apply_action(alert.id, 1)
    with pytest.raises(ValueError, match="alert_id"):
        tr.dismiss(99999)
    tr.stop()
    tr.join(10)


def test_preflight_checks_each_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g)
    y = torch.randint(0, 3, (300,), generator=g)
    ok = torch.utils.data.TensorDataset(x, y)
    assert preflight(ok, torch.utils.data.TensorDataset(x[:50] + 10, y[:50]), "classification") == []
    x_nan = x.clone()
    x_nan[3, 2] = float("nan")
    kinds = {a.kind for a in preflight(torch.utils.data.TensorDataset(x_nan, y), None, "classification")}
    assert kinds == {"nan_inputs"}
    big = torch.utils.data.TensorDataset(x * 1000, y)
    assert {a.kind for a in preflight(big, None, "classification")} == {"unnormalized_inputs"}
    y_imb = torch.zeros(300, dtype=torch.long)
    y_imb[:10] = 1
    assert {a.kind for a in preflight(torch.utils.data.TensorDataset(x, y_imb), None, "classification")} == \
        {"class_imbalance"}
    leak = preflight(ok, torch.utils.data.TensorDataset(x[:40], y[:40]), "classification")
    assert [a.kind for a in leak] == ["data_leakage"] and "40 of 40" in leak[0].evidence


def test_healthy_teaching_preset_is_documented():
    sc = get("healthy")
    assert sc.expect is None and sc.watch
    with pytest.raises(ValueError, match="scenario.*allowed: lr_too_high"):
        get("nope")


def test_median_helper_equals_numpy() -> None:
    """The detectors' fast median gives np.median's value exactly, NaN and inf included."""
    from workbench.diagnosis.base import median

    rng = np.random.default_rng(0)
    for n in [*range(1, 20), 50, 511, 512, 513, 2000]:
        for _ in range(20):
            a = rng.standard_normal(n) * 10.0 ** rng.integers(-5, 5)
            if rng.random() < 0.3:
                a[rng.integers(n)] = rng.choice([np.nan, np.inf, -np.inf])
            if rng.random() < 0.1:
                a[:] = np.inf
            want, got = float(np.median(a)), median(a)
            assert (np.isnan(want) and np.isnan(got)) or want == got, (a, want, got)


def test_dead_unit_probe_in_slices_judges_like_the_whole_batch() -> None:
    """After its first whole-batch check the dead-unit detector runs the probe a slice per check and
    judges once every slice has run: the same verdict as one pass over the whole batch."""
    from workbench.diagnosis.base import UNCHANGED, Signals
    from workbench.diagnosis.dead_units import DeadUnits
    from workbench.diagnosis.diagnoser import ActivationProbe

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    with torch.no_grad():
        net[0].bias[:24] = -100.0  # 24 of 32 units can never fire: 75% dead
    probe = ActivationProbe(net, torch.randn(100, 4))
    rows: list[int] = []
    net[0].register_forward_hook(lambda _m, inp, _out: rows.append(len(inp[0])))
    whole = probe()["1"]
    sliced = np.zeros(32, bool)
    for part in range(7):  # slices of uneven length cover the batch exactly once
        sliced |= probe(part, 7)["1"]
    assert rows[0] == 100 and sum(rows[1:]) == 100 and max(rows[1:]) <= 15
    assert (sliced == whole).all() and whole.sum() == 8

    assert probe.parts == 1  # a small model: slicing its probe would cost more than it saves
    signals = Signals(step=20, history={}, evals={}, layers=None, task="classification", n_classes=2,
                      planned_steps=None, controls={"lr": 0.1}, initial_loss=None, probe_activations=probe)
    rows.clear()
    det = DeadUnits(every=10, span=40)  # 4 checks per round
    first = det.check(signals)
    assert first is not None and first.kind == "dead_units" and rows == [100]  # the first check: whole batch
    verdicts = [det.check(signals) for _ in range(4)]
    assert verdicts[:3] == [UNCHANGED] * 3 and verdicts[3] is not None and rows == [100, 100]  # once a round

    probe.parts = 4  # as for a large model: a slice per check
    rows.clear()
    det = DeadUnits(every=10, span=40)
    det.check(signals)
    verdicts = [det.check(signals) for _ in range(4)]
    assert verdicts[:3] == [UNCHANGED] * 3 and verdicts[3] is not None and verdicts[3].kind == "dead_units"
    assert rows == [100, 25, 25, 25, 25]
    det.check(signals)  # one slice into the next round, then a checkpoint and a resume
    saved = det.state_dict()
    again = DeadUnits(every=10, span=40)
    again.load_state_dict(saved)
    assert again.part == 1 and again.primed and [again.check(signals) for _ in range(3)][-1] is not None


def test_a_check_put_off_by_a_step_still_sees_every_step_since_the_last_one() -> None:
    """When a checkpoint save puts the scheduled check off by one step (50 -> 51), the loss-spike
    detector must still examine step 41, the first step after the check at 40."""
    from workbench.diagnosis.base import Signals
    from workbench.diagnosis.loss_spike import LossSpike

    rng = np.random.default_rng(0)
    loss = 1.0 + 0.01 * rng.standard_normal(200)
    loss[140] = 50.0  # step 141
    steps = np.arange(1, 201, dtype=float)

    def signals(upto: int) -> Signals:
        return Signals(step=upto, history={"train_loss": loss[:upto], "step": steps[:upto]}, evals={},
                       layers=None, task="classification", n_classes=10, planned_steps=None,
                       controls={"lr": 0.1}, initial_loss=2.3)

    det = LossSpike()
    assert det.check(signals(140)) is None  # checks at 130 and 140 saw steps up to 140
    alert = det.check(signals(151))  # the check due at 150 ran at 151
    assert alert is not None and "at step 141" in alert.evidence
    assert det.check(signals(160)) is None  # steps 152-160 only: the spike is not reported again


def _overfit_signals(val: list[float], train: list[float]):
    """Signals after len(val) evals, one every 20 steps; ``train`` gives the train loss at each eval's step
    (interpolated in between)."""
    from workbench.diagnosis.base import Signals

    es = np.arange(1, len(val) + 1, dtype=float) * 20
    steps = np.arange(1, int(es[-1]) + 1, dtype=float)
    loss = np.interp(steps, es, np.asarray(train, dtype=float))
    return Signals(step=int(es[-1]), history={"train_loss": loss, "step": steps},
                   evals={"val_loss": np.asarray(val, dtype=float), "step": es}, layers=None,
                   task="classification", n_classes=10, planned_steps=None, controls={"lr": 1e-3},
                   initial_loss=2.3)


def _first_overfit_eval(val: list[float], train: list[float]) -> int | None:
    from workbench.diagnosis.overfitting import Overfitting

    det = Overfitting()
    for n in range(1, len(val) + 1):
        if det.check(_overfit_signals(val[:n], train[:n])) is not None:
            return n
    return None


def test_overfitting_is_found_through_a_dip_in_the_val_loss() -> None:
    """A val loss that climbs from 0.66 to 1.0 with one eval dipping on the way (the shape whose alert, read
    as "rose 4 evals in a row", moved by hundreds of steps between CPU kernel families) fires as soon as the
    median of the last evals is 10% above the best."""
    val = [0.97, 0.73, 0.66, 0.74, 0.70, 0.71, 0.69, 0.90, 0.93, 1.00, 0.98, 0.98, 1.19]
    train = [1.8, 1.5, 1.37, 1.25, 1.15, 1.05, 0.95, 0.81, 0.73, 0.64, 0.57, 0.44, 0.34]
    assert _first_overfit_eval(val, train) == 9


def test_overfitting_after_a_jump_then_a_slow_drift_back() -> None:
    """Memorised at once: the val loss doubles in two evals, then eases down a little each eval."""
    val = [0.87, 1.58, 1.74, 1.739, 1.726, 1.717, 1.712, 1.709]
    train = [0.72, 0.0025, 1e-4, 1e-4, 5e-5, 5e-5, 4e-5, 4e-5]
    assert _first_overfit_eval(val, train) == 6


@pytest.mark.parametrize("val, train", [
    # val wobbles 10-15% above its best at 0.063 with no upward trend (a healthy run near its floor)
    ([0.29, 0.14, 0.12, 0.069, 0.067, 0.073, 0.069, 0.063, 0.073, 0.072, 0.065, 0.070, 0.071, 0.070, 0.072],
     [0.34, 0.13, 0.076, 0.06, 0.026, 0.017, 0.010, 0.0066, 0.0044, 0.0042, 0.004, 0.0027, 0.0023, 0.0022,
      0.0016]),
    # val drifts up steadily but the train loss stands still: not memorising
    ([0.24, 0.23, 0.19, 0.15, 0.11, 0.14, 0.10, 0.095, 0.095, 0.093, 0.102, 0.104, 0.105, 0.106, 0.108],
     [0.37, 0.25, 0.21, 0.17, 0.12, 0.07, 0.062, 0.038, 0.039, 0.0395, 0.051, 0.041, 0.0445, 0.040, 0.039]),
])
def test_overfitting_stays_quiet_on_noise_and_on_a_flat_train_loss(val, train) -> None:
    assert _first_overfit_eval(val, train) is None


def test_kendall_tau() -> None:
    from workbench.diagnosis.overfitting import kendall_tau

    assert kendall_tau(np.arange(6.0)) == 1.0 and kendall_tau(-np.arange(6.0)) == -1.0
    assert kendall_tau(np.array([1.0, 1.0, 1.0])) == 0.0 and kendall_tau(np.array([2.0])) == 0.0
    assert kendall_tau(np.array([0.0, np.nan, 1.0, 2.0])) == 1.0
    assert kendall_tau(np.array([0.0, 2.0, 1.0])) == pytest.approx(1 / 3)
