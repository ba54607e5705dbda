"""The notebook panel driven from Python: widget values and button clicks reach the trainer, every request
is answered in the panel (pending, then applied at a step or refused and why), the charts grow as steps
arrive, every message to the browser is valid JSON, the layout (two columns, readable titles, ticks and
labels, kept zoom) holds, errors stay inside the panel, and the static fallback renders without widgets."""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workbench import Trainer
from workbench.controls import precision_problem
from workbench.notebook import Panel, StaticView, panel, parse_changes
from workbench.scenarios import scenario_config

from conftest import ROOT, wait_for


def small(runs_root: Path, **kw) -> Trainer:
    cfg = dict(dataset="digits", model="mlp", model_options={"width": 32}, lr=1e-3, batch_size=32, max_steps=200,
               max_epochs=None, eval_every=20, layer_every=10, seed=0, runs_root=str(runs_root), tensorboard=False)
    cfg.update(kw)
    return Trainer(**cfg)


@pytest.fixture
def make_panel():
    made: list[tuple[Panel, Trainer]] = []

    def make(tr: Trainer, **kw) -> Panel:
        p = panel(tr, poll=kw.pop("poll", None), **kw)
        made.append((p, tr))
        return p

    yield make
    for p, _ in made:
        for t in p.trainers:
            if t.is_alive:
                t.stop()
                t.join(30)
        p.close()


def test_lr_slider_and_text_box_change_the_live_lr(runs_root, make_panel):
    tr = small(runs_root)
    p = make_panel(tr)
    tr.start(paused=True)
    p.lr_slider.value = 3e-3
    assert p.last_request.wait(10).status == "applied"
    assert tr.controls.lr == pytest.approx(3e-3)
    assert p.lr_text.value == pytest.approx(3e-3)          # the two lr widgets show the same value
    p.lr_text.value = 5e-4
    assert p.last_request.wait(10).status == "applied"
    assert tr.controls.lr == pytest.approx(5e-4)
    assert p.lr_slider.value == pytest.approx(5e-4)
    ev = tr.events
    changes = ev[(ev["kind"] == "control")]
    assert list(changes["source"]) == ["notebook", "notebook"]
    assert [d["new"] for d in changes["data"]] == pytest.approx([3e-3, 5e-4])


def test_other_controls_reach_the_trainer(runs_root, make_panel):
    tr = small(runs_root)
    p = make_panel(tr)
    tr.start(paused=True)
    for widget, value, field in [(p.batch_size, 16, "batch_size"), (p.accumulate, 2, "accumulate"),
                                 (p.grad_clip, 1.5, "grad_clip"), (p.weight_decay, 1e-4, "weight_decay")]:
        widget.value = value
        assert p.last_request.wait(10).status == "applied", field
        assert getattr(tr.controls, field) == pytest.approx(value), field
    p.grad_clip.value = 0.0                                  # 0 means "off"
    p.last_request.wait(10)
    assert tr.controls.grad_clip is None
    if precision_problem(tr.device, "bf16") is None:
        p.precision.value = "bf16"
        p.last_request.wait(10)
        assert tr.controls.precision == "bf16"
    tr.step(3).wait(30)
    h = tr.history
    assert set(h["batch_size"]) == {16}


def test_a_bad_value_is_shown_in_the_panel_and_put_back(runs_root, make_panel):
    tr = small(runs_root)
    p = make_panel(tr)
    p.batch_size.value = 0                                   # ValueError from validation: no exception here
    assert "batch_size" in p.message.value and "allowed" in p.message.value
    assert p.batch_size.value == 32 and tr.controls.batch_size == 32
    p.lr_text.value = -1.0
    assert "lr" in p.last_error and tr.controls.lr == pytest.approx(1e-3) and p.lr_text.value == pytest.approx(1e-3)
    p.step_n.value = 4
    p.step_button.click()                                    # step on an idle run: starts it paused, runs 4
    assert p.last_request.wait(30).status == "applied" and tr.step_count == 4 and tr.status == "paused"


