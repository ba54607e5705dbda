"""The Live tab: status, headline numbers and the charts of the selected run, refreshed by a fragment every
few seconds (app/settings.LIVE_REFRESH_S).

The fragment reads everything it shows from the run at each refresh (status, controls, alerts), never from
what the page saw when it loaded, and draws the same elements in the same order every time. The charts are
one grid drawn in place (app/charts.py): a refresh redraws only the charts whose data changed, and keeps
the user's zoom."""
from __future__ import annotations

import streamlit as st

from workbench import handle
from workbench.requests import ENDED

from . import live, settings
from .charts import chart_grid
from .sidebar import where_text
from .ui import STATUS_COLORS, guarded, name_of, ss

CHARTS = ("loss", "lr", "grad_norm", "val_acc", "layer_grad_norm", "update_ratio", "batch_precision",
          "metrics")   # two to a row
X_LABELS = {"step": "Step", "time": "Wall time", "samples": "Samples"}


def live_ui(run_key: str | None) -> None:
    if not run_key:
        st.info("No run yet. Click **Start the demo run** in the sidebar, or launch one in the Launch tab.")
        return
    c1, c2, c5, c3, c4 = st.columns([1, 2, 2, 1, 1], vertical_alignment="bottom")
    c1.toggle("Log-scale loss", key="live_log_y", value=True)
    c2.slider("Smoothing", 0.0, 0.99, key="live_smooth", value=0.0, step=0.01,
              help="Exponential moving average of the train loss and grad norm, as in TensorBoard (0: raw)")
    c5.segmented_control("X axis", list(X_LABELS), format_func=X_LABELS.get, key="live_x", default="step",
                         help="Steps; seconds since the run's first step; or samples trained on (batch size x "
                              "gradient accumulation x processes, summed over the steps)")
    run = handle.open_run(run_key)
    c3.download_button("Steps CSV", data=lambda: run.history.to_csv(index=False), key="live_csv_steps",
                       file_name=f"{name_of(run_key)}-steps.csv", mime="text/csv", icon=":material/download:",
                       help="Every logged step: loss, lr, batch size, precision, grad norm, samples/s, time")
    c4.download_button("Evals CSV", data=lambda: run.evals.to_csv(index=False), key="live_csv_evals",
                       file_name=f"{name_of(run_key)}-evals.csv", mime="text/csv", icon=":material/download:")
    # an ended run is looked at less often: a resume shows within a few seconds all the same
    period = settings.ENDED_REFRESH_S if run.snapshot()["status"] in ENDED else settings.LIVE_REFRESH_S
    st.fragment(run_every=period)(live_view)(run_key, bool(ss.live_log_y), float(ss.live_smooth),
                                            ss.get("live_x") or "step")   # a click on the chosen segment clears it


def live_view(run_key: str, log_y: bool, smooth: float = 0.0, x: str = "step") -> None:
    """The live view of one run (a fragment: it alone refreshes while the run goes)."""
    with guarded("live view"):
        run = handle.open_run(run_key)
        p = live.live_payload(run, log_y=log_y, smooth=smooth, x=x)
        snap = p.snapshot
        status = snap["status"]
        ev = snap.get("last_eval") or {}
        st.markdown(f"### {name_of(run_key)} — :{STATUS_COLORS.get(status, 'gray')}[{status}]")
        st.caption(f"{where_text(run.owner())} · {run_key}")
        total = snap.get("total_steps")
        where = f"step {snap['step']:,}" + (f" of {total:,}" if total else " (no step limit)")
        st.progress(min(1.0, snap["step"] / total) if total else 0.0, text=f"{where} · epoch {snap['epoch']}")
        cols = st.columns(6)
        cols[0].metric("Step", f"{snap['step']:,}")
        cols[1].metric("Train loss", live.kpi(snap.get("train_loss")))
        cols[2].metric("Val loss", live.kpi(ev.get("val_loss")))
        cols[3].metric("Val acc", live.fmt(ev.get("val_acc"), ".2%"))
        cols[4].metric("LR now", live.kpi(p.lr_now))
        cols[5].metric("Samples/s", live.fmt(snap.get("samples_per_s"), ",.0f"),
                       help="Samples over the wall time of the last ~2 s of steps; blank unless running")
        st.caption(live.cost_text(snap))
        open_alerts = [a for a in run.alert_list() if a["open"]]
        if open_alerts:
            kinds = ", ".join(sorted({a["kind"] for a in open_alerts}))
            st.warning(f"{len(open_alerts)} open alert(s): {kinds}. See the Diagnosis tab.")
        else:
            st.caption("No open alerts.")
        chart_grid({name: p.figures[name] for name in CHARTS if name in p.figures}, key="live_charts", columns=2)
        st.markdown("**Recent changes, checkpoints and alerts** (dashed lines on the charts)")
        if p.recent.empty:
            st.caption("None yet.")
        else:
            st.table(p.recent, hide_index=True)
        st.caption(f"Each trace holds at most {p.data.points} points (downsampled, minima and maxima kept).")
