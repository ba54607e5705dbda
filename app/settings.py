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
ENV_ALLOW = "WORKBENCH_ALLOW"      # more folders the page may use, os.pathsep-separated (same as --allow)
DEFAULT_RUNS = "runs"
# Every tab's fragment refreshes whether or not its tab is open (Streamlit draws them all), and each refresh
# re-renders in the browser: CPU taken from the run being watched on the same machine (bench/RESULTS.md, 7b).
# The live view is what a user watches; the other tabs are read now and then, and a new alert shows in the
# live view's alert line within one live refresh.
LIVE_REFRESH_S = 2.0               # live view refresh while a run is going
ENDED_REFRESH_S = 5.0              # the live view of an ended run (a resume from elsewhere shows within it)
SLOW_REFRESH_S = 10.0              # runs list, diagnosis, checkpoints, compare


@dataclass(frozen=True)
class Options:
    """The app's launch options."""

    runs: str
    demo: bool
    allow: tuple[str, ...] = ()

    def folders(self) -> list[Path]:
        """The folders whose files a path typed into the page may name: the runs root, the app's own
        configs/, and each ``--allow`` folder."""
        return [Path(self.runs), (REPO / "configs").resolve(), *(Path(a) for a in self.allow)]


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
    parser.add_argument("--allow", action="append", default=[])
    ns, _ = parser.parse_known_args(argv)
    runs = ns.runs or os.environ.get(ENV_RUNS) or DEFAULT_RUNS
    demo = bool(ns.demo) or os.environ.get(ENV_DEMO, "") == "1"
    allow = list(ns.allow) + [a for a in os.environ.get(ENV_ALLOW, "").split(os.pathsep) if a]
    return Options(runs=str(Path(runs).expanduser().resolve()), demo=demo,
                   allow=tuple(str(Path(a).expanduser().resolve()) for a in allow))


def confine(path: str | os.PathLike, field: str, options: Options | None = None) -> Path:
    """``path`` resolved (``~``, ``..`` and symbolic links followed) when it lies in a folder the page may use
    (:meth:`Options.folders`); else a ValueError naming the field and the folders allowed. Nothing is read:
    a refused file's content never reaches an error message."""
    opts = options or parse_options()
    text = os.fspath(path)
    if not text.strip() or "\0" in text:
        raise ValueError(f"{field}: got an empty or invalid path; allowed: a path inside "
                         f"{', '.join(map(str, opts.folders()))}")
    resolved = Path(text).expanduser().resolve()
    for folder in opts.folders():
        if resolved == folder or resolved.is_relative_to(folder):
            return resolved
    raise ValueError(f"{field}: {text!r} is outside the folders this dashboard may use; allowed: a path inside "
                     f"{', '.join(map(str, opts.folders()))} (start it with --allow DIR to add one)")
