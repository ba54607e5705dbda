"""Where the dashboard reads a run from: the trainer itself (started in this process) or its run directory.

``get_source(run_dir)`` returns the registered ``Trainer`` when this process runs it, else a cached
:class:`WatchedRun` — a ``RunView`` (the engine's reader of a run in another process) plus incremental
caches of the evals, per-layer stats and events, so a refresh of a long run reads only the rows logged
since the previous one. Both offer what ``workbench.runview.chart_data`` and the views need:
``snapshot()``, ``series()``, ``evals``, ``layer_history``, ``events``, ``checkpoints``.
"""
from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from workbench import registry
from workbench.metrics import downsample
from workbench.rundir import DB_NAME, RunDB, list_runs
from workbench.runview import RunView, alerts_in

ENDED = ("finished", "stopped", "failed")
MAX_LAYER_COLUMNS = 200


class WatchedRun:
    """A run directory watched from this process: a RunView plus incremental caches (thread-safe)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self._lock = threading.RLock()
        self._reset()

    def _reset(self) -> None:
        self.view = RunView(self.run_dir)
        self._db = RunDB(self.run_dir / DB_NAME, readonly=True)
        self._evals = self._db.read_evals(since_step=-1).iloc[0:0]
        self._layers = self._db.read_layers(since_step=-1).iloc[0:0]
        self._layer_steps = np.empty(0, dtype=np.int64)
        self._layers_thin: pd.DataFrame | None = None
        self._events = self._db.read_events(since_id=-1).iloc[0:0]
        self._meta: dict[str, Any] = {}
        self._last_row: dict[str, Any] = {}
        self._generation = self._resume_mark(self._db.meta())

    @staticmethod
    def _resume_mark(meta: dict[str, Any]) -> tuple:
        """Changes when the run is resumed in place (rows after the checkpoint are rewritten)."""
        return meta.get("resumed_from"), meta.get("resumed_at"), meta.get("started")

    def refresh(self) -> None:
        """Fetch what was logged since the last refresh (steps, evals, layers, events, metadata)."""
        with self._lock:
            meta = self._db.meta()
            if self._resume_mark(meta) != self._generation:
                self.close()
                self._reset()
            self._meta = meta
            self.view.refresh()
            last_eval = int(self._evals["step"].iloc[-1]) if len(self._evals) else None
            new = self._db.read_evals(since_step=last_eval)
            if len(new):
                self._evals = new if self._evals.empty else pd.concat([self._evals, new], ignore_index=True)
            last_layer = int(self._layer_steps[-1]) if len(self._layer_steps) else None
            new = self._db.read_layers(since_step=last_layer)
            if len(new):
                self._layers = new if self._layers.empty else pd.concat([self._layers, new], ignore_index=True)
                self._layer_steps = np.concatenate([self._layer_steps, np.unique(new["step"].to_numpy())])
                self._layers_thin = None
            last_id = int(self._events["id"].iloc[-1]) if len(self._events) else None
            new = self._db.read_events(since_id=last_id)
            if len(new):
                self._events = new if self._events.empty else pd.concat([self._events, new], ignore_index=True)
            last = self._db.last_step()
            if last is not None and last != self._last_row.get("step"):
                rows = self._db.read_steps(since_step=last - 1)
                self._last_row = rows.iloc[-1].to_dict() if len(rows) else {}

    # ------------------------------------------------------------------ what chart_data and the views read
    def series(self, y: str, n_out: int = 2000) -> tuple[np.ndarray, np.ndarray]:
        """Downsampled (step, value) of a step column or of val_loss / val_acc (from the cached evals)."""
        if y in ("val_loss", "val_acc"):
            with self._lock:
                ev = self._evals
            if ev.empty:
                return np.array([]), np.array([])
            return downsample(ev["step"].to_numpy(float), ev[y].to_numpy(float), n_out)
        return self.view.series(y, n_out)

    @property
    def evals(self) -> pd.DataFrame:
        with self._lock:
            return self._evals

    @property
    def layer_history(self) -> pd.DataFrame:
        """Per-layer rows of at most ``MAX_LAYER_COLUMNS`` evenly spread logged steps (what the heatmap draws)."""
        with self._lock:
            if self._layers_thin is None:
                self._layers_thin = _thin_layers(self._layers, self._layer_steps, MAX_LAYER_COLUMNS)
            return self._layers_thin

    @property
    def events(self) -> pd.DataFrame:
        with self._lock:
            return self._events

    @property
    def checkpoints(self) -> pd.DataFrame:
        return self.view.checkpoints

    @property
    def meta(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._meta) if self._meta else self._db.meta()

    @property
    def config(self) -> dict[str, Any]:
        return self.view.config

    @property
    def alerts(self) -> list[dict[str, Any]]:
        """Alerts from the event log (as dicts), each with ``dismissed`` set from later dismiss events."""
        return alerts_in(self.events)

    def snapshot(self) -> dict[str, Any]:
        """Status-line data in the shape of ``Trainer.snapshot()`` (refresh first)."""
        with self._lock:
            meta, last, ev = self._meta or self._db.meta(), self._last_row, self._evals
        epoch = last.get("epoch")
        return {"status": str(meta.get("status", "unknown")), "step": int(last.get("step", 0) or 0),
                "epoch": int(epoch) if epoch is not None and math.isfinite(epoch) else 0,
                "train_loss": last.get("train_loss"), "samples_per_s": last.get("samples_per_s"),
                "total_steps": meta.get("total_steps"), "controls": meta.get("controls", {}),
                "last_eval": ev.iloc[-1].to_dict() if len(ev) else {}, "run_dir": str(self.run_dir)}

    def close(self) -> None:
        self.view.close()
        self._db.close()


def _thin_layers(layers: pd.DataFrame, steps: np.ndarray, max_cols: int) -> pd.DataFrame:
    """Rows of ``layers`` (sorted by step) at <= ``max_cols`` evenly spread steps, found by binary search."""
    cols = ["step", "layer", "grad_norm", "update_ratio"]
    if layers.empty or len(steps) <= max_cols:
        return layers[cols].reset_index(drop=True)
    keep = steps[np.linspace(0, len(steps) - 1, max_cols).round().astype(int)]
    col = layers["step"].to_numpy()
    lo, hi = np.searchsorted(col, keep, "left"), np.searchsorted(col, keep, "right")
    idx = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])
    return layers.iloc[idx][cols].reset_index(drop=True)


# ---------------------------------------------------------------------------- the cache of watched runs
_watched: dict[str, WatchedRun] = {}
_watched_lock = threading.Lock()


def watched(run_dir: str | os.PathLike) -> WatchedRun:
    """The process-wide WatchedRun of ``run_dir`` (created on first use; shared by every session)."""
    k = registry.key(run_dir)
    with _watched_lock:
        w = _watched.get(k)
        if w is None:
            w = _watched[k] = WatchedRun(k)
        return w


def forget(run_dir: str | os.PathLike) -> None:
    """Drop the cached WatchedRun of ``run_dir`` (after this process takes the run over, e.g. resume)."""
    with _watched_lock:
        w = _watched.pop(registry.key(run_dir), None)
    if w is not None:
        w.close()


def clear_cache() -> None:
    """Close and forget every WatchedRun (tests)."""
    with _watched_lock:
        items = list(_watched.values())
        _watched.clear()
        _listed_cache.clear()
    for w in items:
        w.close()


def get_source(run_dir: str | os.PathLike) -> Any:
    """The Trainer of ``run_dir`` when this process runs it, else its (refreshed) WatchedRun."""
    tr = registry.get(run_dir)
    if tr is not None:
        return tr
    w = watched(run_dir)
    w.refresh()
    return w


def alerts_of(source: Any) -> tuple[list[dict[str, Any]], set[int]]:
    """All alerts of a source as dicts (newest first) and the ids of the open ones."""
    alerts = source.alerts
    if alerts and not isinstance(alerts[0], dict):  # Trainer: Alert objects, and it knows which are open
        open_ids = {a.id for a in source.diagnose()["alerts"]}
        dicts = [a.to_dict() for a in alerts]
    else:
        dicts = list(alerts)
        open_ids = {int(a["id"]) for a in dicts if not a.get("dismissed")}
    return sorted(dicts, key=lambda a: (a.get("step", 0), a.get("id", 0)), reverse=True), open_ids


def config_of(source: Any) -> dict[str, Any]:
    """The run's config (config.yaml, which also holds the resolved seed, device and versions)."""
    path = Path(source.run_dir) / "config.yaml"
    if path.exists():
        return yaml.safe_load(path.read_text()) or {}
    return source.cfg.to_dict() if hasattr(source, "cfg") else {}


