"""workbench.requests: the one vocabulary of what may be asked of a run, and how each request fares.

* Every action of ``ACTIONS`` (set, pause, resume, step, stop, checkpoint, rollback, dismiss, alert_action)
  goes through both paths, in-process (``Trainer.ask``) and the run directory's inbox from another object
  (``RunView.ask``, picked up by the trainer's recorder thread), with the same outcome (status, step,
  message) and the same event-log entries (kind, source, step).
* Bad input is refused with a message that names the field, in the caller's thread, on both paths, before
  anything is queued; the run goes on untouched. A request the trainer cannot apply (step while running,
  an advice-only action) is refused with the reason.
* A run that has ended refuses every request but a checkpoint, saying it has ended. (The inbox of an ended
  run is refused by the run handle, ``RemoteRun.ask``: see test_handle.py.)
* A change takes effect at the next step boundary, from any thread, from many threads at once, and from
  another process through the run's SQLite inbox.
"""
from __future__ import annotations

import json
import subprocess
import textwrap
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch

from workbench import Trainer
from workbench.diagnosis import Action, Alert
from workbench.requests import ACTIONS
from workbench.rundir import RunDB
from workbench.runview import RunView

from conftest import PYTHON, ROOT, make_mlp, wait_for

SOURCE = "dashboard"  # both paths name the same source, so their log entries can be compared


@pytest.fixture
def tiny_run(tiny_data, runs_root):
    """Make a tiny run (own MLP, 200 samples, no end set), started paused and stepped ``steps`` times, and a
    RunView of its directory: (trainer, view). Stopped and closed at the end of the test."""
    made: list[tuple[Trainer, RunView]] = []

    def make(steps: int = 2, **kw: Any) -> tuple[Trainer, RunView]:
        cfg = dict(batch_size=16, max_steps=None, max_epochs=None, seed=0, eval_every=0, tensorboard=False,
                   diagnose=False, on_divergence="ignore", runs_root=str(runs_root))
        cfg.update(kw)
        tr = Trainer(model=make_mlp(), train_data=tiny_data, loss_fn=torch.nn.CrossEntropyLoss(), **cfg)
        tr.start(paused=True)
        assert tr.step(steps).wait(30).status == "applied"
        view = RunView(tr.run_dir)
        made.append((tr, view))
        return tr, view

    yield make
    for tr, view in made:
        if tr.is_alive:
            tr.stop().wait(30)
        tr.join(30)
        view.close()


def diverged(make: Callable[..., tuple[Trainer, RunView]]) -> tuple[Trainer, RunView, Alert]:
    """A tiny run with diagnosis on, diverged by a huge lr after 10 good steps: its divergence alert (whose
    actions are: roll back and lower the lr, lower the lr, clip gradients) and the run, paused."""
    tr, view = make(steps=10, diagnose=True)
    assert tr.set(lr=1e6).wait(30).status == "applied"
    for _ in range(20):
        assert tr.step(1).wait(30).status == "applied"
        alert = next((a for a in tr.alerts if a.kind == "divergence"), None)
        if alert is not None:
            # a request applied at the next boundary: the turn that raised the alert has logged all it raised
            assert tr.set(lr=1e6).wait(30).status == "applied"
            return tr, view, alert
    raise AssertionError(f"no divergence alert in 20 steps at lr 1e6: {[str(a) for a in tr.alerts]}")


# ---------------------------------------------------------------------------- the two paths
def in_process(tr: Trainer, view: RunView, action: str, args: dict) -> dict:
    req = tr.ask(action, args, SOURCE).wait(30)
    return {"status": req.status, "step": req.step, "message": req.message}


def through_the_inbox(tr: Trainer, view: RunView, action: str, args: dict) -> dict:
    rec = view.wait(view.ask(action, args, SOURCE), timeout=30)
    return {"status": rec["status"], "step": rec["step"], "message": rec["message"]}


PATHS = {"in-process": in_process, "inbox": through_the_inbox}


@dataclass
class Recipe:
    """How to ask for an action so that both paths meet the run in the same state: ``args``; ``setup`` run
    before each path (outside the observed window; what it returns goes to ``settle``); ``settle`` run after
    the outcome (inside the window); ``free``: the run is running when the request arrives, so steps count
    from the step before the one the request took effect at; ``own_run``: each path gets a run of its own
    (the action ends it); ``alert``: the run has diverged and holds a divergence alert; ``expect``: the
    outcome and entries both paths must give."""

    args: Callable[[Alert | None], dict] = lambda alert: {}
    setup: Callable[[Trainer], Any] = lambda tr: None
    settle: Callable[[Trainer, Any], Any] = lambda tr, token: None
    free: bool = False
    own_run: bool = False
    alert: bool = False
    expect: dict = field(default_factory=dict)