def test_buttons_start_pause_step_resume_stop_and_save(runs_root, make_panel):
    tr = small(runs_root, max_steps=100_000)
    p = make_panel(tr)
    assert not p.start_button.disabled and p.pause_button.disabled
    p.pause_button.click()                                   # pause before start: queued, applied at start
    p.start_button.click()
    assert tr.is_alive
    wait_for(lambda: tr.status == "paused")
    p.refresh()
    assert p.pause_button.disabled and not p.resume_button.disabled and not p.step_button.disabled
    before = tr.step_count
    p.step_n.value = 7
    p.step_button.click()
    assert p.last_request.wait(30).status == "applied"
    assert tr.step_count == before + 7
    p.save_button.click()
    assert "checkpoint saved" in p.message.value
    p.refresh()
    wait_for(lambda: (p.refresh() or True) and len(p.checkpoint_list.options) >= 1, timeout=10)
    assert any(f"step {tr.step_count:>8,}" in label for label, _ in p.checkpoint_list.options)
    p.resume_button.click()
    wait_for(lambda: tr.step_count > before + 20)
    p.step_button.click()                                    # step while running: refused, shown inline
    assert "press pause first" in p.message.value
    p.stop_button.click()
    assert tr.join(30) == "stopped"
    p.refresh()
    assert "stopped" in p.status.value and p.stop_button.disabled and p.lr_slider.disabled
    ev = tr.events
    assert {"notebook"} <= set(ev.loc[ev["kind"] == "command", "source"])


def test_figures_grow_as_steps_arrive_and_markers_appear(runs_root, make_panel):
    tr = small(runs_root, max_steps=1000)
    p = make_panel(tr)
    loss = p.figures["loss"]
    assert len(loss.data[0].x) == 0
    tr.start(paused=True)
    tr.step(20).wait(30)
    wait_for(lambda: tr.last_eval.get("step") == 20)         # the eval runs just after the step request resolves
    assert p.refresh() is True
    wait_for(lambda: p.refresh() is False)                   # the paused run goes quiet: refreshes are skipped
    n1 = len(loss.data[0].x)
    heat1 = len(p.figures["layer_grad_norm"].data[0].x)
    assert n1 == 20 and len(loss.data[1].x) == 1 and heat1 == 2
    p.lr_slider.value = 2e-3
    tr.step(40).wait(30)
    wait_for(lambda: tr.last_eval.get("step") == 60)
    p.refresh()
    assert len(loss.data[0].x) == 60 > n1
    assert len(p.figures["layer_grad_norm"].data[0].x) == 6 > heat1
    assert len(p.figures["lr"].data[0].y) == 60 and p.figures["lr"].data[0].y[-1] == pytest.approx(2e-3)
    changes = next(t for t in loss.data if t.name == "changes")
    assert 21 in list(changes.x)                             # a vertical line where the lr change took effect
    assert [t.name for t in p.figures["update_ratio"].data] == ["net.0.weight", "net.2.weight", "net.4.weight"]
    assert "step 60/1000" in p.status.value and p.progress.value == 60 and p.progress.max == 1000


def test_point_count_is_bounded_by_the_downsampling(runs_root, make_panel):
    tr = small(runs_root, max_steps=400, eval_every=0)
    p = make_panel(tr, n_out=100)
    tr.run()
    p.refresh()
    for name in ("loss", "lr", "grad_norm"):
        assert 0 < len(p.figures[name].data[0].x) <= 100
    assert p.points() <= 100


def test_divergence_alert_shows_with_actions_that_apply(runs_root, make_panel):
    tr = Trainer(scenario_config("lr_too_high", runs_root=str(runs_root), tensorboard=False))
    p = make_panel(tr)
    tr.start()
    wait_for(lambda: tr.status == "paused", timeout=60)      # the divergence policy paused the run
    p.refresh()
    slot = p.alert_slots[0]
    assert slot["box"].layout.display == ""
    assert "divergence" in slot["text"].value and "Evidence" in slot["text"].value
    labels = [b.description for b in slot["actions"] if b.layout.display != "none"]
    assert any("Lower the lr" in s for s in labels)
    j = next(i for i, b in enumerate(slot["actions"]) if b.description == "Lower the lr 10x")
    slot["actions"][j].click()
    assert p.last_request.wait(10).status == "applied"
    assert tr.controls.lr == pytest.approx(1.0)
    assert "paused" in p.request_line.value                  # tells the user to resume
    ev = tr.events
    assert ev.loc[ev["kind"] == "control", "source"].iloc[-1] == "notebook"
    p.refresh()
    alerts = next(t for t in p.figures["loss"].data if t.name == "alerts (events)")
    assert any("divergence" in s for s in alerts.text)      # the alert marker is labelled on the chart
    slot["dismiss"].click()
    wait_for(lambda: any(a.dismissed for a in tr.alerts), timeout=10)
    p.refresh()
    assert all(a.id != slot["alert_id"] or a.dismissed for a in tr.alerts)


