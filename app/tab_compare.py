"""The Compare tab: overlay one metric of several runs (by default the selected run's family: its ancestors
and forks), their final and best numbers, and the config fields that differ."""
from __future__ import annotations

import streamlit as st

from workbench import figures, handle, runs
from workbench.chartdata import chart_data

from . import compare, settings
from .charts import chart_grid
from .ui import guarded, name_of, root, ss

COMPARE_METRICS = ("train_loss", "val_loss", "val_acc", "lr", "grad_norm")


def compare_ui(run_key: str | None) -> None:
    table = runs.describe_runs(root())
    if table.empty:
        st.info("No runs to compare yet.")
        return
    keys = list(table["key"])
    if run_key and ss.get("_compare_for") != run_key:  # another run selected: compare its family
        ss["_compare_for"] = run_key
        lin = runs.lineage(run_key, root())
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
        handles = {name_of(k): handle.open_run(k) for k in chosen}
        fig = figures.compare_figure({n: chart_data(h) for n, h in handles.items()}, metric=metric, log_y=log_y)
        fig.update_layout(uirevision=f"{metric}|{log_y}")  # zoom holds across refreshes, not across metrics
        chart_grid({"compare": fig}, key="compare_chart", columns=1)
        st.dataframe(compare.metrics_table(handles), hide_index=True)
        # a run's name is its directory's (a fork's config.yaml carries its parent's name from the checkpoint)
        diff = compare.config_diff({n: {**h.config, "name": n} for n, h in handles.items()})
        only = st.toggle("Only the fields that differ", key="compare_only_diff", value=True)
        shown = diff[diff["differs"]] if only else diff
        st.caption("Config fields (rows that differ between the runs are shaded)")
        st.dataframe(compare.highlight_differences(shown.reset_index(drop=True)), hide_index=True)
