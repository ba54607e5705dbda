"""Training Workbench dashboard: watch and steer training runs in the browser.

    streamlit run app/dashboard.py --server.address 127.0.0.1 -- --runs ROOT [--demo]
    workbench dashboard [--runs ROOT] [--port P] [--demo]

The sidebar (app/sidebar.py) picks a run and steers it; each tab is one module (app/tab_*.py) whose
``*_ui()`` draws it. The page is thin: it reads a run through the engine's run handle
(``workbench.handle.open_run``: the trainer itself when this process trains the run, else its run directory)
and sends every click as one request of the engine's vocabulary. Trainers started here live in
``workbench.registry``, so a reload or another tab sees them and closing a tab never ends a run.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import actions, live, settings  # noqa: E402
from app.sidebar import sidebar_ui  # noqa: E402
from app.tab_checkpoints import checkpoints_ui  # noqa: E402
from app.tab_compare import compare_ui  # noqa: E402
from app.tab_diagnosis import diagnosis_ui  # noqa: E402
from app.tab_launch import launch_ui  # noqa: E402
from app.tab_live import live_ui  # noqa: E402
from app.tab_runs import runs_ui  # noqa: E402
from app.tab_sweep import sweep_ui  # noqa: E402
from app.tab_tensorboard import tensorboard_ui  # noqa: E402
from app.ui import attempt, guarded, select_run, ss  # noqa: E402
from workbench import registry  # noqa: E402

TABS = (":material/monitoring: Live", ":material/list: Runs", ":material/rocket_launch: Launch",
        ":material/stethoscope: Diagnosis", ":material/save: Checkpoints", ":material/compare_arrows: Compare",
        ":material/bar_chart: TensorBoard", ":material/tune: Sweep")


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
    run_key = sidebar_ui()
    sections = (("live", lambda: live_ui(run_key)), ("runs", runs_ui), ("launch", launch_ui),
                ("diagnosis", lambda: diagnosis_ui(run_key)), ("checkpoints", lambda: checkpoints_ui(run_key)),
                ("compare", lambda: compare_ui(run_key)), ("tensorboard", lambda: tensorboard_ui(run_key)),
                ("sweep", sweep_ui))
    # Plain tabs: tracking the open one (key=, on_change="rerun") reruns the page at every switch, and a widget
    # edited while that rerun runs comes back with every widget of the page reset (Streamlit 1.67)
    for tab, (title, draw) in zip(st.tabs(TABS), sections):
        with tab, guarded(title):
            draw()


main()
