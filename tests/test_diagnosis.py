"""workbench.diagnosis: the detectors and the diagnoser that runs them.

* One alert per episode; dismissing an alert mutes its detector for the rest of the run (logged with its
  source); alerts and detector state survive a resume.
* The pre-flight data checks find each problem (NaN inputs, unnormalised inputs, class imbalance, leakage
  between train and val) and nothing on clean data.
* The detectors' building blocks: the fast median equals numpy's; the dead-unit probe in slices judges like
  the whole batch, and resumes mid-round; a check put off by a step still sees every step since the last one.
* Overfitting is found through a dip in the val loss and after a jump and a slow drift back, and stays quiet
  on noise near the floor and on a flat train loss; Kendall's tau.

When detectors run and what the divergence policy does are specified in test_watch.py, going back to a
good state in test_rollback.py, and every teaching scenario's alert in tests/scenarios/.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench import Trainer
from workbench.checkpoint import load_checkpoint
from workbench.diagnosis.data_checks import preflight
from workbench.scenarios import scenario_config


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
    from workbench.diagnosis.dead_units import ActivationProbe

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


def test_kendall_tau_of_rising_falling_flat_and_nan_series() -> None:
    from workbench.diagnosis.overfitting import kendall_tau

    assert kendall_tau(np.arange(6.0)) == 1.0 and kendall_tau(-np.arange(6.0)) == -1.0
    assert kendall_tau(np.array([1.0, 1.0, 1.0])) == 0.0 and kendall_tau(np.array([2.0])) == 0.0
    assert kendall_tau(np.array([0.0, np.nan, 1.0, 2.0])) == 1.0
    assert kendall_tau(np.array([0.0, 2.0, 1.0])) == pytest.approx(1 / 3)
