"""workbench.watch: the divergence policy (``on_divergence``).

* pause: a diverging run pauses itself (logged, source policy) and explains: a critical divergence alert
  about the learning rate, the alert hook fired, health critical; the alert's actions then apply (lowering
  the lr) and a missing action index is refused.
* stop: a diverging run ends, stopped at the step the alert fired (logged, source policy), and the policy
  makes the stop's save.
* rollback: see test_rollback.py.

When the detectors run (on their schedule at read-back boundaries, a check put off by a save still seeing
every step) is specified with the detectors in test_diagnosis.py and across a resume in test_resume.py.
"""
from __future__ import annotations

import pytest

from workbench import Trainer
from workbench.scenarios import scenario_config

from conftest import wait_for


def test_pause_policy_explains_then_the_action_recovers(runs_root):
    tr = Trainer(scenario_config("lr_too_high", runs_root=str(runs_root), tensorboard=False, good_state_every=5,
                                 on_divergence="pause"))
    alerts = []
    tr.on("alert", lambda ctx: alerts.append(dict(ctx.data)))
    tr.start()
    wait_for(lambda: tr.status == "paused", timeout=60)
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


def test_the_stop_policy_ends_a_diverging_run_where_the_alert_fired(runs_root):
    tr = Trainer(scenario_config("lr_too_high", runs_root=str(runs_root), tensorboard=False, on_divergence="stop"))
    tr.run()
    assert tr.status == "stopped" and tr.step_count < tr.planned_steps
    div = next(a for a in tr.alerts if a.kind == "divergence")
    ev = tr.events
    policy = ev[ev["kind"] == "policy"]
    assert [(d["policy"], d["alert"]) for d in policy["data"]] == [("stop", div.id)]
    assert set(policy["source"]) == {"policy"} and policy["step"].tolist() == [div.step]
    assert tr.step_count == div.step
    # the stop's save, by the policy (skipped, and logged so, once the weights are no longer finite)
    saves = ev[ev["kind"].isin(["checkpoint", "checkpoint_skipped"]) & (ev["step"] == div.step)]
    assert len(saves) == 1 and saves["source"].iloc[0] == "policy"
    assert saves["kind"].iloc[0] == "checkpoint_skipped" or saves["data"].iloc[0]["reason"] == "stopped"

