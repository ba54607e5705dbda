"""The Sweep tab: the Optuna studies under the runs folder (``workbench sweep``), their trials, a
parallel-coordinates plot and the parameters' importances; each trial opens as a run."""
from __future__ import annotations

import streamlit as st

from workbench import registry, sweep

from .ui import guarded, root, select_run


def sweep_ui() -> None:
    found = sweep.find_sweeps(root())
    if not found:
        st.info("No sweep under this runs folder. Start one with `workbench sweep --config F --trials N "
                "--sweep-dir RUNS/NAME`; the same storage opens in `optuna-dashboard`.")
        return
    labels = [f"{s['name']} ({s['folder']})" for s in found]
    pick = found[labels.index(st.selectbox("Sweep", labels, key="sweep_pick"))]
    with guarded("sweep"):
        study = sweep.open_study(pick["storage"], pick["name"])
        table = sweep.trials_table(study)
        st.caption(f"Storage `{pick['storage']}` · {len(table)} trial(s) · direction {study.direction.name.lower()}")
        st.dataframe(table, hide_index=True, use_container_width=True)
        figs = sweep.sweep_figures(study)
        st.plotly_chart(figs["parallel"], use_container_width=True, key="sweep_parallel")
        if "importances" in figs:
            st.plotly_chart(figs["importances"], use_container_width=True, key="sweep_importances")
        runs = [d for d in table.get("run_dir", []) if isinstance(d, str)]
        if runs:
            c1, c2 = st.columns([3, 1])
            chosen = c1.selectbox("Trial run", runs, key="sweep_trial")
            if c2.button("Open run", key="sweep_open"):
                select_run(registry.key(chosen))
                st.rerun()