# ---------------------------------------------------------------------------- runs and where they live
def pid_alive(pid: Any) -> bool:
    """True when a process with this id exists on this machine."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner(run_dir: str | os.PathLike, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Who trains the run: ``{"where": "app" | "process" | "none", "pid": int | None, "alive": bool}``.

    "app": a trainer registered in this process; "process": another live process (CLI, notebook) that can
    be steered through the run's inbox; "none": nobody (ended, or its process is gone).
    """
    tr = registry.get(run_dir)
    if tr is not None:
        return {"where": "app", "pid": os.getpid(), "alive": tr.is_alive}
    meta = meta if meta is not None else watched(run_dir).meta
    pid = meta.get("pid")
    status = str(meta.get("status", "unknown"))
    alive = status not in ENDED and pid is not None and int(pid) != os.getpid() and pid_alive(pid)
    return {"where": "process" if alive else "none", "pid": pid, "alive": alive}


def describe_runs(root: str | os.PathLike) -> pd.DataFrame:
    """``list_runs(root)`` plus a resolved ``key`` column and ``where`` (this app / pid N / -).

    A run whose status says it is going but whose process is gone is shown as ``<status>?`` (stale).
    Trainers this app runs are listed even before their first row reaches the database.
    """
    df = _listed(root)
    df["key"] = [registry.key(p) for p in df["path"]]
    extra = [k for k, t in registry.trainers().items()
             if k not in set(df["key"]) and Path(k).parent == Path(registry.key(root))]
    if extra:
        rows = []
        for k in extra:
            snap = registry.get(k).snapshot() if registry.get(k) is not None else {}
            rows.append({"run": Path(k).name, "path": k, "key": k, "status": snap.get("status", "idle"),
                         "step": snap.get("step"), "best_val_loss": math.nan, "started": math.nan})
        df = pd.concat([pd.DataFrame(rows), df], ignore_index=True)
    where, status = [], []
    for k, st in zip(df["key"], df["status"]):
        tr = registry.get(k)
        if tr is not None:
            where.append("this app")
            status.append(tr.status)
            continue
        going = st not in ENDED and st not in ("unknown", "unreadable")
        meta_pid = _meta_pid(k) if going else None
        if going and meta_pid is not None and pid_alive(meta_pid) and int(meta_pid) != os.getpid():
            where.append(f"pid {meta_pid}")
            status.append(st)
        else:
            where.append("-")
            status.append(f"{st}?" if going else st)
    df["where"] = where
    df["status"] = status
    return df


