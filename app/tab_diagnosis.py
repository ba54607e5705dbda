"""The Diagnosis tab: the run's health, an alert card per open alert with its suggested actions (one click
applies one, a rollback included) and a dismiss button, and every alert of the run."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from workbench import handle

from . import actions, settings
from .ui import SEVERITY_COLORS, attempt, guarded, record, show_flash


def cb_alert_action(run_key: str, alert: dict, index: int) -> None:
    attempt("diagnosis", lambda: record("diagnosis", actions.apply_alert_action(run_key, alert, index)))


def cb_dismiss(run_key: str, alert_id: int) -> None:
    attempt("diagnosis", lambda: record("diagnosis", actions.dismiss_alert(run_key, alert_id)))


def diagnosis_ui(run_key: str | None) -> None:
    if not run_key:
        st.info("Select a run to see its diagnosis.")
        return
    show_flash("diagnosis")
    st.fragment(run_every=settings.SLOW_REFRESH_S)(diagnosis_view)(run_key)


def diagnosis_view(run_key: str) -> None:
    with guarded("diagnosis"):
        run = handle.open_run(run_key)
        alerts = run.alert_list()
        health = run.health()
        st.markdown(f"**Health: {health['health']}** — {health['summary']}")
        if not alerts:
            st.success("No problems detected so far.")
            return
        current = [a for a in alerts if a["open"]]
        steerable = run.owner()["alive"]  # here or through the inbox
        for a in current or alerts[:5]:
            alert_card(run_key, a, steerable)
        if len(current) < len(alerts):
            with st.expander(f"All alerts ({len(alerts)})"):
                st.dataframe(pd.DataFrame([{k: a.get(k) for k in ("step", "kind", "severity", "message", "dismissed")}
                                           for a in alerts]), hide_index=True)


def alert_card(run_key: str, a: dict, steerable: bool) -> None:
    with st.container(border=True):
        st.markdown(f"**{a['kind']}** — :{SEVERITY_COLORS.get(a['severity'], 'gray')}[{a['severity']}], "
                    f"step {a['step']}, confidence {float(a.get('confidence', 0)):.0%}"
                    + (" · dismissed" if a.get("dismissed") else "" if a["open"] else " · episode over"))
        st.write(a["message"])
        st.caption(f"Evidence: {a['evidence']}")
        acts = a.get("actions") or []
        cols = st.columns(max(1, len(acts) + (1 if steerable else 0)))
        for i, act in enumerate(acts):
            if act.get("controls") or act.get("rollback"):
                cols[i].button(act["label"], key=f"alert_{a['id']}_act_{i}", on_click=cb_alert_action,
                               args=(run_key, a, i), help=str(act.get("controls") or "roll back"))
            else:
                cols[i].caption(f"Next run: {act['label']} ({act.get('hint') or ''})")
        if steerable and not a.get("dismissed"):
            cols[-1].button("Dismiss (false alarm)", key=f"alert_{a['id']}_dismiss", on_click=cb_dismiss,
                            args=(run_key, a["id"]))
