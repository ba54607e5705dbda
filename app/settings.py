"""Where the dashboard looks for runs, and its command-line options (``streamlit run ... -- --runs ROOT``)."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
ENV_RUNS = "WORKBENCH_RUNS"        # runs root when no --runs is given (tests point it at a tmp dir)
ENV_DEMO = "WORKBENCH_DEMO"        # "1": start the demo run on launch (same as --demo)
DEFAULT_RUNS = "runs"
LIVE_REFRESH_S = 1.0               # live view refresh while a run is going
SLOW_REFRESH_S = 3.0               # runs list, diagnosis, requests


@dataclass(frozen=True)
class Options:
    """The app's launch options."""

    runs: str
    demo: bool


def parse_options(argv: list[str] | None = None) -> Options:
    """Options from the script's arguments (only under ``streamlit run``), else the environment, else defaults.

    Under ``AppTest`` or pytest ``sys.argv`` belongs to someone else, so it is read only when it starts
    with this app's own script.
    """
    if argv is None:
        argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith("dashboard.py") else []
    parser = argparse.ArgumentParser(prog="dashboard", add_help=False)
    parser.add_argument("--runs", default=None)
    parser.add_argument("--demo", action="store_true")
    ns, _ = parser.parse_known_args(argv)
    runs = ns.runs or os.environ.get(ENV_RUNS) or DEFAULT_RUNS
    demo = bool(ns.demo) or os.environ.get(ENV_DEMO, "") == "1"
    return Options(runs=str(Path(runs).expanduser().resolve()), demo=demo)
