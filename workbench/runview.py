"""A run seen from outside: read a run directory, and steer it through its control inbox.

``RunView(run_dir)`` offers the read side of the Trainer's API (history, evals, layer_history, events,
checkpoints, series, snapshot) for a run that trains in another process — a CLI run or a notebook — and
posts control requests that the run's trainer validates and applies at a step boundary. Reads are
incremental: each refresh fetches only the rows logged since the last one, so watching a long run
stays cheap. ``chart_data(source)`` turns a Trainer or a RunView into the plain data the figure builders
(workbench.figures) draw, so both views draw the same charts from the same numbers.
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import yaml

from .config import check_int
from .controls import ACTIONS, CONTROL_NAMES, check_source, validate_controls
from .metrics import SeriesStore, downsample
from .rundir import RunDB

STEP_SERIES = ("step", "epoch", "train_loss", "lr", "batch_size", "grad_norm", "samples_per_s")
MARKER_KINDS = ("control", "checkpoint", "alert", "rollback", "policy", "fork", "resume")


class RunView:
    """Read a run directory (possibly being written by another process) and post control requests to it."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        db = self.run_dir / "run.db"
        if not db.exists():
            raise FileNotFoundError(f"run_dir: {self.run_dir} has no run.db; allowed: a run directory made by "
                                    f"the workbench (see `workbench runs`)")
        self._db = RunDB(db, readonly=True)
        self._writer: RunDB | None = None
        self._store = SeriesStore(STEP_SERIES)
        self._last_step: int | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ reading
    def refresh(self) -> int:
        """Fetch the step rows logged since the last refresh; returns how many arrived."""
        with self._lock:
            new = self._db.read_steps(since_step=self._last_step)
            if new.empty:
                return 0
            if self._last_step is not None and int(new["step"].iloc[0]) <= self._last_step:
                new = new[new["step"] > self._last_step]
            self._store.extend({c: new[c].to_numpy(dtype=float) for c in STEP_SERIES})
            self._last_step = int(new["step"].iloc[-1])
            return len(new)

    @property
    def meta(self) -> dict[str, Any]:
        return self._db.meta()

    @property
    def status(self) -> str:
        return str(self.meta.get("status", "unknown"))

    @property
    def config(self) -> dict[str, Any]:
        """The run's config.yaml as a dict (empty when missing)."""
        path = self.run_dir / "config.yaml"
        return yaml.safe_load(path.read_text()) or {} if path.exists() else {}

    @property
    def history(self) -> pd.DataFrame:
        return self._db.read_steps()

    @property
    def evals(self) -> pd.DataFrame:
        return self._db.read_evals()

    @property
    def layer_history(self) -> pd.DataFrame:
        return self._db.read_layers()

    @property
    def events(self) -> pd.DataFrame:
        return self._db.read_events()

    @property
    def checkpoints(self) -> pd.DataFrame:
        return self._db.read_checkpoints()

    @property
    def alerts(self) -> list[dict[str, Any]]:
        """The run's alerts (as plain dicts, from the event log; see :func:`alerts_in`)."""
        return alerts_in(self.events)

    def series(self, y: str, n_out: int = 2000) -> tuple[np.ndarray, np.ndarray]:
        """Downsampled (step, value) of a step column or an eval column (val_loss, val_acc)."""
        if y in ("val_loss", "val_acc"):
            ev = self.evals
            return downsample(ev["step"].to_numpy(float), ev[y].to_numpy(float), n_out) if not ev.empty \
                else (np.array([]), np.array([]))
        self.refresh()
        return self._store.series(y, "step", n_out)

    def snapshot(self) -> dict[str, Any]:
        """Status line data, like Trainer.snapshot()."""
        self.refresh()
        last = self._store.last() or {}
        meta = self.meta
        ev = self.evals
        return {"status": meta.get("status", "unknown"), "step": int(last.get("step", 0) or 0),
                "epoch": int(last.get("epoch", 0) or 0) if not math.isnan(last.get("epoch", 0) or 0) else 0,
                "train_loss": last.get("train_loss"), "samples_per_s": last.get("samples_per_s"),
                "total_steps": meta.get("total_steps"), "controls": meta.get("controls", {}),
                "last_eval": ev.iloc[-1].to_dict() if not ev.empty else {}, "run_dir": str(self.run_dir)}

    @property
    def lineage(self) -> dict[str, Any]:
        m = self.meta
        return {k: m[k] for k in ("parent_run", "parent_step", "parent_checkpoint") if k in m}

    # ------------------------------------------------------------------ steering (through the inbox)
    def _inbox(self) -> RunDB:
        if self._writer is None:
            self._writer = RunDB(self.run_dir / "run.db")
        return self._writer

    def set(self, source: str = "dashboard", **controls: Any) -> int:
        """Validate (what can be checked from outside) and post a control change; returns the request id."""
        import torch

        # types, ranges and the data set's size are checked here; whether the trainer's device can run a
        # precision is decided by the trainer, and a refusal comes back through the inbox with its reason
        clean = validate_controls(controls, n_train=int(self.meta.get("n_train", 2**62)), device=torch.device("cpu"))
        if "precision" in controls:
            clean["precision"] = str(controls["precision"]).lower()
        return self._inbox().post_control(clean, source=check_source(source), action="set")

    def command(self, action: str, source: str = "dashboard", **args: Any) -> int:
        """Post pause, resume, step (n=), stop or checkpoint (tag=); returns the request id."""
        if action not in ACTIONS or action in ("set", "rollback", "dismiss"):
            raise ValueError(f"action: got {action!r}; allowed: pause, resume, step, stop, checkpoint")
        if action == "step":
            args = {"n": check_int("n", args.get("n", 1), minimum=1)}
        return self._inbox().post_control(args, source=check_source(source), action=action)

    def dismiss(self, alert_id: int, source: str = "dashboard") -> int:
        """Post: mark alert ``alert_id`` a false alarm (``Trainer.dismiss``); returns the request id."""
        return self._inbox().post_control({"alert": check_int("alert", alert_id, minimum=0)},
                                          source=check_source(source), action="dismiss")

    def apply_action(self, alert_id: int, index: int = 0, source: str = "dashboard") -> int:
        """Post: apply suggested action ``index`` of alert ``alert_id``, a rollback included
        (``Trainer.apply_action``); the trainer checks that both exist. Returns the request id."""
        args = {"alert": check_int("alert", alert_id, minimum=0), "index": check_int("index", index, minimum=0)}
        return self._inbox().post_control(args, source=check_source(source), action="alert_action")

    def request(self, request_id: int) -> dict[str, Any]:
        """The request's outcome so far: status pending, applied (with step) or refused (with message)."""
        return self._db.control(request_id)

    def wait(self, request_id: int, timeout: float = 10.0) -> dict[str, Any]:
        return self._db.wait_control(request_id, timeout)

    def close(self) -> None:
        self._db.close()
        if self._writer is not None:
            self._writer.close()


