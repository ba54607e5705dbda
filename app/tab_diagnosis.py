"""The Diagnosis tab: the run's health; its open alerts grouped by kind, each a card with its suggested
actions (one click applies one, a rollback included) and a dismiss button; and the history of closed alerts
(when each opened and closed, its last evidence), whose cards keep their actions."""
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
        steerable = run.owner()["alive"]  # here or through the inbox
        groups = by_kind([a for a in alerts if a["open"]])
        if not groups:
            st.success("No open alerts.")
        for kind, items in groups:
            st.markdown(f"#### {kind} ({len(items)} open)" if len(items) > 1 else f"#### {kind}")
            for a in items:
                alert_card(run_key, a, steerable)
        closed = [a for a in alerts if not a["open"]]
        if closed:
            with st.expander(f"Closed or dismissed alerts ({len(closed)})", expanded=not groups):
                st.dataframe(pd.DataFrame([{"kind": a["kind"], "severity": a["severity"], "opened": a["step"],
                                            "closed": a.get("closed_step"), "dismissed": a.get("dismissed"),
                                            "last evidence": a["evidence"]} for a in closed]), hide_index=True)
                for a in closed[:CLOSED_CARDS]:
                    alert_card(run_key, a, steerable)


CLOSED_CARDS = 5   # the newest closed alerts keep a card (their actions, e.g. a rollback, still apply)
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


def by_kind(alerts: list[dict]) -> list[tuple[str, list[dict]]]:
    """Alerts grouped by kind: the most severe group first, then the newest; newest first within a group."""
    groups: dict[str, list[dict]] = {}
    for a in alerts:
        groups.setdefault(a["kind"], []).append(a)
    return sorted(groups.items(), key=lambda kv: (min(SEVERITY_ORDER.get(a["severity"], 3) for a in kv[1]),
                                                  -max(a["step"] for a in kv[1])))


def alert_card(run_key: str, a: dict, steerable: bool) -> None:
    with st.container(border=True):
        st.markdown(f"**{a['kind']}** — :{SEVERITY_COLORS.get(a['severity'], 'gray')}[{a['severity']}], "
                    f"step {a['step']}, confidence {float(a.get('confidence', 0)):.0%}"
                    + (" · dismissed" if a.get("dismissed") else "" if a["open"]
                       else f" · closed at step {a.get('closed_step')}")
                    + (f" · evidence of step {a['last_step']}" if a.get("last_step") is not None else ""))
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
