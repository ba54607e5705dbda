"""The Live tab: status, headline numbers and the six charts of the selected run, refreshed every second by a
fragment while the run goes."""
from __future__ import annotations

import streamlit as st

from workbench import handle
from workbench.requests import ENDED

from . import live, settings
from .sidebar import where_text
from .ui import STATUS_COLORS, guarded, name_of, ss

CHART_ROWS = (("loss", "lr"), ("grad_norm", "val_acc"), ("layer_grad_norm", "update_ratio"))


def live_ui(run_key: str | None) -> None:
    if not run_key:
        st.info("No run yet. Click **Start the demo run** in the sidebar, or launch one in the Launch tab.")
        return
    st.toggle("Log-scale loss", key="live_log_y", value=True)
    going = handle.open_run(run_key).owner()["alive"] or ss.get("_status_seen", (None, ""))[1] not in ENDED
    st.fragment(run_every=settings.LIVE_REFRESH_S if going else None)(live_view)(run_key, bool(ss.live_log_y))


def live_view(run_key: str, log_y: bool) -> None:
    """The live view of one run (a fragment: it alone refreshes every second while the run goes)."""
    with guarded("live view"):
        run = handle.open_run(run_key)
        p = live.live_payload(run, log_y=log_y)
        snap = p.snapshot
        status = snap["status"]
        seen = ss.get("_status_seen")
        if seen is not None and seen[0] == run_key and seen[1] != status:
            ss["_status_seen"] = (run_key, status)
            st.rerun(scope="app")  # the run started/paused/ended: refresh the controls and lists too
        ev = snap.get("last_eval") or {}
        st.markdown(f"### {name_of(run_key)} — :{STATUS_COLORS.get(status, 'gray')}[{status}]")
        st.caption(f"{where_text(run.owner())} · {run_key}")
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
        open_alerts = [a for a in run.alert_list() if a["open"]]
        if open_alerts:
            kinds = ", ".join(sorted({a["kind"] for a in open_alerts}))
            st.warning(f"{len(open_alerts)} open alert(s): {kinds}. See the Diagnosis tab.")
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