def alerts_in(events: pd.DataFrame) -> list[dict[str, Any]]:
    """The alerts of an event log (as dicts), each ``dismissed`` when a later dismiss event names it."""
    if events.empty:
        return []
    dismissed = {int(d.get("alert", -1)) for d in events.loc[events["kind"] == "dismiss", "data"]}
    return [dict(d, dismissed=bool(d.get("dismissed")) or int(d.get("id", -1)) in dismissed)
            for d in events.loc[events["kind"] == "alert", "data"]]


# ---------------------------------------------------------------------------- chart data
@dataclass
class ChartData:
    """Everything the charts draw, downsampled: (x, y) arrays per series, a layer table, markers."""

    series: dict[str, tuple[np.ndarray, np.ndarray]]
    layers: pd.DataFrame                    # step, layer, grad_norm, update_ratio (steps thinned to <= max_cols)
    markers: list[dict[str, Any]] = field(default_factory=list)   # step, kind, label
    points: int = 0                         # most points in any one trace


def chart_data(source: Any, n_out: int = 2000, max_cols: int = 200, max_markers: int = 200) -> ChartData:
    """Downsampled series of a Trainer or a RunView, plus per-layer stats and change/alert markers."""
    series = {name: source.series(name, n_out) for name in ("train_loss", "lr", "grad_norm", "val_loss", "val_acc")}
    layers = source.layer_history
    if not layers.empty:
        steps = np.unique(layers["step"].to_numpy())
        if len(steps) > max_cols:
            keep = steps[np.linspace(0, len(steps) - 1, max_cols).round().astype(int)]
            layers = layers[layers["step"].isin(keep)]
        layers = layers[["step", "layer", "grad_norm", "update_ratio"]].reset_index(drop=True)
    events = source.events
    markers = []
    if not events.empty:
        ev = events[events["kind"].isin(MARKER_KINDS)].tail(max_markers)
        for _, row in ev.iterrows():
            markers.append({"step": int(row["step"]), "kind": row["kind"], "label": marker_label(row["kind"],
                                                                                                 row["data"])})
    points = max((len(x) for x, _ in series.values()), default=0)
    return ChartData(series=series, layers=layers, markers=markers, points=points)


def marker_label(kind: str, data: Mapping[str, Any] | None) -> str:
    """A short text for a chart marker."""
    d = dict(data or {})
    if kind == "control":
        return f"{d.get('field')}: {_short(d.get('old'))} -> {_short(d.get('new'))}"
    if kind == "checkpoint":
        return f"checkpoint ({d.get('reason', '')})"
    if kind == "alert":
        return f"{d.get('severity', '')}: {d.get('kind', '')}"
    if kind == "rollback":
        return f"rollback to step {d.get('to_state_of_step')}"
    return kind


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def time_since(t: float | None) -> str:
    """'12 s ago' style text for status lines."""
    if t is None or not math.isfinite(t):
        return "-"
    d = max(0.0, time.time() - t)
    return f"{d:.0f} s ago" if d < 120 else f"{d / 60:.0f} min ago" if d < 7200 else f"{d / 3600:.0f} h ago"