def test_checkpoint_browser_forks_with_changes_and_resumes(runs_root, make_panel):
    tr = small(runs_root, max_steps=60, checkpoint_every=20, keep_checkpoints=10)
    p = make_panel(tr)
    tr.run()
    p.refresh(force=True)
    options = dict((path, label) for label, path in p.checkpoint_list.options)
    step20 = next(path for path in options if "step-00000020" in path)
    p.checkpoint_list.value = step20
    p.fork_changes.value = "lr=0.01, batch_size=16"
    p.fork_button.click()
    child = p.trainer
    assert child is not tr and p.trainers == [tr, child]
    assert child.step_count == 20 and child.lineage["parent_step"] == 20
    child.start()
    child.join(60)
    assert child.controls.lr == pytest.approx(0.01) and child.controls.batch_size == 16
    p.refresh()
    assert "fork of" in p.title.value and "finished" in p.status.value
    # resume-from on a finished run continues in its own directory from the chosen step
    p.attach(tr)
    p.refresh(force=True)
    p.checkpoint_list.value = next(path for label, path in p.checkpoint_list.options if "step-00000040" in path)
    p.resume_from_button.click()
    resumed = p.trainer
    assert resumed is not tr and resumed.step_count == 40 and resumed.run_dir == tr.run_dir
    assert len(p.figures["loss"].data[0].x) == 40            # the charts show the history up to that step


def test_resume_from_refuses_while_the_run_is_going(runs_root, make_panel):
    tr = small(runs_root, max_steps=100_000)
    p = make_panel(tr)
    tr.start(paused=True)
    p.save_button.click()
    wait_for(lambda: p.refresh() is not None and len(p.checkpoint_list.options) > 0, timeout=10)
    p.resume_from_button.click()
    assert "stop it first" in p.message.value and p.trainer is tr
    p.fork_changes.value = "lr=zzz"                          # a bad value: the engine's message, inline
    p.fork_button.click()
    assert "lr" in p.message.value and p.trainer is tr


def test_thread_poller_updates_at_a_bounded_rate(runs_root, make_panel):
    tr = small(runs_root, max_steps=300)
    p = make_panel(tr, poll="thread", interval=0.1)
    assert p.poller.mode == "thread" and p.poller.running
    t0 = time.monotonic()
    tr.start()
    tr.join(60)
    # only the poller refreshes here (no refresh() call): the status and the chart catch up on their own
    wait_for(lambda: "finished" in p.status.value and len(p.figures["loss"].data[0].x) == 300, timeout=10)
    elapsed = time.monotonic() - t0
    assert p.poller.ticks <= elapsed / 0.1 + 2             # never faster than the interval
    assert p.poller.error is None
    time.sleep(0.3)                                          # let the poller see the run's last event
    count = p.refresh_count
    time.sleep(0.35)
    assert p.refresh_count == count                          # nothing changed: no redraw
    p.close()
    assert not p.poller.running


def test_static_fallback_without_a_widget_frontend(runs_root, make_panel):
    tr = small(runs_root, max_steps=40)
    tr.run()
    p = make_panel(tr)
    bundle = p._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    page = bundle["text/html"]
    assert "plotly" in page.lower() and "step 40/40" in page and page.count("class=\"plotly-graph-div\"") == 7
    view = panel(tr, static=True)
    assert isinstance(view, StaticView) and "finished" in repr(view) and "plotly" in view._repr_html_().lower()


def test_trainer_panel_method_and_parse_changes(runs_root):
    tr = small(runs_root)
    p = tr.panel(poll=None)
    assert isinstance(p, Panel) and p.trainer is tr
    p.close()
    assert parse_changes("lr=3e-4, batch_size=32; precision=bf16") == {"lr": 3e-4, "batch_size": 32,
                                                                        "precision": "bf16"}
    assert parse_changes("  ") == {}
    with pytest.raises(ValueError, match="name=value"):
        parse_changes("lr 3")


def test_only_the_notebook_subpackage_imports_ipywidgets():
    offenders = [str(f.relative_to(ROOT)) for f in (ROOT / "workbench").rglob("*.py")
                 if "notebook" not in f.relative_to(ROOT / "workbench").parts
                 and re.search(r"^\s*(import|from)\s+ipywidgets", f.read_text(), re.M)]
    assert offenders == []


