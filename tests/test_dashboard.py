"""The Streamlit dashboard, driven by Streamlit's AppTest (no browser): real trainers, real run directories,
a real CLI subprocess. AppTest never fires ``st.fragment(run_every=...)`` timers, so each test calls
``at.run()`` again (or the live view's data function directly) to see new data."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from workbench import registry

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app" / "dashboard.py"
WORKBENCH = Path(sys.executable).with_name("workbench")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app import live  # noqa: E402
from workbench import handle, runs  # noqa: E402
from workbench.runview import RunView  # noqa: E402

from conftest import wait_for  # noqa: E402


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def fork_input(widgets, name: str):
    """The fork form's input of control ``name`` (its key carries a digest of the checkpoint it shows)."""
    (w,) = [w for w in widgets if (w.key or "").startswith(f"fork_{name}_")]
    return w


def chart_args(at: AppTest, key: str) -> dict:
    """The arguments the page sent to a chart grid (app/charts.py) drawn under ``key``."""
    for el in at.get("component_instance"):
        args = json.loads(el.proto.json_args)
        if el.proto.component_name == "app.charts.chart_grid" and args.get("key") == key:
            return args
    raise AssertionError(f"no chart grid {key!r}")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A run made by a separate CLI process, started at once so it trains while the first tests run."""
    root = tmp_path_factory.mktemp("cli") / "runs"
    proc = subprocess.Popen([str(WORKBENCH), "train", "--set", "max_steps=20", "--runs", str(root), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield root, proc
    if proc.poll() is None:
        proc.kill()


@pytest.fixture
def app(runs_root, monkeypatch, cli_run):  # cli_run: start the CLI process early (it runs alongside)
    monkeypatch.setenv("WORKBENCH_RUNS", str(runs_root))
    monkeypatch.delenv("WORKBENCH_DEMO", raising=False)
    at = AppTest.from_file(str(APP), default_timeout=60)
    yield at
    registry.stop_all(under=runs_root)
    handle.close_all()
    runs.clear_cache()


def only_trainer(root: Path):
    trs = [t for k, t in registry.trainers().items() if Path(k).parent == root.resolve()]
    assert len(trs) == 1, trs
    return trs[0]


def control_events(tr, field: str = "lr") -> list[dict]:
    ev = tr.events
    return [r for r in ev.to_dict("records") if r["kind"] == "control" and r["data"].get("field") == field]


def test_renders_without_exceptions_on_an_empty_root(app):
    app.run()
    assert not app.exception
    assert not errors(app)
    assert any("No runs under" in i.value for i in app.info)
    names = {t.label.rsplit(": ", 1)[-1] for t in app.tabs}
    assert {"Live", "Runs", "Launch", "Diagnosis", "Checkpoints", "Compare", "TensorBoard"} <= names


def test_start_demo_creates_a_run(app, runs_root):
    app.run()
    app.button(key="demo_start").click().run()
    assert not app.exception and not errors(app)
    tr = only_trainer(runs_root)
    assert (tr.run_dir / "run.db").exists() and tr.run_dir.parent == runs_root.resolve()
    assert tr.cfg.name == "demo" and tr.cfg.seed == 0
    assert app.selectbox(key="run_select").value == registry.key(tr.run_dir)
    assert any("Started the demo run" in s.value for s in app.success)
    wait_for(lambda: tr.step_count > 0)
    app.run()
    assert not app.exception
    grid = chart_args(app, "live_charts")
    assert grid["order"] == ["loss", "lr", "grad_norm", "val_acc", "layer_grad_norm", "update_ratio", "batch_precision"]
    # each chart keeps the user's zoom while it shows this run (plotly's uirevision names the run and chart)
    revs = {n: json.loads(f)["layout"]["uirevision"] for n, f in grid["figures"].items()}
    assert len(set(revs.values())) == 7 and all(str(tr.run_dir) in r for r in revs.values())
    assert grid["plotly_src"].endswith("/plotly.min.js")
    # the x axis counts samples on request: every chart's title says so, and the zoom starts afresh
    app.segmented_control(key="live_x").set_value("samples").run()
    assert not app.exception
    after = {n: json.loads(f)["layout"] for n, f in chart_args(app, "live_charts")["figures"].items()}
    assert {lay["xaxis"]["title"]["text"] for lay in after.values()} == {"samples trained on"}
    assert all(after[n]["uirevision"] != revs[n] for n in after)


def launch_long_run(app: AppTest, runs_root: Path):
    """Start a run from the Launch form that will not end during the test."""
    app.run()
    app.text_input(key="launch_max_epochs").set_value("1000")
    app.text_input(key="launch_seed").set_value("0")
    app.button(key="launch_start").click().run()
    assert not app.exception and not errors(app), errors(app)
    tr = only_trainer(runs_root)
    wait_for(lambda: tr.step_count > 0)
    return tr


def test_lr_control_applies_and_invalid_values_change_nothing(app, runs_root):
    tr = launch_long_run(app, runs_root)
    app.run()
    assert app.text_input(key="ctl_lr").value == "0.001"

    app.text_input(key="ctl_lr").set_value("0.003")
    app.button(key="ctl_apply").click().run()
    assert not app.exception and not errors(app)
    wait_for(lambda: tr.controls.lr == pytest.approx(0.003))
    ev = control_events(tr)
    assert len(ev) == 1 and ev[0]["source"] == "dashboard" and ev[0]["data"]["new"] == pytest.approx(0.003)
    assert any("lr=0.003: applied at step" in s.value for s in app.success)

    # invalid values: an inline error with the engine's text, and the run is untouched
    for value, text in (("-1", "lr: got -1.0; allowed: a number > 0"), ("abc", "lr: got 'abc'")):
        app.text_input(key="ctl_lr").set_value(value)
        app.button(key="ctl_apply").click().run()
        assert not app.exception
        assert any(text in e for e in errors(app)), errors(app)
    app.text_input(key="ctl_lr").set_value("0.003")
    app.number_input(key="ctl_batch_size").set_value(0)
    app.button(key="ctl_apply").click().run()
    assert any("batch_size: got 0" in e for e in errors(app)), errors(app)
    time.sleep(0.3)
    assert tr.controls.lr == pytest.approx(0.003) and tr.controls.batch_size == 64
    assert len(control_events(tr)) == 1 and not control_events(tr, "batch_size")

    # a bad launch field is an inline error too, and starts nothing
    app.text_input(key="launch_lr").set_value("-5")
    app.button(key="launch_start").click().run()
    assert not app.exception
    assert any("lr: got -5.0; allowed: a number > 0" in e for e in errors(app)), errors(app)
    assert len([k for k in registry.trainers() if Path(k).parent == runs_root.resolve()]) == 1

    # pause, then step while paused: applied by the trainer, shown with its step
    app.button(key="cmd_pause").click().run()
    wait_for(lambda: tr.status == "paused")
    at_pause = tr.step_count
    app.number_input(key="cmd_step_n").set_value(3)
    app.button(key="cmd_step").click().run()
    wait_for(lambda: tr.step_count == at_pause + 3)
    assert not app.exception and not errors(app)


def test_runs_list_shows_a_run_from_a_separate_cli_process(app, cli_run, monkeypatch):
    root, proc = cli_run
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    monkeypatch.setenv("WORKBENCH_RUNS", str(root))
    app.run()
    assert not app.exception and not errors(app)
    tables = [d.value for d in app.dataframe if "trained by" in d.value.columns]
    assert tables, "no runs table"
    runs = tables[0]
    (name,) = [p.name for p in root.iterdir()]
    row = runs[runs["run"] == name]
    assert len(row) == 1 and row["status"].iloc[0] == "finished" and int(row["step"].iloc[0]) == 20

    # the live view's data+figures function (what the fragment refreshes) on that run, read from its directory
    p = live.live_payload(handle.open_run(root / name))
    assert p.snapshot["status"] == "finished" and p.snapshot["step"] == 20
    assert set(p.figures) == {"loss", "lr", "grad_norm", "val_acc", "layer_grad_norm", "update_ratio", "batch_precision"}
    assert 0 < p.data.points <= live.N_OUT
    assert any(m["kind"] == "checkpoint" for m in p.data.markers)
    # a refresh with nothing new reuses the figures; they are the ones the shared builders draw
    again = live.live_payload(handle.open_run(root / name))
    assert all(again.figures[k] is p.figures[k] for k in p.figures)
    fresh = live.live_payload(handle.open_run(root / name), cache=False)
    assert all(fresh.figures[k].to_json() == p.figures[k].to_json() for k in p.figures)
    # an ended run in another process cannot be steered: a click is answered with the engine's reason
    assert not app.button(key="cmd_stop").disabled
    app.button(key="cmd_stop").click().run()
    assert any("stop: refused — the run has ended" in e for e in errors(app)), errors(app)


@pytest.mark.slow  # multi-process: a CLI run trained by another process, steered through its inbox
def test_steer_a_run_in_another_process_through_its_inbox(app, tmp_path, monkeypatch):
    root = tmp_path / "other"
    proc = subprocess.Popen([str(WORKBENCH), "train", "--set", "max_steps=1000000", "--set", "max_epochs=null",
                             "--set", "schedule=constant", "--runs", str(root), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run = wait_for(lambda: next((p for p in root.glob("*/run.db")), None), timeout=60).parent
        wait_for(lambda: handle.open_run(run).meta.get("status") == "running", timeout=60)
        monkeypatch.setenv("WORKBENCH_RUNS", str(root))
        app.run()
        assert not app.exception and not errors(app)
        assert any("another process" in c.value for c in app.caption)
        app.text_input(key="ctl_lr").set_value("0.002")
        app.button(key="ctl_apply").click().run()
        assert not app.exception and not errors(app)
        view = handle.open_run(run)
        rid = app.session_state["requests"][-1].ticket.id
        rec = wait_for(lambda: (r := view.request(rid))["status"] != "pending" and r, timeout=20)
        assert rec["status"] == "applied" and rec["source"] == "dashboard"
        wait_for(lambda: handle.open_run(run).meta["controls"]["lr"] == pytest.approx(0.002), timeout=20)
        app.run()
        assert app.text_input(key="ctl_lr").value == "0.002"
        app.text_input(key="ctl_lr").set_value("0")
        app.button(key="ctl_apply").click().run()
        assert any("lr: got 0.0; allowed: a number > 0" in e for e in errors(app)), errors(app)
        app.button(key="cmd_stop").click().run()
        assert proc.wait(60) == 0
        w = RunView(run)
        assert w.meta["status"] == "stopped"
        w.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_roll_back_and_dismiss_an_alert_of_a_run_in_another_process(app, tmp_path, monkeypatch):
    """An alert's rollback and its dismiss button work for a run the CLI trains, through its inbox."""
    root = tmp_path / "other"
    # on_divergence=ignore: the CLI stops a run that its divergence policy paused (nobody to steer it there)
    proc = subprocess.Popen([str(WORKBENCH), "train", "--scenario", "lr_too_high", "--set", "max_steps=1000000",
                             "--set", "checkpoint_every=1", "--set", "on_divergence=ignore", "--runs", str(root),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run = wait_for(lambda: next((p for p in root.glob("*/run.db")), None), timeout=60).parent

        def fresh() -> RunView:
            w = handle.open_run(run)
            w.refresh()
            return w

        wait_for(lambda: any(a["kind"] == "divergence" for a in fresh().alerts), timeout=60)
        monkeypatch.setenv("WORKBENCH_RUNS", str(root))
        app.run()
        assert not app.exception and not errors(app)
        alert = next(a for a in fresh().alerts if a["kind"] == "divergence")
        back = next(i for i, act in enumerate(alert["actions"]) if act.get("rollback"))
        view = handle.open_run(run)

        def outcome() -> dict:
            rid = app.session_state["requests"][-1].ticket.id
            return wait_for(lambda: (r := view.request(rid))["status"] != "pending" and r, timeout=20)

        app.button(key=f"alert_{alert['id']}_act_{back}").click().run()
        assert not app.exception and not errors(app)
        assert outcome()["status"] == "applied"
        wait_for(lambda: (fresh().events["kind"] == "rollback").any(), timeout=20)
        app.button(key=f"alert_{alert['id']}_dismiss").click().run()
        assert not app.exception and not errors(app)
        assert outcome()["status"] == "applied"
        wait_for(lambda: next(a for a in fresh().alerts if a["id"] == alert["id"])["dismissed"], timeout=20)
        app.button(key="cmd_stop").click().run()
        assert proc.wait(60) in (0, 3)   # 3: the run diverged again after the rollback and ended so
    finally:
        if proc.poll() is None:
            proc.kill()


def test_diagnosis_action_checkpoint_fork_and_compare(app, runs_root):
    app.run()
    app.radio(key="launch_source").set_value("Scenario").run()
    app.selectbox(key="launch_scenario").set_value("lr_too_high").run()
    assert app.text_input(key="launch_lr").value == "10"
    app.button(key="launch_start").click().run()
    assert not app.exception and not errors(app)
    tr = only_trainer(runs_root)
    wait_for(lambda: tr.status == "paused" and tr.diagnose()["alerts"], timeout=60)  # divergence policy: pause
    app.run()
    alert = tr.diagnose()["alerts"][0]
    assert alert.kind == "divergence"
    assert any(alert.message[:40] in m.value for m in app.markdown)
    lower = next(i for i, a in enumerate(alert.actions) if a.controls and not a.rollback)
    app.button(key=f"alert_{alert.id}_act_{lower}").click().run()
    assert not app.exception and not errors(app)
    wait_for(lambda: tr.controls.lr == pytest.approx(alert.actions[lower].controls["lr"]))

    app.button(key="cmd_checkpoint").click().run()
    assert not app.exception and not errors(app)
    wait_for(lambda: not tr.checkpoints.empty)
    app.run()
    fork_input(app.text_input, "lr").set_value("0.01")
    app.button(key="fork_start").click().run()
    assert not app.exception and not errors(app)
    child = registry.get(app.selectbox(key="run_select").value)
    assert child is not None and child is not tr
    assert child.lineage["parent_run"] == str(tr.run_dir)
    wait_for(lambda: child.controls.lr == pytest.approx(0.01))
    app.run()
    assert any(f"`{tr.run_dir.name}` → (step" in m.value for m in app.markdown)
    app.multiselect(key="compare_runs").set_value([registry.key(tr.run_dir), registry.key(child.run_dir)]).run()
    assert not app.exception and not errors(app)
    metrics = next(d.value for d in app.dataframe if "best val loss" in d.value.columns)
    assert set(metrics["run"]) == {tr.run_dir.name, child.run_dir.name}

    # stop the parent, then resume it from its newest checkpoint: a new trainer in the same directory
    app.selectbox(key="run_select").set_value(registry.key(tr.run_dir)).run()
    app.button(key="ckpt_resume").click().run()
    assert any("still going in this process" in e for e in errors(app)), errors(app)
    app.button(key="cmd_stop").click().run()
    wait_for(lambda: tr.status == "stopped", timeout=30)
    app.run()
    app.button(key="ckpt_resume").click().run()
    assert not app.exception and not errors(app), errors(app)
    again = registry.get(tr.run_dir)
    assert again is not None and again is not tr and again.run_dir == tr.run_dir
    resumed = [e for e in again.events.to_dict("records") if e["kind"] == "resume"]
    assert resumed and resumed[-1]["step"] == tr.step_count  # continues from the stop checkpoint


def test_demo_flag_starts_the_demo_once(app, runs_root, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DEMO", "1")
    app.run()
    assert not app.exception and not errors(app)
    tr = only_trainer(runs_root)
    assert tr.cfg.name == "demo"
    AppTest.from_file(str(APP), default_timeout=60).run()  # a second tab: no second demo
    assert len([k for k in registry.trainers() if Path(k).parent == runs_root.resolve()]) == 1


def test_fork_form_holds_the_checkpoints_controls_and_compare_follows_the_selection(app, runs_root):
    """The fork form shows what a fork from the selected checkpoint gets (its saved controls, not the run's
    current ones); a fork with nothing changed runs at them; the config diff names the fork by its own name;
    Compare shows the family of the run selected now, not of the one selected when the page loaded."""
    tr = launch_long_run(app, runs_root)
    app.button(key="cmd_pause").click().run()  # paused: no eval, so no newer "best" checkpoint in between
    wait_for(lambda: tr.status == "paused")
    app.button(key="cmd_checkpoint").click().run()
    wait_for(lambda: len(tr.events[tr.events["kind"] == "checkpoint"]) and not tr.checkpoints.empty)
    saved = tr.checkpoints.sort_values("step")["path"].iloc[-1]
    app.number_input(key="ctl_batch_size").set_value(128)
    app.button(key="ctl_apply").click().run()
    wait_for(lambda: tr.controls.batch_size == 128)
    app.run()
    assert not app.exception and not errors(app), errors(app)
    app.selectbox(key="ckpt_select").set_value(saved).run()
    assert fork_input(app.number_input, "batch_size").value == 64   # the checkpoint's, not the run's 128
    assert app.number_input(key="ctl_batch_size").value == 128
    app.button(key="fork_start").click().run()
    assert not app.exception and not errors(app), errors(app)
    assert any("with the checkpoint's controls" in m.value for m in app.success)
    child = registry.get(app.selectbox(key="run_select").value)
    assert child is not None and child is not tr
    wait_for(lambda: child.step_count > 0)
    assert child.controls.batch_size == 64
    app.run()
    # Compare follows the selection: the child is selected now, so its family (parent and child) is shown
    assert set(app.multiselect(key="compare_runs").value) == {registry.key(tr.run_dir), registry.key(child.run_dir)}
    diff = next(d.value for d in app.dataframe if "field" in d.value.columns)
    names = diff.set_index("field").loc["name"]
    assert names[tr.run_dir.name] != names[child.run_dir.name] and names[child.run_dir.name] == child.run_dir.name
    app.selectbox(key="run_select").set_value(registry.key(tr.run_dir)).run()
    assert registry.key(tr.run_dir) in app.multiselect(key="compare_runs").value


def test_headline_numbers_fit_and_smoothing_draws_a_smoothed_curve():
    assert live.kpi(0.0001234) == "1.23e-04" and live.kpi(0.1612) == "0.1612" and live.kpi(None) == "-"
    assert all(len(live.kpi(v)) <= 8 for v in (1e-9, 123456789.0, 0.5, 2.0, 12345.678))
    y = live.ema([1.0, 1.0, float("nan"), 3.0], 0.5)
    assert y[0] == pytest.approx(1.0) and y[1] == pytest.approx(1.0) and np.isnan(y[2])
    assert 1.0 < y[3] < 3.0   # debiased: the first point is itself, later ones move toward the new values


def test_a_run_on_a_users_loader_shows_its_fixed_batch_size_and_other_metrics(app, runs_root):
    sys.path.insert(0, str(Path(__file__).parent))
    from own_cases import trainer as own_trainer

    tr = own_trainer("iterable", None, runs_root=str(runs_root), max_steps=14, eval_every=7)
    registry.add(tr)
    tr.run()
    app.run()
    app.selectbox(key="run_select").set_value(registry.key(tr.run_dir)).run()
    assert not app.exception and not errors(app), errors(app)
    (bs,) = [w for w in app.number_input if w.key == "ctl_batch_size"]
    assert bs.disabled and "map-style Dataset" in bs.help
    grid = chart_args(app, "live_charts")
    assert grid["order"][-1] == "metrics"
    names = {t["name"] for t in json.loads(grid["figures"]["metrics"])["data"]}
    assert names == {"f1", "auc"}


def test_cost_line_shows_effective_batch_time_left_and_flops():
    snap = {"controls": {"batch_size": 16, "accumulate": 2}, "world_size": 2, "eta_s": 150.0, "flop_s": 3.2e9}
    assert live.cost_text(snap) == ("effective batch 64 (32 x 2 processes) · about 2.5 min to the end · "
                                    "3.20 GFLOP/s (6·N·D)")
    assert live.cost_text({"controls": {"batch_size": 8}}) == "effective batch 8"
