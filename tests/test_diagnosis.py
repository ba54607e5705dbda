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
    median of the last evals is 20% above the best."""
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


# ===================================================================== runs the detectors were not written on
def _loud(tr) -> list:
    return [a for a in tr.alerts if a.severity in ("warning", "critical")]


def _lr_direction(alert) -> int:
    """+1 when the alert's first lr action raises the lr, -1 when it lowers it, 0 without one."""
    for act in alert.actions:
        if "lr" in act.controls:
            return 1 if act.controls["lr"] > 0 and act.label.startswith("Raise") else -1
    return 0


def test_a_too_high_sgd_lr_that_kills_the_relus_is_lr_too_high(runs_root):
    """SGD at lr 1.0: the loss jumps, the ReLUs die, the updates shrink to nothing and the loss sits at chance.
    The tiny updates must not read as a too-low lr: the verdict is lr_too_high, with a rollback and a lower
    lr, and no alert of the run advises raising it."""
    tr = Trainer(scenario_config("lr_kills_relus", runs_root=str(runs_root), tensorboard=False))
    tr.run()
    kinds = {a.kind: a for a in _loud(tr)}
    assert "lr_too_high" in kinds and "lr_too_low" not in kinds, [str(a) for a in tr.alerts]
    high = kinds["lr_too_high"]
    assert "blew up" in high.evidence and "lr 1" in high.evidence
    assert high.actions[0].rollback and high.actions[0].controls == {"lr": pytest.approx(0.1)}
    assert all(_lr_direction(a) <= 0 for a in tr.alerts), [(a.kind, a.actions[0].label) for a in tr.alerts]


def test_memorising_a_tiny_training_set_is_overfitting_by_the_gap(runs_root):
    """40 digits memorised (train loss ~5e-4) while the val loss stays flat near 0.56: no val-loss climb for
    Prechelt's rule, but a wide gap that is not closing."""
    from workbench.diagnosis.casebook import memorised

    tr = Trainer(**memorised(0), seed=0, runs_root=str(runs_root), tensorboard=False)
    tr.run()
    over = [a for a in tr.alerts if a.kind == "overfitting"]
    assert len(over) == 1 and over[0].step <= 200, [str(a) for a in tr.alerts]
    assert "generalisation gap" in over[0].evidence and "val accuracy" in over[0].evidence
    assert {a.kind for a in _loud(tr)} == {"overfitting"}


def test_a_blow_up_within_3_steps_is_divergence(runs_root):
    """A character-level Transformer at lr 10: the loss goes from log(V) to thousands at step 2. The starting
    loss the explosion is measured against is the first one (not a median that already holds the blow-up)."""
    from workbench.diagnosis.casebook import char_lm

    tr = Trainer(**char_lm(0, lr=10.0, steps=50), seed=0, runs_root=str(runs_root), tensorboard=False,
                 on_divergence="stop")
    tr.run()
    h = tr.history
    assert h["train_loss"].iloc[1] > 20 * h["train_loss"].iloc[0]   # blown up at step 2
    div = next(a for a in tr.alerts if a.kind == "divergence")
    assert div.step <= 5 and tr.status == "stopped"
    first = float(h["train_loss"].iloc[0])
    assert f"starting loss {first:.3g}" in div.evidence


def test_a_healthy_token_id_model_raises_no_data_check_or_gradient_flow_alert(runs_root):
    """Integer token ids are not features on a scale; a learned positional embedding (a bare 2-D parameter),
    the token embedding and the layer norms are not steps of depth for the gradient-flow check."""
    from workbench.diagnosis.base import gradient_flow_weights
    from workbench.diagnosis.casebook import CharLM, char_data, char_lm

    train, val, vocab = char_data()
    assert train.tensors[0].float().mean() > 5     # ids look "unnormalised" if read as features
    assert preflight(train, val, "classification") == []
    flow = gradient_flow_weights(CharLM(vocab, 32))
    assert "head.weight" in flow and not {"pos", "tok.weight", "norm.weight"} & flow
    assert all("norm" not in n for n in flow)
    tr = Trainer(**char_lm(0, steps=120), seed=0, runs_root=str(runs_root), tensorboard=False)
    tr.run()
    assert not _loud(tr), [str(a) for a in tr.alerts]


def test_category_codes_stored_as_floats_are_not_judged_for_scale():
    from workbench.diagnosis.data_checks import categorical_columns

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 12, (300, 2)).astype(np.float32) * np.array([1, 4], dtype=np.float32)
    measured = rng.normal(0, 1, (300, 3)).astype(np.float32)
    x = torch.tensor(np.hstack([codes, measured]))
    y = torch.tensor(rng.integers(0, 2, 300))
    ds = torch.utils.data.TensorDataset(x, y)
    assert categorical_columns(ds, x.double().numpy()).tolist() == [True, True, False, False, False]
    assert preflight(ds, None, "classification") == []
    far = torch.utils.data.TensorDataset(torch.cat([x[:, :2], 1000 * x[:, 2:]], 1), y)
    assert [a.kind for a in preflight(far, None, "classification")] == ["unnormalized_inputs"]


def test_a_cosine_schedule_run_to_its_end_raises_no_lr_too_low(runs_root):
    """At the end of a cosine schedule the lr in force is ~1e-6 and the updates are tiny by design."""
    from workbench.diagnosis.casebook import CASES

    tr = Trainer(**CASES["cosine_to_end"].build(0), seed=0, runs_root=str(runs_root), tensorboard=False)
    tr.run()
    assert tr.history["lr"].iloc[-1] < 1e-2 * tr.controls.lr
    assert not _loud(tr), [str(a) for a in tr.alerts]


