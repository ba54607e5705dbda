"""Training Workbench dashboard: watch and steer training runs in the browser.

    streamlit run app/dashboard.py --server.address 127.0.0.1 -- --runs ROOT [--demo]
    workbench dashboard [--runs ROOT] [--port P] [--demo]

Sidebar: runs folder, the demo button, the run picker, live controls (lr, batch size, precision, grad
clip, accumulation; pause / resume / step / stop / save checkpoint) and the fate of each request.
Tabs: Live (charts refreshed by ``st.fragment(run_every=...)``), Runs, Launch, Diagnosis, Checkpoints
(resume, fork, lineage), Compare, TensorBoard. The page is thin: it reads snapshots and stored series
from the engine and calls its public API; trainers started here live in ``workbench.registry``, so a
reload or another tab sees them and closing a tab never ends a run.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from app import actions, compare, live, settings, sources, tb  # noqa: E402
from workbench import figures, registry  # noqa: E402
from workbench.config import OPTIMIZERS, PRECISIONS, SCHEDULES, TrainConfig  # noqa: E402
from workbench.runview import chart_data  # noqa: E402
from workbench.scenarios import SCENARIOS  # noqa: E402

log = logging.getLogger("workbench.dashboard")
ss = st.session_state

DATASETS = ("digits", "breast_cancer", "wine", "moons", "spirals", "regression", "csv")
MODELS = ("mlp", "cnn", "logreg")
LAUNCH_KINDS = ("Built-in data and model", "YAML config", "Scenario")
COMPARE_METRICS = ("train_loss", "val_loss", "val_acc", "lr", "grad_norm")
STATUS_COLORS = {"running": "green", "paused": "orange", "idle": "gray", "finished": "blue", "stopped": "gray",
                 "failed": "red"}
SEVERITY_COLORS = {"critical": "red", "warning": "orange", "info": "blue"}
CHART_ROWS = (("loss", "lr"), ("grad_norm", "val_acc"), ("layer_grad_norm", "update_ratio"))


# ============================================================================ small helpers
@contextmanager
def guarded(where: str) -> Iterator[None]:
    """Show an error inline instead of a stack trace; the traceback goes to the server log."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - the page must never show a traceback
        log.exception("dashboard: %s failed", where)
        st.error(f"{where}: {message(e)}")


def message(e: BaseException) -> str:
    """The engine's own text for bad input; the exception's name for anything else."""
    if isinstance(e, (ValueError, TypeError, RuntimeError, KeyError)):
        return str(e).strip("'\"") if isinstance(e, KeyError) else str(e)
    return f"{type(e).__name__}: {e}"


def flash(slot: str, level: str, text: str) -> None:
    """Leave a message for a section to show on the next run (callbacks cannot draw where it belongs)."""
    ss.setdefault("_flash", {})[slot] = (level, text)


def show_flash(slot: str) -> None:
    item = ss.setdefault("_flash", {}).pop(slot, None)
    if item:
        getattr(st, item[0])(item[1])


def record(slot: str, outcome: actions.Outcome) -> None:
    """Keep the request to follow its fate, and say at once what happened to it."""
    ss.setdefault("requests", []).append(outcome)
    del ss["requests"][:-20]
    status = outcome.state()["status"]
    flash(slot, {"applied": "success", "refused": "error"}.get(status, "info"), outcome.text())


