"""What every part of the page shares: inline errors, messages left for the next run, the request log, and
the live-control inputs, which are drawn from the engine's list of controls (workbench.controls.CONTROLS),
so the dashboard offers the same controls as the notebook panel and the CLI."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import streamlit as st

from workbench import registry
from workbench.controls import CONTROLS

from . import actions, settings

log = logging.getLogger("workbench.dashboard")
ss = st.session_state

STATUS_COLORS = {"running": "green", "paused": "orange", "idle": "gray", "finished": "blue", "stopped": "gray",
                 "failed": "red"}
SEVERITY_COLORS = {"critical": "red", "warning": "orange", "info": "blue"}


@contextmanager
def guarded(where: str) -> Iterator[None]:
    """Show an error inline instead of a stack trace; the traceback goes to the server log."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - the page must never show a traceback
        log.exception("dashboard: %s failed", where)
        st.error(f"{where}: {message(e)}")


def message(e: BaseException) -> str:
    """The engine's own text for bad input; the exception's name for anything else."""
    if isinstance(e, (ValueError, TypeError, RuntimeError, KeyError)):
        return str(e).strip("'\"") if isinstance(e, KeyError) else str(e)
    return f"{type(e).__name__}: {e}"


def flash(slot: str, level: str, text: str) -> None:
    """Leave a message for a section to show on the next run (callbacks cannot draw where it belongs)."""
    ss.setdefault("_flash", {})[slot] = (level, text)


def show_flash(slot: str) -> None:
    item = ss.setdefault("_flash", {}).pop(slot, None)
    if item:
        getattr(st, item[0])(item[1])


def record(slot: str, outcome: actions.Outcome) -> None:
    """Keep the request to follow its fate, and say at once what happened to it."""
    ss.setdefault("requests", []).append(outcome)
    del ss["requests"][:-20]
    status = outcome.state()["status"]
    flash(slot, {"applied": "success", "refused": "error"}.get(status, "info"), outcome.text())


def attempt(slot: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a button's action; bad input or a refusal becomes an inline error in ``slot``."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - shown on the page, logged for the operator
        if not isinstance(e, (ValueError, TypeError, RuntimeError)):
            log.exception("dashboard action failed")
        flash(slot, "error", message(e))
        return None


def fmt_time(t: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


def root() -> str:
    """The runs folder the page lists."""
    return str(Path(ss.get("runs_root") or settings.DEFAULT_RUNS).expanduser().resolve())


def name_of(run_key: str) -> str:
    return Path(run_key).name


def select_run(run_key: str) -> None:
    ss["run_select"] = run_key


def cb_demo() -> None:
    tr = attempt("demo", actions.start_demo, root())
    if tr is not None:
        select_run(registry.key(tr.run_dir))
        flash("demo", "success", f"Started the demo run {tr.run_dir.name}: watch it in the Live tab.")


# ---------------------------------------------------------------------------- live-control inputs
def _text(value: Any) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, (int, float)) else str(value)


def sync_inputs(prefix: str, run_key: str, controls: dict[str, Any]) -> None:
    """Load the controls in force into the ``prefix_*`` inputs when the run or its controls change."""
    sig = (run_key, tuple(sorted((k, repr(v)) for k, v in controls.items())))
    if ss.get(f"_{prefix}_sig") == sig:
        return
    ss[f"_{prefix}_sig"] = sig
    for spec in CONTROLS:
        value = controls.get(spec.name)
        if spec.kind == "integer":
            ss[f"{prefix}_{spec.name}"] = int(value or 1)
        elif spec.kind == "choice":
            ss[f"{prefix}_{spec.name}"] = value if value in spec.choices else spec.choices[0]
        else:
            ss[f"{prefix}_{spec.name}"] = _text(value)


def control_inputs(prefix: str) -> None:
    """One input per live control, two to a row."""
    st.text_input(CONTROLS[0].label, key=f"{prefix}_{CONTROLS[0].name}", help=CONTROLS[0].help)
    rest = CONTROLS[1:]
    for i in range(0, len(rest), 2):
        for col, spec in zip(st.columns(2), rest[i:i + 2]):
            key = f"{prefix}_{spec.name}"
            if spec.kind == "integer":
                col.number_input(spec.label, key=key, step=1, help=spec.help)
            elif spec.kind == "choice":
                col.selectbox(spec.label, spec.choices, key=key, help=spec.help)
            else:
                col.text_input(spec.label, key=key, help=spec.help)


def wanted_controls(prefix: str) -> dict[str, Any]:
    """The values the ``prefix_*`` inputs hold, by control name."""
    return {spec.name: ss.get(f"{prefix}_{spec.name}") for spec in CONTROLS}