_listed_cache: dict[str, tuple[float, pd.DataFrame]] = {}
LIST_TTL_S = 1.0


def _listed(root: str | os.PathLike) -> pd.DataFrame:
    """``list_runs(root)``, reused for ``LIST_TTL_S`` (one page run draws the list in several places)."""
    k = registry.key(root)
    now = time.monotonic()
    with _watched_lock:
        hit = _listed_cache.get(k)
    if hit is not None and now - hit[0] < LIST_TTL_S:
        return hit[1].copy()
    df = list_runs(root)
    with _watched_lock:
        _listed_cache[k] = (now, df)
    return df.copy()


def _meta_pid(run_dir: str) -> int | None:
    try:
        db = RunDB(Path(run_dir) / DB_NAME, readonly=True)
        try:
            pid = db.meta().get("pid")
        finally:
            db.close()
        return int(pid) if pid is not None else None
    except Exception:  # noqa: BLE001 - an unreadable run just shows no owner
        return None


def lineage(run_key: str, root: str | os.PathLike) -> dict[str, Any]:
    """Ancestors (oldest first, with the step each child forked at) and direct children of a run."""
    def meta_of(k: str) -> dict[str, Any]:
        try:
            db = RunDB(Path(k) / DB_NAME, readonly=True)
            try:
                return db.meta()
            finally:
                db.close()
        except Exception:  # noqa: BLE001
            return {}

    ancestors: list[dict[str, Any]] = []
    k, seen = run_key, {run_key}
    while True:
        m = meta_of(k)
        parent = m.get("parent_run")
        if not parent:
            break
        pk = registry.key(parent)
        ancestors.insert(0, {"run": pk, "child": k, "step": m.get("parent_step")})
        if pk in seen:
            break
        seen.add(pk)
        k = pk
    children = []
    root_p = Path(root)
    for child in sorted(root_p.iterdir()) if root_p.is_dir() else []:
        if (child / DB_NAME).is_file():
            m = meta_of(str(child))
            if m.get("parent_run") and registry.key(m["parent_run"]) == run_key:
                children.append({"run": registry.key(child), "step": m.get("parent_step")})
    return {"ancestors": ancestors, "children": children}
