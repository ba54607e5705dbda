"""What every part of the page shares: inline errors, messages left for the next run, the request log, and
the live-control inputs, which are drawn from the engine's list of controls (workbench.controls.CONTROLS),
so the dashboard offers the same controls as the notebook panel and the CLI."""
from __future__ import annotations

import hashlib
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
    try:  # a folder outside those the dashboard may use is refused (the sidebar says why): the launch root instead
        return str(settings.confine(ss.get("runs_root") or settings.DEFAULT_RUNS, "runs folder"))
    except ValueError:
        return settings.parse_options().runs


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
    """Load the controls in force into the ``prefix_*`` inputs when the run or its controls change, or when
    Streamlit dropped the inputs' values (it does for widgets a run did not draw)."""
    sig = (run_key, tuple(sorted((k, repr(v)) for k, v in controls.items())))
    if ss.get(f"_{prefix}_sig") == sig and all(f"{prefix}_{spec.name}" in ss for spec in CONTROLS):
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


def control_inputs(prefix: str, values: dict[str, Any] | None = None, origin: str = "",
                   fixed: dict[str, str] | None = None) -> None:
    """One input per live control, two to a row; a control in ``fixed`` (the run cannot change it: the run
    handle's ``fixed_controls``) is shown greyed out, its help saying why.

    With ``values`` the inputs start at them and belong to ``origin`` (e.g. a checkpoint): their keys carry a
    digest of both, so another origin gets new inputs that show its values. Values written into session
    state beforehand (``sync_inputs``) are not shown by inputs that a fragment's rerun draws for the first
    time; an input's own ``value`` always is."""
    rev = ""
    if values is not None:
        rev = "_" + hashlib.sha1(repr((origin, sorted(values.items(), key=lambda kv: kv[0]))).encode()).hexdigest()[:8]
    ss[f"_{prefix}_rev"] = rev

    def start(spec: Any) -> dict[str, Any]:
        if values is None:
            return {}
        v = values.get(spec.name)
        if spec.kind == "integer":
            return {"value": int(v or 1)}
        if spec.kind == "choice":
            return {"index": spec.choices.index(v) if v in spec.choices else 0}
        return {"value": _text(v)}

    fixed = fixed or {}

    def opts(spec: Any) -> dict[str, Any]:
        why = fixed.get(spec.name)
        return {"help": f"Fixed in this run: {why}" if why else spec.help, "disabled": bool(why), **start(spec)}

    first = CONTROLS[0]
    st.text_input(first.label, key=f"{prefix}_{first.name}{rev}", **opts(first))
    rest = CONTROLS[1:]
    for i in range(0, len(rest), 2):
        for col, spec in zip(st.columns(2), rest[i:i + 2]):
            key = f"{prefix}_{spec.name}{rev}"
            if spec.kind == "integer":
                col.number_input(spec.label, key=key, step=1, **opts(spec))
            elif spec.kind == "choice":
                col.selectbox(spec.label, spec.choices, key=key, **opts(spec))
            else:
                col.text_input(spec.label, key=key, **opts(spec))


def wanted_controls(prefix: str) -> dict[str, Any]:
    """The values the ``prefix_*`` inputs hold, by control name."""
    rev = ss.get(f"_{prefix}_rev", "")
    return {spec.name: ss.get(f"{prefix}_{spec.name}{rev}") for spec in CONTROLS}