def test_lr_too_low_quotes_the_scheduled_lr_and_never_fires_on_a_climbing_loss():
    from workbench.diagnosis.base import Signals
    from workbench.diagnosis.lr_too_low import LRTooLow

    steps = np.arange(1, 201, dtype=float)
    layers = {"step": 200, "name": np.array(["a.weight", "b.weight"]), "grad_norm": np.ones(2),
              "param_norm": np.ones(2), "update_ratio": np.full(2, 1e-7), "is_matrix": np.ones(2, bool)}

    def check(loss: np.ndarray) -> object:
        det = LRTooLow(patience=1)
        return det.check(Signals(step=200, history={"train_loss": loss, "step": steps, "lr": np.full(200, 2e-4)},
                                 evals={}, layers=layers, task="classification", n_classes=10, planned_steps=None,
                                 controls={"lr": 3e-4}, initial_loss=2.3))

    crawling = check(2.3 - 1e-4 * steps)
    assert crawling is not None and "lr 2.00e-04" in crawling.evidence      # in force, not the base 3e-4
    assert crawling.actions[0].controls == {"lr": pytest.approx(3e-3)}     # the base lr, raised 10x
    assert check(1e-3 + 1e-5 * steps) is None                              # the loss climbs: never "raise"
    assert check(np.full(200, 0.01)) is None                               # memorised: done, not slow


def test_an_alert_lives_open_updated_closed_and_reopens_only_after_a_cool_down():
    from workbench.diagnosis import Alert, Detector, Diagnoser
    from workbench.diagnosis.base import Signals

    class Scripted(Detector):
        kind, every = "plateau", 10
        script: dict = {}

        def check(self, s):
            return Alert("plateau", "warning", s.step, "m.", f"at {s.step}") if self.script.get(s.step) else None

    on = {s: True for s in (10, 20, 30, 100, 110, 400)}
    Scripted.script = on
    d = Diagnoser({"plateau": Scripted()}, cooldown=3, reopen_after=200, reopen_growth=4)
    log = []
    for step in range(10, 1000, 10):
        ch = d.run(["plateau"], Signals(step=step, history={}, evals={}, layers=None, task="classification",
                                        n_classes=10, planned_steps=None, controls={"lr": 0.1}, initial_loss=None))
        log += [("open", step)] * len(ch.opened) + [("update", step)] * len(ch.updated) + \
            [("close", step)] * len(ch.closed)
    # opens at 10, updated at 20 and 30, closes after 3 quiet checks (60); 100-110 fall in the cool-down
    # (closed at 60 + 200); 400 opens a second episode, closed at 430
    assert log == [("open", 10), ("update", 20), ("update", 30), ("close", 60), ("open", 400), ("close", 430)]
    first, second = d.alerts
    assert (first.step, first.last_step, first.updates, first.closed_step) == (10, 30, 2, 60)
    assert first.evidence == "at 30" and not first.open and second.closed_step == 430
    assert d.current() == [] and d.summary()["health"] == "healthy"
    again = Diagnoser({"plateau": Scripted()})
    again.load_state_dict(d.state_dict())
    assert [(a.id, a.closed_step) for a in again.alerts] == [(first.id, 60), (second.id, 430)]
    assert again.episodes["plateau"] == 2 and again.cooling("plateau", 430 + 200 * 4 - 10)


def test_overfitting_reads_a_noisy_train_loss_over_enough_steps() -> None:
    """Two overlapping moons after 19,000 steps: the val loss drifts 20% above a lucky-low early best while the
    train loss is flat under heavy batch-to-batch noise. A 20-step median of that noise can land 20% below
    the one at the best eval and read as "the train loss fell"; the median of ``train_window`` steps cannot."""
    from workbench.diagnosis.base import Signals
    from workbench.diagnosis.overfitting import Overfitting

    rng = np.random.default_rng(0)
    steps = np.arange(1, 19_001, dtype=float)
    train = 0.07 * rng.lognormal(0.0, 0.6, len(steps))          # flat, each batch's loss off by up to 2x
    es = np.arange(200, 19_001, 200, dtype=float)
    val = 0.075 + 0.002 * rng.standard_normal(len(es)) + np.linspace(0, 0.02, len(es))
    # the lucky eval falls where the 20 steps before it happened to be hard batches
    best = 1 + int(np.argmax([np.median(train[int(e) - 20:int(e)]) for e in es[1:10]]))
    val[best] = 0.069
    quiet = Overfitting()
    fired_short = False
    for n in range(10, len(es) + 1):
        upto = int(es[n - 1])
        s = Signals(step=upto, history={"train_loss": train[max(0, upto - 2000):upto],
                                        "step": steps[max(0, upto - 2000):upto]},
                    evals={"val_loss": val[:n], "step": es[:n]}, layers=None, task="classification", n_classes=2,
                    planned_steps=None, controls={"lr": 3e-3}, initial_loss=0.69)
        assert quiet.check(s) is None, f"fired at step {upto}"
        short = Overfitting()
        short.train_window = 20
        short.best_step, short.best_train = int(es[best]), float(np.median(train[int(es[best]) - 20:int(es[best])]))
        fired_short |= short.check(s) is not None
    assert fired_short        # the same series, read over 20 steps, does fire: the window is what holds it