def attempt(slot: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a button's action; bad input or a refusal becomes an inline error in ``slot``."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - shown on the page, logged for the operator
        if not isinstance(e, (ValueError, TypeError, RuntimeError)):
            log.exception("dashboard action failed")
        flash(slot, "error", message(e))
        return None


def fmt_time(t: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


def root() -> str:
    return str(Path(ss.get("runs_root") or settings.DEFAULT_RUNS).expanduser().resolve())


def name_of(run_key: str) -> str:
    return Path(run_key).name


def select_run(run_key: str) -> None:
    ss["run_select"] = run_key


def where_text(run_key: str) -> str:
    who = sources.owner(run_key)
    if who["where"] == "app":
        return "trained in this app"
    if who["where"] == "process":
        return f"trained by another process (pid {who['pid']}): changes go through the run's inbox"
    return "not training (ended, or its process is gone)"


# ============================================================================ callbacks
def cb_demo() -> None:
    tr = attempt("demo", actions.start_demo, root())
    if tr is not None:
        select_run(registry.key(tr.run_dir))
        flash("demo", "success", f"Started the demo run {tr.run_dir.name}: watch it in the Live tab.")


def cb_apply(run_key: str) -> None:
    def go() -> None:
        current = sources.get_source(run_key).snapshot().get("controls", {})
        wanted = {"lr": ss.get("ctl_lr"), "batch_size": ss.get("ctl_batch_size"),
                  "precision": ss.get("ctl_precision"), "grad_clip": ss.get("ctl_grad_clip"),
                  "accumulate": ss.get("ctl_accumulate")}
        changes = actions.changed_controls(current, wanted)
        if not changes:
            flash("controls", "info", "Nothing to change: these are the values in force.")
            return
        record("controls", actions.apply_controls(run_key, changes))

    attempt("controls", go)


def cb_command(run_key: str, action: str) -> None:
    def go() -> None:
        n = ss.get("cmd_step_n", 1) if action == "step" else 1
        record("controls", actions.command(run_key, action, n=n))

    attempt("controls", go)


def cb_launch() -> None:
    def go() -> None:
        kind = ss["launch_source"]
        base = actions.base_config(kind, ss.get("launch_yaml"), ss.get("launch_scenario"))
        fields = {k: ss.get(f"launch_{k}") for k in ("optimizer", "lr", "schedule", "batch_size", "precision",
                                                     "max_epochs", "max_steps", "seed")}
        fields["name"] = (ss.get("launch_name") or "").strip() or None
        if kind == LAUNCH_KINDS[0]:
            ds = ss.get("launch_dataset", "digits")
            if ds == "csv":
                path = (ss.get("launch_csv") or "").strip()
                if not path:
                    raise ValueError("dataset: csv needs a file; allowed: the path of a CSV file")
                ds = f"csv:{path}"
                target = (ss.get("launch_csv_target") or "").strip()
                fields["dataset_options"] = {"target": target} if target else {}
            fields["dataset"], fields["model"] = ds, ss.get("launch_model", "mlp")
        cfg = actions.build_config(base, fields, ss.get("launch_overrides", ""), runs_root=root())
        tr = actions.launch(cfg, paused=bool(ss.get("launch_paused")))
        select_run(registry.key(tr.run_dir))
        flash("launch", "success", f"Started run {tr.run_dir.name} ({cfg.dataset}, {cfg.model}, {cfg.optimizer}, "
                                   f"lr {cfg.lr:g}): watch it in the Live tab.")

    attempt("launch", go)


def cb_alert_action(run_key: str, alert: dict, index: int) -> None:
    attempt("diagnosis", lambda: record("diagnosis", actions.apply_alert_action(run_key, alert, index)))


def cb_dismiss(run_key: str, alert_id: int) -> None:
    attempt("diagnosis", lambda: record("diagnosis", actions.dismiss_alert(run_key, alert_id)))


def cb_resume(run_key: str) -> None:
    def go() -> None:
        tr = actions.resume(run_key, ss.get("ckpt_select"))
        flash("checkpoints", "success", f"Resumed {tr.run_dir.name} at step {tr.step_count} in this app.")

    attempt("checkpoints", go)


def cb_fork(run_key: str) -> None:
    def go() -> None:
        ckpt = ss.get("ckpt_select")
        if not ckpt:
            raise ValueError("fork: pick a checkpoint first")
        current = sources.get_source(run_key).snapshot().get("controls", {})
        wanted = {"lr": ss.get("fork_lr"), "batch_size": ss.get("fork_batch_size"),
                  "precision": ss.get("fork_precision"), "grad_clip": ss.get("fork_grad_clip"),
                  "accumulate": ss.get("fork_accumulate")}
        changes = actions.changed_controls(current, wanted)
        child = actions.fork(run_key, ckpt, changes, root())
        select_run(registry.key(child.run_dir))
        what = ", ".join(f"{k}={v}" for k, v in changes.items()) or "the same controls"
        flash("checkpoints", "success", f"Forked {child.run_dir.name} from step {child.step_count} with {what}.")

    attempt("checkpoints", go)


def cb_tb(run_key: str, start: bool) -> None:
    attempt("tensorboard", tb.start if start else tb.stop, run_key)


# ============================================================================ sidebar: runs, controls, requests
def sync_inputs(prefix: str, run_key: str, controls: dict[str, Any]) -> None:
    """Load the controls in force into the ``prefix_*`` inputs when the run or its controls change."""
    sig = (run_key, tuple(sorted((k, repr(v)) for k, v in controls.items())))
    if ss.get(f"_{prefix}_sig") == sig:
        return
    ss[f"_{prefix}_sig"] = sig
    gc = controls.get("grad_clip")
    ss[f"{prefix}_lr"] = f"{controls.get('lr', 1e-3):.6g}"
    ss[f"{prefix}_batch_size"] = int(controls.get("batch_size") or 64)
    ss[f"{prefix}_precision"] = controls.get("precision") if controls.get("precision") in PRECISIONS else "fp32"
    ss[f"{prefix}_grad_clip"] = "" if gc is None else f"{gc:.6g}"
    ss[f"{prefix}_accumulate"] = int(controls.get("accumulate") or 1)


def control_inputs(prefix: str) -> None:
    """The five live-control inputs (lr, batch size, precision, grad clip, accumulation)."""
    st.text_input("Learning rate (base)", key=f"{prefix}_lr", help="The schedule multiplies it; e.g. 3e-4")
    c1, c2 = st.columns(2)
    c1.number_input("Batch size", key=f"{prefix}_batch_size", step=1)
    c2.number_input("Accumulate", key=f"{prefix}_accumulate", step=1, help="Micro-batches per optimizer step")
    c1, c2 = st.columns(2)
    c1.selectbox("Precision", PRECISIONS, key=f"{prefix}_precision")
    c2.text_input("Grad clip", key=f"{prefix}_grad_clip", help="Max global grad norm; empty = off")


def sidebar() -> str | None:
    """Runs folder, demo button, run picker and the selected run's controls. Returns the selected run key."""
    with st.sidebar:
        st.title("Training Workbench")
        st.text_input("Runs folder", key="runs_root", help="Every run directory under it is listed")
        st.button("Start the demo run", key="demo_start", on_click=cb_demo, type="primary", width="stretch",
                  icon=":material/play_arrow:",
                  help="configs/demo.yaml: an MLP on the 8x8 digits, Adam, warmup-cosine, 15 epochs")
        show_flash("demo")
        runs = sources.describe_runs(root())
        if runs.empty:
            st.info(f"No runs under {root()} yet: start the demo, or launch one in the Launch tab.")
            return None
        # the name only: a label that changes under a kept selection is not redrawn by the browser
        labels = dict(zip(runs["key"], runs["run"]))
        if ss.get("run_select") not in labels:
            ss["run_select"] = runs["key"].iloc[0]
        run_key = st.selectbox("Run", list(labels), key="run_select", format_func=lambda k: labels.get(k, k))
        with guarded("controls"):
            controls_panel(run_key)
        return run_key


def controls_panel(run_key: str) -> None:
    src = sources.get_source(run_key)
    snap = src.snapshot()
    ss["_status_seen"] = (run_key, snap["status"])
    who = sources.owner(run_key)
    st.subheader("Controls")
    st.caption(where_text(run_key))
    sync_inputs("ctl", run_key, snap.get("controls") or {})
    control_inputs("ctl")
    steerable = who["alive"] or (who["where"] == "app" and snap["status"] not in sources.ENDED)
    st.button("Apply changes", key="ctl_apply", on_click=cb_apply, args=(run_key,), type="primary", width="stretch",
              disabled=not steerable)
    c1, c2 = st.columns(2)
    c1.button("Pause", key="cmd_pause", on_click=cb_command, args=(run_key, "pause"), disabled=not steerable,
              width="stretch", icon=":material/pause:")
    c2.button("Resume", key="cmd_resume", on_click=cb_command, args=(run_key, "resume"), disabled=not steerable,
              width="stretch", icon=":material/play_arrow:")
    c1, c2 = st.columns(2)
    c1.number_input("Steps", key="cmd_step_n", value=5, step=1, label_visibility="collapsed")
    c2.button("Step", key="cmd_step", on_click=cb_command, args=(run_key, "step"), disabled=not steerable,
              width="stretch", icon=":material/skip_next:", help="While paused: run this many steps, then pause")
    c1, c2 = st.columns(2)
    c1.button("Save", key="cmd_checkpoint", on_click=cb_command, args=(run_key, "checkpoint"),
              width="stretch", disabled=not steerable and who["where"] != "app", icon=":material/save:",
              help="Save a checkpoint now")
    c2.button("Stop", key="cmd_stop", on_click=cb_command, args=(run_key, "stop"), disabled=not steerable,
              width="stretch", icon=":material/stop:", help="Finish the step, save a checkpoint, end the run")
    if not steerable:
        st.caption("This run is not training: resume it or fork it from a checkpoint (Checkpoints tab).")
    show_flash("controls")
    pending = any(o.state()["status"] == "pending" for o in ss.get("requests", []))
    st.fragment(run_every=settings.LIVE_REFRESH_S if pending else None)(requests_panel)()


def requests_panel() -> None:
    """The dashboard's recent requests and their fate (applied at step N / refused, and why / pending)."""
    reqs = ss.get("requests", [])[-6:]
    if not reqs:
        return
    st.caption("Recent requests")
    colors = {"applied": "green", "refused": "red", "pending": "orange"}
    for o in reversed(reqs):
        st.markdown(f":{colors.get(o.state()['status'], 'gray')}[●] {name_of(o.run_dir)} — {o.text()}")


# ============================================================================ tabs
def live_tab(run_key: str | None) -> None:
    if not run_key:
        st.info("No run yet. Click **Start the demo run** in the sidebar, or launch one in the Launch tab.")
        return
    st.toggle("Log-scale loss", key="live_log_y", value=True)
    going = sources.owner(run_key)["alive"] or ss.get("_status_seen", (None, ""))[1] not in sources.ENDED
    st.fragment(run_every=settings.LIVE_REFRESH_S if going else None)(live_view)(run_key, bool(ss.live_log_y))


def live_view(run_key: str, log_y: bool) -> None:
    """The live view of one run (a fragment: it alone refreshes every second while the run goes)."""
    with guarded("live view"):
        src = sources.get_source(run_key)
        p = live.live_payload(src, log_y=log_y)
        snap = p.snapshot
        status = snap["status"]
        seen = ss.get("_status_seen")
        if seen is not None and seen[0] == run_key and seen[1] != status:
            ss["_status_seen"] = (run_key, status)
            st.rerun(scope="app")  # the run started/paused/ended: refresh the controls and lists too
        ev = snap.get("last_eval") or {}
        st.markdown(f"### {name_of(run_key)} — :{STATUS_COLORS.get(status, 'gray')}[{status}]")
        st.caption(f"{where_text(run_key)} · {run_key}")
        total = snap.get("total_steps")
        if total:
            st.progress(min(1.0, snap["step"] / total), text=f"step {snap['step']} of {total} · epoch {snap['epoch']}")
        cols = st.columns(6)
        cols[0].metric("Step", snap["step"])
        cols[1].metric("Train loss", live.fmt(snap.get("train_loss")))
        cols[2].metric("Val loss", live.fmt(ev.get("val_loss")))
        cols[3].metric("Val acc", live.fmt(ev.get("val_acc"), ".2%"))
        cols[4].metric("LR now", live.fmt(p.lr_now, ".3g"))
        cols[5].metric("Samples/s", live.fmt(snap.get("samples_per_s"), ",.0f"))
        alerts, open_ids = sources.alerts_of(src)
        if open_ids:
            kinds = ", ".join(sorted({a["kind"] for a in alerts if a["id"] in open_ids}))
            st.warning(f"{len(open_ids)} open alert(s): {kinds}. See the Diagnosis tab.")
        for left, right in CHART_ROWS:
            c1, c2 = st.columns(2)
            c1.plotly_chart(p.figures[left], key=f"live_{left}", config={"displaylogo": False})
            c2.plotly_chart(p.figures[right], key=f"live_{right}", config={"displaylogo": False})
        st.markdown("**Recent changes, checkpoints and alerts** (dashed lines on the charts)")
        if p.recent.empty:
            st.caption("None yet.")
        else:
            st.table(p.recent, hide_index=True)
        st.caption(f"Each trace holds at most {p.data.points} points (downsampled, minima and maxima kept).")


def runs_tab() -> None:
    st.caption(f"Every run under {root()} — started here, from the command line or from a notebook. "
               f"Pick one in the sidebar to watch and steer it.")
    st.fragment(run_every=settings.SLOW_REFRESH_S)(runs_table)()


def runs_table() -> None:
    with guarded("runs"):
        df = sources.describe_runs(root())
        if df.empty:
            st.info(f"No runs under {root()} yet.")
            return
        view = pd.DataFrame({"run": df["run"], "status": df["status"], "step": df["step"],
                             "best val loss": df["best_val_loss"], "started": [fmt_time(t) for t in df["started"]],
                             "dataset": df.get("dataset"), "model": df.get("model"), "trained by": df["where"]})
        st.dataframe(view, hide_index=True, key="runs_table",
                     column_config={"best val loss": st.column_config.NumberColumn(format="%.4f")})
        st.caption("A status ending in ? says the run's process is gone without ending it (resume it from "
                   "its checkpoints).")


def sync_launch_form(sig: tuple, base: TrainConfig) -> None:
    """Load the chosen starting config into the launch form when the choice changes."""
    if ss.get("_launch_sig") == sig:
        return
    ss["_launch_sig"] = sig
    ss["launch_optimizer"] = base.optimizer
    ss["launch_lr"] = f"{base.lr:g}"
    ss["launch_schedule"] = base.schedule
    ss["launch_batch_size"] = int(base.batch_size)
    ss["launch_precision"] = base.precision
    ss["launch_max_epochs"] = "" if base.max_epochs is None else str(base.max_epochs)
    ss["launch_max_steps"] = "" if base.max_steps is None else str(base.max_steps)
    ss["launch_seed"] = "" if base.seed is None else str(base.seed)
    ss["launch_name"] = base.name or ""
    if base.dataset in DATASETS:
        ss["launch_dataset"] = base.dataset
    if base.model in MODELS:
        ss["launch_model"] = base.model


def launch_tab() -> None:
    st.button("Start the demo run (one click)", key="launch_demo", on_click=cb_demo, icon=":material/play_arrow:",
              help="configs/demo.yaml: an MLP on the 8x8 digits, Adam, warmup-cosine, 15 epochs, seed 0")
    show_flash("demo")
    st.markdown("**Or set up a run**")
    ss.setdefault("launch_source", LAUNCH_KINDS[0])
    ss.setdefault("launch_yaml", "configs/demo.yaml")
    kind = st.radio("Start from", LAUNCH_KINDS, key="launch_source", horizontal=True)
    yaml_path = scenario = None
    if kind == "YAML config":
        yaml_path = st.text_input("YAML config file", key="launch_yaml")
    elif kind == "Scenario":
        scenario = st.selectbox("Teaching scenario", list(SCENARIOS), key="launch_scenario",
                                format_func=lambda n: f"{n} — {SCENARIOS[n].title}")
        sc = SCENARIOS[scenario]
        st.caption(f"Watch for: {sc.watch} Expected alert: {sc.expect or 'none (healthy)'}.")
    try:
        base = actions.base_config(kind, yaml_path, scenario)
    except Exception as e:  # noqa: BLE001 - bad YAML path or file: say so inline
        st.error(message(e))
        return
    sync_launch_form((kind, yaml_path, scenario), base)
    if kind == LAUNCH_KINDS[0]:
        c1, c2 = st.columns(2)
        ds = c1.selectbox("Data set", DATASETS, key="launch_dataset")
        c2.selectbox("Model", MODELS, key="launch_model")
        if ds == "csv":
            c1.text_input("CSV file", key="launch_csv")
            c2.text_input("Target column (empty: the last)", key="launch_csv_target")
    else:
        st.caption(f"Data set {base.dataset}, model {base.model} {base.model_options or ''}")
    c1, c2, c3, c4 = st.columns(4)
    c1.selectbox("Optimizer", OPTIMIZERS, key="launch_optimizer")
    c2.text_input("Learning rate", key="launch_lr")
    c3.selectbox("Schedule", SCHEDULES, key="launch_schedule")
    c4.number_input("Batch size", key="launch_batch_size", step=1)
    c1, c2, c3, c4 = st.columns(4)
    c1.selectbox("Precision", PRECISIONS, key="launch_precision")
    c2.text_input("Epochs (empty: no limit)", key="launch_max_epochs")
    c3.text_input("Steps (empty: no limit)", key="launch_max_steps")
    c4.text_input("Seed (empty: random)", key="launch_seed")
    c1, c2 = st.columns([1, 3])
    c1.text_input("Run name (optional)", key="launch_name")
    c2.text_area("More fields, one key=value per line (as --set)", key="launch_overrides", height=68,
                 placeholder="model_options.depth=3\nweight_decay=1e-4")
    st.checkbox("Start paused", key="launch_paused")
    st.button("Start", key="launch_start", on_click=cb_launch, type="primary")
    show_flash("launch")


def diagnosis_tab(run_key: str | None) -> None:
    if not run_key:
        st.info("Select a run to see its diagnosis.")
        return
    show_flash("diagnosis")
    st.fragment(run_every=settings.SLOW_REFRESH_S)(diagnosis_view)(run_key)


def diagnosis_view(run_key: str) -> None:
    with guarded("diagnosis"):
        src = sources.get_source(run_key)
        alerts, open_ids = sources.alerts_of(src)
        in_app = registry.get(run_key) is not None
        if in_app:
            d = src.diagnose()
            health, summary = d["health"], d["summary"]
        else:
            sev = {a["severity"] for a in alerts if a["id"] in open_ids}
            health = "critical" if "critical" in sev else "warning" if "warning" in sev else "healthy"
            summary = f"{len(alerts)} alert(s) in the run's event log."
        st.markdown(f"**Health: {health}** — {summary}")
        if not alerts:
            st.success("No problems detected so far.")
            return
        current = [a for a in alerts if a["id"] in open_ids]
        live = in_app or sources.owner(run_key)["where"] == "process"  # steerable, here or through the inbox
        for a in current or alerts[:5]:
            alert_card(run_key, a, live, is_open=a["id"] in open_ids)
        earlier = [a for a in alerts if a["id"] not in open_ids]
        if earlier:
            with st.expander(f"All alerts ({len(alerts)})"):
                st.dataframe(pd.DataFrame([{k: a.get(k) for k in ("step", "kind", "severity", "message", "dismissed")}
                                           for a in alerts]), hide_index=True)


def alert_card(run_key: str, a: dict, live: bool, is_open: bool) -> None:
    with st.container(border=True):
        st.markdown(f"**{a['kind']}** — :{SEVERITY_COLORS.get(a['severity'], 'gray')}[{a['severity']}], step {a['step']}, "
                    f"confidence {float(a.get('confidence', 0)):.0%}"
                    + (" · dismissed" if a.get("dismissed") else "" if is_open else " · episode over"))
        st.write(a["message"])
        st.caption(f"Evidence: {a['evidence']}")
        acts = a.get("actions") or []
        cols = st.columns(max(1, len(acts) + (1 if live else 0)))
        for i, act in enumerate(acts):
            applicable = bool(act.get("controls")) or bool(act.get("rollback"))
            if applicable:
                cols[i].button(act["label"], key=f"alert_{a['id']}_act_{i}", on_click=cb_alert_action,
                               args=(run_key, a, i), help=str(act.get("controls") or "roll back"))
            else:
                cols[i].caption(f"Next run: {act['label']} ({act.get('hint') or ''})")
        if live and not a.get("dismissed"):
            cols[-1].button("Dismiss (false alarm)", key=f"alert_{a['id']}_dismiss", on_click=cb_dismiss,
                            args=(run_key, a["id"]))


def checkpoints_tab(run_key: str | None) -> None:
    if not run_key:
        st.info("Select a run to see its checkpoints.")
        return
    st.fragment(run_every=settings.SLOW_REFRESH_S)(checkpoint_table)(run_key)
    src = sources.get_source(run_key)
    table = src.checkpoints
    show_flash("checkpoints")
    if table.empty:
        return
    paths = list(table.sort_values(["step", "time"])["path"])[::-1]
    steps = dict(zip(table["path"], table["step"]))
    tags = dict(zip(table["path"], table["tag"]))
    if ss.get("ckpt_select") not in paths:
        ss["ckpt_select"] = paths[0]
    st.selectbox("Checkpoint", paths, key="ckpt_select",
                 format_func=lambda p: f"step {steps.get(p)} ({tags.get(p)}) — {Path(p).name}")
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Resume** this run from the checkpoint (same directory; later rows are replaced)")
        st.button("Resume from checkpoint", key="ckpt_resume", on_click=cb_resume, args=(run_key,))
    with c2:
        st.markdown("**Fork** a new run from it with changed controls")
        sync_inputs("fork", run_key, src.snapshot().get("controls") or {})
        control_inputs("fork")
        st.button("Fork into a new run", key="fork_start", on_click=cb_fork, args=(run_key,), type="primary")


def checkpoint_table(run_key: str) -> None:
    with guarded("checkpoints"):
        src = sources.get_source(run_key)
        table = src.checkpoints
        if table.empty:
            st.info("No checkpoint yet: they are written every checkpoint_every steps, at the best val loss, "
                    "at stop and at the end — or save one now from the sidebar.")
        else:
            view = table.sort_values(["step", "time"], ascending=False)
            st.dataframe(pd.DataFrame({"step": view["step"], "tag": view["tag"], "metric": view["metric"],
                                       "saved": [fmt_time(t) for t in view["time"]],
                                       "file": [Path(p).name for p in view["path"]],
                                       "on disk": [Path(p).exists() for p in view["path"]]}), hide_index=True)
        lin = sources.lineage(run_key, root())
        parts = [f"`{name_of(a['run'])}` → (step {a['step']})" for a in lin["ancestors"]]
        parts.append(f"**`{name_of(run_key)}`**")
        text = " ".join(parts)
        if lin["children"]:
            text += " → forks: " + ", ".join(f"`{name_of(c['run'])}` (from step {c['step']})" for c in lin["children"])
        st.markdown(f"Lineage: {text}")


def compare_tab(run_key: str | None) -> None:
    runs = sources.describe_runs(root())
    if runs.empty:
        st.info("No runs to compare yet.")
        return
    keys = list(runs["key"])
    if "compare_runs" not in ss and run_key:
        lin = sources.lineage(run_key, root())
        family = [a["run"] for a in lin["ancestors"]] + [run_key] + [c["run"] for c in lin["children"]]
        ss["compare_runs"] = [k for k in family if k in keys]
    ss["compare_runs"] = [k for k in ss.get("compare_runs", []) if k in keys]
    chosen = st.multiselect("Runs", keys, key="compare_runs", format_func=name_of)
    c1, c2 = st.columns([2, 1])
    metric = c1.selectbox("Metric", COMPARE_METRICS, key="compare_metric")
    log_y = c2.toggle("Log-scale y", key="compare_log_y", value=metric in ("train_loss", "val_loss", "lr"))
    if not chosen:
        st.info("Pick runs to overlay (forks and their parent, or any runs).")
        return
    st.fragment(run_every=settings.SLOW_REFRESH_S)(compare_view)(tuple(chosen), metric, log_y)


def compare_view(chosen: tuple[str, ...], metric: str, log_y: bool) -> None:
    with guarded("compare"):
        srcs = {name_of(k): sources.get_source(k) for k in chosen}
        fig = figures.compare_figure({n: chart_data(live.ChartSource(s)) for n, s in srcs.items()}, metric=metric,
                                     log_y=log_y)
        st.plotly_chart(fig, key="compare_chart", config={"displaylogo": False})
        st.dataframe(compare.metrics_table(srcs), hide_index=True)
        diff = compare.config_diff({n: sources.config_of(s) for n, s in srcs.items()})
        only = st.toggle("Only the fields that differ", key="compare_only_diff", value=True)
        shown = diff[diff["differs"]] if only else diff
        st.caption("Config fields (rows that differ between the runs are shaded)")
        st.dataframe(compare.highlight_differences(shown.reset_index(drop=True)), hide_index=True)


def tensorboard_tab(run_key: str | None) -> None:
    if not run_key:
        st.info("Select a run.")
        return
    st.markdown("Open this run's TensorBoard logs with:")
    st.code(tb.command(run_key), language="bash")
    if not tb.available():
        st.info("TensorBoard is not installed in this environment.")
        return
    url = tb.running(run_key)
    if url:
        st.markdown(f"TensorBoard runs at [{url}]({url}) (it takes a few seconds to come up).")
        st.button("Stop TensorBoard", key="tb_stop", on_click=cb_tb, args=(run_key, False))
    else:
        st.button("Start TensorBoard on 127.0.0.1", key="tb_start", on_click=cb_tb, args=(run_key, True))
    show_flash("tensorboard")


# ============================================================================ the page
def main() -> None:
    st.set_page_config(page_title="Training Workbench", layout="wide")
    opts = settings.parse_options()
    if registry.once("gc-freeze"):
        live.freeze_long_lived()
    ss.setdefault("runs_root", opts.runs)
    ss.setdefault("requests", [])
    if opts.demo and registry.once(f"demo:{opts.runs}"):
        tr = attempt("demo", actions.start_demo, opts.runs)
        if tr is not None:
            select_run(registry.key(tr.run_dir))
    run_key = sidebar()
    tabs = st.tabs([":material/monitoring: Live", ":material/list: Runs", ":material/rocket_launch: Launch",
                    ":material/stethoscope: Diagnosis", ":material/save: Checkpoints", ":material/compare_arrows: Compare",
                    ":material/bar_chart: TensorBoard"])
    sections = (lambda: live_tab(run_key), runs_tab, launch_tab, lambda: diagnosis_tab(run_key),
                lambda: checkpoints_tab(run_key), lambda: compare_tab(run_key), lambda: tensorboard_tab(run_key))
    for tab, (title, draw) in zip(tabs, zip(("live", "runs", "launch", "diagnosis", "checkpoints", "compare",
                                             "tensorboard"), sections)):
        with tab, guarded(title):
            draw()


main()
