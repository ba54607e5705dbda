"""The Checkpoints tab: the run's checkpoints and lineage; resume the run from one, or fork a new run from one
with changed controls.

The whole tab is one fragment that reads the run's checkpoint table at each refresh, so a run's first
checkpoints bring their selector, Resume and Fork with them, without waiting for a full rerun of the page.
The fork form holds the selected checkpoint's controls (what a fork from it starts with), and a fork
applies only what the user changed from those."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from workbench import handle, registry, runs

from . import actions, settings
from .ui import (attempt, control_inputs, flash, fmt_time, guarded, name_of, root, select_run, show_flash, ss,
                 wanted_controls)


def cb_resume(run_key: str) -> None:
    def go() -> None:
        tr = handle.resume(run_key, ss.get("ckpt_select"))
        flash("checkpoints", "success", f"Resumed {tr.run_dir.name} at step {tr.step_count} in this app.")

    attempt("checkpoints", go)


def cb_fork(run_key: str) -> None:
    def go() -> None:
        ckpt = ss.get("ckpt_select")
        if not ckpt:
            raise ValueError("fork: pick a checkpoint first")
        run = handle.open_run(run_key)
        saved = actions.checkpoint_controls(run, ckpt)
        changes = actions.changed_controls(saved, wanted_controls("fork"))
        table = run.checkpoints
        step = dict(zip(table["path"], table["step"])).get(ckpt)   # the lineage's step (the child moves on)
        child = handle.fork(run_key, ckpt, changes, root(), source="dashboard")
        select_run(registry.key(child.run_dir))
        what = ", ".join(f"{k}={v}" for k, v in changes.items()) or "the checkpoint's controls"
        flash("checkpoints", "success", f"Forked {child.run_dir.name} from step {step} with {what}.")

    attempt("checkpoints", go)


def checkpoints_ui(run_key: str | None) -> None:
    if not run_key:
        st.info("Select a run to see its checkpoints.")
        return
    st.fragment(run_every=settings.SLOW_REFRESH_S)(checkpoints_view)(run_key)


def checkpoints_view(run_key: str) -> None:
    """Table, lineage, and the resume/fork controls of the run's checkpoints (a fragment)."""
    with guarded("checkpoints"):
        run = handle.open_run(run_key)
        table = run.checkpoints
        checkpoint_table(run_key, table)
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
            ckpt = ss["ckpt_select"]
            st.markdown(f"**Fork** a new run from it: these are the controls saved at step {steps.get(ckpt)}; "
                        f"change any")
            control_inputs("fork", actions.checkpoint_controls(run, ckpt), origin=ckpt)
            st.button("Fork into a new run", key="fork_start", on_click=cb_fork, args=(run_key,), type="primary")


def checkpoint_table(run_key: str, table: pd.DataFrame) -> None:
    if table.empty:
        st.info("No checkpoint yet: they are written every checkpoint_every steps, at the best val loss, "
                "at stop and at the end — or save one now from the sidebar.")
    else:
        view = table.sort_values(["step", "time"], ascending=False)
        st.dataframe(pd.DataFrame({"step": view["step"], "tag": view["tag"], "metric": view["metric"],
                                   "saved": [fmt_time(t) for t in view["time"]],
                                   "file": [Path(p).name for p in view["path"]],
                                   "on disk": [Path(p).exists() for p in view["path"]]}), hide_index=True)
    lin = runs.lineage(run_key, root())
    parts = [f"`{name_of(a['run'])}` → (step {a['step']})" for a in lin["ancestors"]]
    parts.append(f"**`{name_of(run_key)}`**")
    text = " ".join(parts)
    if lin["children"]:
        forks = (f"`{name_of(c['run'])}` (from step {c['step']})" for c in lin["children"])
        text += " → forks: " + ", ".join(forks)
    st.markdown(f"Lineage: {text}")
