"""The Runs tab: every run under the runs folder, whoever trains it."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from workbench import runs

from . import settings
from .ui import fmt_time, guarded, root


def runs_ui() -> None:
    st.caption(f"Every run under {root()} — started here, from the command line or from a notebook. "
               f"Pick one in the sidebar to watch and steer it.")
    st.fragment(run_every=settings.SLOW_REFRESH_S)(runs_table)()


def runs_table() -> None:
    with guarded("runs"):
        df = runs.describe_runs(root())
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