def _pause_again_3_steps_on(tr: Trainer) -> int:
    """A hook pauses the run (source api) three steps after the next one starts; returns that step."""
    target = tr.step_count + 3
    tr.on("step_end", lambda ctx: tr.pause() if ctx.step == target else None)
    return target


def _paused_again_at(tr: Trainer, target: int) -> None:
    """Until the hook's pause has taken effect at ``target`` and is in the log."""
    wait_for(lambda: any(e["kind"] == "status" and e["data"] == {"status": "paused"} and e["step"] == target
                         for e in tr.event_list()))


def _lr_back_to_1e3(tr: Trainer) -> None:
    assert tr.set(lr=1e-3).wait(30).status == "applied"


def _a_good_checkpoint_and_lr_1e3(tr: Trainer) -> None:
    tr.save_checkpoint(tag="good")
    _lr_back_to_1e3(tr)


RECIPES = {
    "set": Recipe(args=lambda a: {"lr": 2e-3}, setup=_lr_back_to_1e3,
                  expect={"status": "applied", "step": 1, "entries": [("control", SOURCE, 1)]}),
    "pause": Recipe(setup=lambda tr: tr.resume(source="api").wait(30), free=True,
                    expect={"status": "applied", "step": 1, "entries": [("status", SOURCE, 0)]}),
    "resume": Recipe(setup=_pause_again_3_steps_on,
                     settle=_paused_again_at,
                     expect={"status": "applied", "step": 1,
                             "entries": [("status", SOURCE, 0), ("status", "api", 3)]}),
    "step": Recipe(args=lambda a: {"n": 3},
                   expect={"status": "applied", "step": 3, "entries": [("command", SOURCE, 1)]}),
    "stop": Recipe(own_run=True, settle=lambda tr, token: tr.join(30),
                   expect={"status": "applied", "step": 0,
                           "entries": [("command", SOURCE, 0), ("checkpoint", SOURCE, 0), ("status", "trainer", 0)]}),
    "checkpoint": Recipe(args=lambda a: {"tag": "probe"},
                         expect={"status": "applied", "step": 0, "entries": [("checkpoint", SOURCE, 0)]}),
    "rollback": Recipe(setup=_a_good_checkpoint_and_lr_1e3,
                       expect={"status": "applied", "step": 1,
                               "entries": [("rollback", SOURCE, 1), ("control", SOURCE, 1)]}),
    "dismiss": Recipe(args=lambda a: {"alert": a.id}, alert=True,
                      expect={"status": "applied", "step": 0, "entries": [("dismiss", SOURCE, 0)]}),
    "alert_action": Recipe(args=lambda a: {"alert": a.id, "index": 1}, setup=_lr_back_to_1e3, alert=True,
                           expect={"status": "applied", "step": 1, "entries": [("control", SOURCE, 1)]}),
}


def observe(path: str, tr: Trainer, view: RunView, recipe: Recipe, action: str, alert: Alert | None) -> dict:
    """Ask for ``action`` on ``path``: its outcome and the log entries it made, with steps counted from the
    run's step before it (``free``: from the step before the one it took effect at)."""
    token = recipe.setup(tr)
    before, start = tr.step_count, tr.event_count
    out = PATHS[path](tr, view, action, recipe.args(alert))
    recipe.settle(tr, token)
    base = out["step"] - 1 if recipe.free else before
    return {"status": out["status"], "step": out["step"] - base, "message": out["message"],
            "entries": [(e["kind"], e["source"], e["step"] - base) for e in tr.event_list(start)]}


def test_every_action_of_the_vocabulary_has_a_recipe_here():
    assert set(RECIPES) == set(ACTIONS)


@pytest.mark.parametrize("action", list(ACTIONS))
def test_an_action_has_the_same_outcome_and_log_entries_on_both_paths(action, tiny_run):
    recipe = RECIPES[action]
    seen = {}
    alert = None
    if recipe.alert:
        tr, view, alert = diverged(tiny_run)
        runs = {path: (tr, view) for path in PATHS}
    elif recipe.own_run:
        runs = {path: tiny_run() for path in PATHS}
    else:
        shared = tiny_run()
        runs = {path: shared for path in PATHS}
    for path, (tr, view) in runs.items():
        seen[path] = observe(path, tr, view, recipe, action, alert)
    a, b = seen["in-process"], seen["inbox"]
    assert a == b, f"{action}: in-process {a} != inbox {b}"
    assert {k: a[k] for k in recipe.expect} == recipe.expect, a