def test_live_source_matches_chart_data(runs_root):
    """The panel's incremental collector gives what chartdata.chart_data gives (series, layers, markers)."""
    import numpy as np
    import pandas as pd

    from workbench.chartdata import chart_data, layer_matrix
    from workbench.notebook.charts import LiveSource

    tr = small(runs_root, max_steps=300, layer_every=2, checkpoint_every=50, lr=3e-3)
    tr.start(paused=True)
    tr.step(100).wait(30)
    tr.set(lr=1e-3).wait(10)
    tr.resume()
    tr.join(60)
    a, b = chart_data(tr, max_cols=40), LiveSource(tr, max_cols=40).collect()
    assert set(b.series) == {"train_loss", "lr", "grad_norm", "val_loss", "val_acc"}   # what the panel draws
    for name in b.series:
        for u, v in zip(a.series[name], b.series[name]):
            assert np.array_equal(np.asarray(u), np.asarray(v), equal_nan=True), name
    pd.testing.assert_frame_equal(a.layers.reset_index(drop=True), b.layers.reset_index(drop=True), check_dtype=False)
    assert a.markers == b.markers and any(m["kind"] == "control" for m in b.markers)
    s1, l1, z1 = layer_matrix(a.layers)
    s2, l2, z2 = layer_matrix(b.layers)
    assert list(s1) == list(s2) and l1 == l2 and np.array_equal(z1, z2, equal_nan=True)


@pytest.mark.slow
def test_refresh_bench_runs_in_quick_mode(tmp_path):
    """bench/notebook_refresh.py --quick exits 0 and ends with its ratio line (no timing assertion)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "notebook_refresh.py"), "--quick"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines[-1].startswith("ratio") and "max points/trace" in proc.stdout


def test_every_request_line_resolves_without_a_refresh_call(runs_root, make_panel):
    """lr, pause, step and stop each show as pending, then as applied at their step; a request the run can
    no longer take shows as refused with the reason. Only the panel's own poller updates it here."""
    tr = small(runs_root, max_steps=100_000)
    p = make_panel(tr, poll="thread", interval=0.05)
    p.lr_slider.value = 3e-3                                 # the run has not started: the request waits
    assert "lr = 0.003: pending" in p.request_line.value
    p.pause_button.click()
    p.start_button.click()
    wait_for(lambda: "pause: applied at step" in p.request_line.value, timeout=10)
    assert "lr = 0.003: applied at step 1" in p.request_line.value and tr.status == "paused"
    p.step_n.value = 5
    p.step_button.click()
    wait_for(lambda: "step 5: applied at step" in p.request_line.value, timeout=10)
    p.stop_button.click()
    wait_for(lambda: "stop: applied at step" in p.request_line.value, timeout=10)
    assert tr.join(30) == "stopped"
    p.resume_button.click()                                  # the run ended: refused at once, with the reason
    wait_for(lambda: "resume: refused" in p.request_line.value, timeout=10)
    assert p.last_error.startswith("resume: refused") and "stop: applied" in p.request_line.value


def _json_problems(fig_or_widget, messages) -> list[str]:
    """What of a widget's state and of the messages it sent would not be valid JSON (NaN, inf), after the
    binary buffers are taken out as ipywidgets does before sending."""
    import json

    from ipywidgets.widgets.widget import _remove_buffers
    from plotly.serializers import _py_to_js

    def bad(obj) -> bool:
        try:
            json.dumps(_remove_buffers({"v": _py_to_js(obj, None)})[0], allow_nan=False)
            return False
        except ValueError:
            return True

    out = [k for k, v in fig_or_widget.get_state().items() if bad(v)]
    return out + [name for name, msg in messages if bad(msg)]


def test_no_message_to_the_browser_holds_nan(runs_root, make_panel):
    """jupyter_client warns ("Out of range float values are not JSON compliant") for every message holding
    NaN: a diverging run (NaN losses and gradients) with a dead layer must not produce one."""
    import ipywidgets as widgets

    tr = Trainer(scenario_config("lr_too_high", runs_root=str(runs_root), tensorboard=False, on_divergence="ignore",
                                 lr=1e4, max_steps=60, layer_every=5))
    p = make_panel(tr)
    sent: list[tuple[str, object]] = []
    for fig in p.figures.values():
        fig.observe(lambda ch: sent.append((ch["name"], ch["new"])) if ch["new"] is not None else None,
                    names=["_py2js_update", "_py2js_restyle", "_py2js_relayout", "_py2js_addTraces"])
    tr.run()
    p.refresh()
    assert not np.isfinite(tr.history["train_loss"]).all() and len(sent) >= 5
    assert any(np.isnan(np.asarray(t.y, dtype=float)).any() for t in p.figures["loss"].data[:1])
    for w in [p, *p.figures.values(), *(c for c in p.children if isinstance(c, widgets.Widget))]:
        assert _json_problems(w, sent if w in p.figures.values() else []) == [], type(w).__name__


