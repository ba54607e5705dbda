"""The runs under a folder: who trains each one, and how they descend from each other.

``describe_runs(root)`` lists every run directory (``workbench.rundir.list_runs``) with who trains it: a
trainer of this process (``workbench.registry``), another live process (steerable through the run's inbox),
or nobody. ``owner(run_dir)`` says the same of one run; ``lineage`` follows forks both ways.
"""
from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd

from . import registry
from .requests import ENDED
from .rundir import DB_NAME, RunDB, list_runs

_listed_lock = threading.Lock()


def _meta_of(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run's metadata, read once; {} when it cannot be read."""
    try:
        db = RunDB(Path(run_dir) / DB_NAME, readonly=True)
        try:
            return db.meta()
        finally:
            db.close()
    except Exception:  # noqa: BLE001 - an unreadable run just shows no owner and no lineage
        return {}


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
    meta = meta if meta is not None else _meta_of(run_dir)
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
    with _listed_lock:
        hit = _listed_cache.get(k)
    if hit is not None and now - hit[0] < LIST_TTL_S:
        return hit[1].copy()
    df = list_runs(root)
    with _listed_lock:
        _listed_cache[k] = (now, df)
    return df.copy()


def _meta_pid(run_dir: str) -> int | None:
    pid = _meta_of(run_dir).get("pid")
    return int(pid) if pid is not None else None


def lineage(run_key: str, root: str | os.PathLike) -> dict[str, Any]:
    """Ancestors (oldest first, with the step each child forked at) and direct children of a run."""
    ancestors: list[dict[str, Any]] = []
    k, seen = run_key, {run_key}
    while True:
        m = _meta_of(k)
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
            m = _meta_of(str(child))
            if m.get("parent_run") and registry.key(m["parent_run"]) == run_key:
                children.append({"run": registry.key(child), "step": m.get("parent_step")})
    return {"ancestors": ancestors, "children": children}


def clear_cache() -> None:
    """Forget the cached run lists (tests)."""
    with _listed_lock:
        _listed_cache.clear()