BAD_ARGS = {
    "set": ({"lr": -1.0}, "lr"), "pause": ({"now": True}, "now"), "resume": ({"now": True}, "now"),
    "step": ({"n": 0}, "n"), "stop": ({"now": True}, "now"), "checkpoint": ({"tag": "a/b"}, "tag"),
    "rollback": ({"lr": 0}, "lr"), "dismiss": ({"alert": -1}, "alert"),
    "alert_action": ({"alert": 1, "index": -1}, "index"),
}


@pytest.mark.parametrize("action", list(ACTIONS))
def test_a_bad_argument_raises_naming_the_field_on_both_paths_before_anything_is_queued(action, tiny_run):
    tr, view = tiny_run()
    args, name = BAD_ARGS[action]
    last = view.wait(view.ask("set", {"lr": 1e-3}, SOURCE), timeout=30)["id"]
    controls, step = tr.controls.state_dict(), tr.step_count
    for ask in (lambda: tr.ask(action, args, SOURCE), lambda: view.ask(action, args, SOURCE)):
        with pytest.raises((ValueError, TypeError)) as err:
            ask()
        message = str(err.value)
        assert message.startswith(f"{name}: got") or f"'{name}'" in message, message
    with pytest.raises(KeyError):
        view.request(last + 1)  # nothing reached the inbox
    assert tr.step(1).wait(30).status == "applied"  # anything queued in-process would have been handled first
    assert not (tr.events["kind"] == "refused").any()
    assert tr.controls.state_dict() == controls and tr.step_count == step + 1


def test_an_unknown_action_or_arguments_that_are_not_a_mapping_are_refused_on_both_paths(tiny_run):
    tr, view = tiny_run()
    for ask in (tr.ask, view.ask):
        with pytest.raises(ValueError, match=r"action: got 'explode'; allowed: set, pause"):
            ask("explode", {}, SOURCE)
        with pytest.raises(TypeError, match=r"set: arguments must be a mapping"):
            ask("set", [("lr", 0.1)], SOURCE)


def test_requests_to_an_ended_run_are_refused_saying_it_ended_but_a_checkpoint(tiny_run):
    tr, view, alert = diverged(tiny_run)
    tr.stop().wait(30)
    assert tr.join(30) == "stopped"
    valid = {"set": {"lr": 2e-3}, "pause": {}, "resume": {}, "step": {"n": 1}, "stop": {}, "rollback": {},
             "dismiss": {"alert": alert.id}, "alert_action": {"alert": alert.id, "index": 1}}
    assert set(valid) == set(ACTIONS) - {"checkpoint"}
    for action, args in valid.items():
        req = tr.ask(action, args, SOURCE).wait(30)
        assert req.status == "refused" and "the run has ended (status stopped)" in req.message, (action, req)
    saved = tr.ask("checkpoint", {"tag": "after"}, SOURCE).wait(30)
    assert saved.status == "applied" and saved.result.exists()


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
    for controls, name in BAD_CONTROLS:
        with pytest.raises((ValueError, TypeError)) as err:
            tr.set(**controls)
        assert name in str(err.value), (controls, str(err.value))
        assert str(list(controls.values())[0])[:4] in str(err.value) or name == "learning_rate"
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


def test_a_new_action_is_one_row_of_the_table_and_serves_both_paths(tiny_run, monkeypatch):
    """What adding an action takes: a row in ACTIONS with its check and apply functions, nothing else. The
    in-process path and the inbox (whose store, RunView and trainer all read the same table) both serve it."""
    from workbench.requests import Action

    def check(facts, args):
        if set(args) - {"text"} or not isinstance(args.get("text"), str):
            raise ValueError(f"text: got {args!r}; allowed: {{'text': a string}}")
        return {"text": args["text"]}

    def apply(run, req):
        run.log_event("note", req.source, {"text": req.args["text"]}, step=run.step_count)
        return "noted", run.step_count, None

    monkeypatch.setitem(ACTIONS, "note", Action("note", "write a note into the event log", check, apply))
    tr, view = tiny_run()
    assert in_process(tr, view, "note", {"text": "here"}) == {"status": "applied", "step": 2, "message": "noted"}
    assert through_the_inbox(tr, view, "note", {"text": "there"}) == {"status": "applied", "step": 2,
                                                                      "message": "noted"}
    notes = [(e["source"], e["data"]["text"]) for e in tr.event_list() if e["kind"] == "note"]
    assert notes == [(SOURCE, "here"), (SOURCE, "there")]
    for path in (tr.ask, view.ask):
        with pytest.raises(ValueError, match="text: got"):
            path("note", {"text": 3}, SOURCE)