def test_two_column_layout_readable_titles_ticks_and_labels(runs_root, make_panel):
    """Two charts a row; the title on its own line above the legend, the modebar upright on the right edge;
    log axes with written-out ticks (no "2 5" digits, no SI prefixes); loss on a log axis as in the
    dashboard; accuracy on a fixed 0-1 axis with a note until the first evaluation; alert labels written
    towards the chart's middle and never clipped; the user's zoom kept (uirevision)."""
    from workbench.notebook.charts import CHART_WIDTH

    tr = small(runs_root, max_steps=60, eval_every=30)
    p = make_panel(tr)
    assert p.children[-3].layout.grid_template_columns == f"repeat(2, {CHART_WIDTH}px)"
    for name, fig in p.figures.items():
        lay = fig.layout
        assert lay.width == CHART_WIDTH and lay.uirevision == "run", name
        assert lay.title.yanchor == "top" and lay.legend.yanchor == "bottom" and lay.legend.y >= 1, name
        assert lay.margin.t >= 60 and lay.modebar.orientation == "v", name
    assert p.figures["loss"].layout.yaxis.type == "log" and p.log_y.value
    assert p.figures["loss"].layout.yaxis.tickformat == "~g" and p.figures["lr"].layout.yaxis.tickformat == ".0e"
    acc = p.figures["val_acc"].layout
    assert list(acc.yaxis.range) == [0, 1.02] and "first evaluation" in acc.annotations[0].text
    tr.start(paused=True)
    tr.step(30).wait(30)
    wait_for(lambda: tr.last_eval.get("step") == 30)
    p.refresh()
    assert len(p.figures["val_acc"].layout.annotations) == 0 and len(p.figures["val_acc"].data[0].y) == 1
    tr.stop()
    tr.join(30)
    from workbench.chartdata import ChartData
    from workbench.notebook.charts import empty_data
    late = [{"step": 55, "kind": "alert", "label": "warning: overfitting"},
            {"step": 2, "kind": "alert", "label": "critical: divergence"}]
    p.charts.update(ChartData(series={"train_loss": (np.arange(1.0, 61.0), np.ones(60))},
                              layers=empty_data().layers, markers=late))
    pts = next(t for t in p.figures["loss"].data if t.name == "alerts (events)")
    assert list(pts.text) == ["overfitting", "divergence"] and pts.cliponaxis is False
    assert list(pts.textposition) == ["bottom left", "bottom right"]
    p.figures["loss"].layout.xaxis.update(range=[5, 10], autorange=False)   # what a zoom in the browser sets
    p.charts.reset(["net.0.weight"])                                         # another run (a fork): unzoomed
    assert p.figures["loss"].layout.xaxis.autorange is True
    assert list(p.figures["val_acc"].layout.yaxis.range) == [0, 1.02]


def test_evals_time_is_a_timestamp(runs_root):
    from workbench.runview import RunView

    tr = small(runs_root, max_steps=40)
    tr.run()
    for evals in (tr.evals, RunView(tr.run_dir).evals):
        assert isinstance(evals["time"].dtype, pd.DatetimeTZDtype) and len(evals) == 2
        assert abs(evals["time"].iloc[-1] - pd.Timestamp.now(tz="UTC")) < pd.Timedelta(minutes=5)


def test_watch_waits_on_the_event_loop_and_lets_the_poller_draw(runs_root, make_panel):
    """``await watch(tr)``: the loop stays free while the run trains (an asyncio poller draws meanwhile),
    ``until`` stops at a condition, a timeout raises, and it returns the run's status."""
    import asyncio

    from workbench.notebook import watch

    tr = small(runs_root, max_steps=100_000)

    async def lesson():
        p = make_panel(tr, poll="asyncio", interval=0.05, chart_interval=0.1)
        tr.start()
        t0 = time.monotonic()
        at = await watch(tr, until=lambda: time.monotonic() - t0 > 1.0)
        drawn_while_waiting = p.chart_redraws
        with pytest.raises(TimeoutError, match="not done after"):
            await watch(tr, until=lambda: False, timeout=0.01)
        tr.stop()
        end = await watch(tr)
        p.poller.stop()
        return at, drawn_while_waiting, end

    at, drawn, end = asyncio.run(lesson())
    assert at == "running" and end == "stopped" and drawn >= 3
