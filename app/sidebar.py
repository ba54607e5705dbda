"""The sidebar: runs folder, the demo button, the run picker, the selected run's live controls and commands,
and the fate of each request the page sent."""
from __future__ import annotations

import streamlit as st

from workbench import handle, runs

from . import actions, settings
from .ui import (attempt, cb_demo, control_inputs, flash, guarded, name_of, record, root, show_flash, ss,
                 sync_inputs, wanted_controls)


def where_text(who: dict) -> str:
    """Who trains the run (a run handle's ``owner()``), in words."""
    if who["where"] == "app":
        return "trained in this app"
    if who["where"] == "process":
        return f"trained by another process (pid {who['pid']}): changes go through the run's inbox"
    return "not training (ended, or its process is gone)"


def cb_apply(run_key: str) -> None:
    def go() -> None:
        current = handle.open_run(run_key).snapshot().get("controls", {})
        changes = actions.changed_controls(current, wanted_controls("ctl"))
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


def sidebar_ui() -> str | None:
    """Runs folder, demo button, run picker and the selected run's controls. Returns the selected run key."""
    with st.sidebar:
        st.title("Training Workbench")
        st.text_input("Runs folder", key="runs_root", help="Every run directory under it is listed")
        try:
            settings.confine(ss.get("runs_root") or settings.DEFAULT_RUNS, "runs folder")
        except ValueError as e:
            st.error(f"{e}. Showing {root()}.")
        st.button("Start the demo run", key="demo_start", on_click=cb_demo, type="primary", width="stretch",
                  icon=":material/play_arrow:",
                  help="configs/demo.yaml: an MLP on the 8x8 digits that trains for a few minutes")
        show_flash("demo")
        table = runs.describe_runs(root())
        if table.empty:
            st.info(f"No runs under {root()} yet: start the demo, or launch one in the Launch tab.")
            return None
        # the name only: a label that changes under a kept selection is not redrawn by the browser
        labels = dict(zip(table["key"], table["run"]))
        if ss.get("run_select") not in labels:
            ss["run_select"] = table["key"].iloc[0]
        run_key = st.selectbox("Run", list(labels), key="run_select", format_func=lambda k: labels.get(k, k))
        st.fragment(controls_ui)(run_key)
        return run_key


def controls_ui(run_key: str) -> None:
    """The selected run's live controls and commands: a fragment, so that a click reruns this panel alone
    and is answered in it at once (applied at step N / refused and why / pending), however busy the rest
    of the page is.

    Every button is always enabled. A button disabled from what a page run saw stays disabled until the
    next full rerun: a run that looked ended (or whose process looked gone) for one read kept its Stop
    greyed out for the rest of a long session, and clicks on it did nothing. A click on a run that cannot
    take it is answered by the engine instead (refused, and why)."""
    with guarded("controls"):
        run = handle.open_run(run_key)
        snap = run.snapshot()
        who = run.owner()
        st.subheader("Controls")
        st.caption(where_text(who))
        sync_inputs("ctl", run_key, snap.get("controls") or {})
        control_inputs("ctl", fixed=run.fixed_controls)
        st.button("Apply changes", key="ctl_apply", on_click=cb_apply, args=(run_key,), type="primary",
                  width="stretch")
        c1, c2 = st.columns(2)
        c1.button("Pause", key="cmd_pause", on_click=cb_command, args=(run_key, "pause"), width="stretch",
                  icon=":material/pause:")
        c2.button("Resume", key="cmd_resume", on_click=cb_command, args=(run_key, "resume"), width="stretch",
                  icon=":material/play_arrow:")
        c1, c2 = st.columns(2)
        c1.number_input("Steps", key="cmd_step_n", value=5, step=1, label_visibility="collapsed")
        c2.button("Step", key="cmd_step", on_click=cb_command, args=(run_key, "step"), width="stretch",
                  icon=":material/skip_next:", help="While paused: run this many steps, then pause")
        c1, c2 = st.columns(2)
        c1.button("Save", key="cmd_checkpoint", on_click=cb_command, args=(run_key, "checkpoint"),
                  width="stretch", icon=":material/save:", help="Save a checkpoint now")
        c2.button("Stop", key="cmd_stop", on_click=cb_command, args=(run_key, "stop"), width="stretch",
                  icon=":material/stop:", help="Finish the step, save a checkpoint, end the run")
        show_flash("controls")
        pending = any(o.state()["status"] == "pending" for o in ss.get("requests", []))
        st.fragment(run_every=settings.LIVE_REFRESH_S if pending else None)(requests_ui)()


def requests_ui() -> None:
    """The dashboard's recent requests and their fate (applied at step N / refused, and why / pending)."""
    reqs = ss.get("requests", [])[-6:]
    if not reqs:
        return
    st.caption("Recent requests")
    colors = {"applied": "green", "refused": "red", "pending": "orange"}
    for o in reversed(reqs):
        st.markdown(f":{colors.get(o.state()['status'], 'gray')}[●] {name_of(o.run_dir)} — {o.text()}")
