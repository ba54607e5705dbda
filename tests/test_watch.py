"""workbench.watch: the divergence policy (``on_divergence``).

* pause: a diverging run pauses itself (logged, source policy) and explains: a critical divergence alert
  about the learning rate, the alert hook fired, health critical; the alert's actions then apply (lowering
  the lr) and a missing action index is refused.
* stop: a diverging run ends, stopped at the step the alert fired (logged, source policy), and the policy
  makes the stop's save.
* rollback: see test_rollback.py.
* an alert's lifetime goes to the run log: opened (``alert``), its evidence updated (``alert_update``, a few
  rows however long the episode) and closed (``alert_closed``) once the condition clears; the run read from
  its directory and the trainer itself give the same open/closed verdicts and evidence.

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
    assert tr.controls.lr == pytest.approx(1.0)   # a tenth of the scenario's lr
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



def test_an_alert_opens_updates_and_closes_in_the_run_log_and_both_handles_agree(runs_root):
    """lr far too low: lr_too_low opens; raising the lr 1,000x at step 200 clears the condition, and the alert
    closes (a view shows it in the history of closed alerts, not among the open ones)."""
    from workbench.handle import LocalRun
    from workbench.runview import RunView

    tr = Trainer(scenario_config("lr_too_low", runs_root=str(runs_root), tensorboard=False, max_steps=320))
    tr.on("step_end", lambda ctx: tr.set(lr=1e-2, source="notebook") if ctx.step == 200 else None)
    tr.run()
    low = [a for a in tr.alerts if a.kind == "lr_too_low"]
    assert len(low) == 1, [str(a) for a in tr.alerts]
    a = low[0]
    assert a.step < 200 < a.closed_step and a.updates >= 2 and a.last_step < a.closed_step and not a.open
    ev = tr.events
    mine = ev[ev["data"].map(lambda d: isinstance(d, dict) and d.get("alert", d.get("id")) == a.id)]
    kinds = mine["kind"].tolist()
    assert kinds[0] == "alert" and kinds[-1] == "alert_closed" and "alert_update" in kinds
    assert kinds.count("alert_update") <= a.updates.bit_length()   # 1st, 2nd, 4th, ... update only
    assert a not in tr.diagnose()["alerts"]
    here = {x["id"]: x for x in LocalRun(tr).alert_list()}[a.id]
    view = RunView(tr.run_dir)
    try:
        there = {x["id"]: x for x in view.alert_list()}[a.id]
        assert view.health()["health"] == tr.diagnose()["health"]
    finally:
        view.close()
    assert here["open"] is False and there["open"] is False
    assert there["closed_step"] == here["closed_step"] == a.closed_step
    assert there["evidence"] == here["evidence"] == a.evidence
