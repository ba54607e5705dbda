"""Run folders: listing the runs under a root, and making a new run directory."""
from __future__ import annotations

import json
import math
import os
import sqlite3
import time as _time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .schema import DB_NAME, LIST_RUNS_COLUMNS, _to_int
from .store import RunDB


def _meta_label(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping) and isinstance(v.get("name"), str):
        return v["name"]
    return json.dumps(v, allow_nan=True)


def list_runs(root: str | os.PathLike = "runs") -> pd.DataFrame:
    """One row per run folder (immediate subfolder of ``root`` holding ``run.db``), newest first.

    Columns :data:`LIST_RUNS_COLUMNS`: run (folder name), path (str), status (meta "status", "unknown" if
    absent, "unreadable" if the database cannot be read), step (max step in ``steps``, else meta "step";
    nullable Int64), best_val_loss (min val_loss, NaN if none), started (meta "started" unix time, else the
    folder's mtime), dataset/model (meta values; dicts are shown by their "name"). Opens each database
    read-only, so it is safe while trainers write. A missing or empty root gives an empty frame.
    """
    root_p = Path(root)
    records: list[dict[str, Any]] = []
    children = sorted(p for p in root_p.iterdir() if p.is_dir()) if root_p.is_dir() else []
    for child in children:
        db_path = child / DB_NAME
        if not db_path.is_file():
            continue
        rec: dict[str, Any] = {
            "run": child.name,
            "path": str(child),
            "status": "unknown",
            "step": None,
            "best_val_loss": math.nan,
            "started": None,
            "dataset": None,
            "model": None,
        }
        try:
            db = RunDB(db_path, readonly=True)
            try:
                meta = db.meta()
                step = db.last_step()
                best = db._select("SELECT MIN(val_loss) FROM evals")
            finally:
                db.close()
        except (sqlite3.Error, OSError):
            rec["status"] = "unreadable"
            meta, step, best = {}, None, []
        if meta.get("status") is not None:
            rec["status"] = str(meta["status"])
        if step is None and meta.get("step") is not None:
            try:
                step = _to_int(meta["step"], "step")
            except ValueError:
                step = None
        rec["step"] = step
        if best and best[0][0] is not None:
            rec["best_val_loss"] = float(best[0][0])
        started = meta.get("started")
        try:
            rec["started"] = float(started) if started is not None else None
        except (TypeError, ValueError):
            rec["started"] = None
        if rec["started"] is None:
            try:
                rec["started"] = child.stat().st_mtime
            except OSError:
                rec["started"] = math.nan
        rec["dataset"] = _meta_label(meta.get("dataset"))
        rec["model"] = _meta_label(meta.get("model"))
        records.append(rec)

    def col(name: str) -> list[Any]:
        return [r[name] for r in records]

    df = pd.DataFrame(
        {
            "run": pd.Series(col("run"), dtype=object),
            "path": pd.Series(col("path"), dtype=object),
            "status": pd.Series(col("status"), dtype=object),
            "step": pd.array(col("step"), dtype="Int64"),
            "best_val_loss": np.array(col("best_val_loss"), dtype=np.float64),
            "started": np.array(col("started"), dtype=np.float64),
            "dataset": pd.Series(col("dataset"), dtype=object),
            "model": pd.Series(col("model"), dtype=object),
        },
        columns=list(LIST_RUNS_COLUMNS),
    )
    if len(df):
        df = df.sort_values(["started", "run"], ascending=[False, False], kind="stable").reset_index(drop=True)
    return df


MAX_NAME_BYTES = 100  # a run folder's name; "-N" may follow, and most file systems stop at 255 bytes


def new_run_dir(root: str | os.PathLike = "runs", name: str | None = None) -> Path:
    """Create ``root/<name>`` (default: a timestamp like ``2026-11-25_10-53-07``) with ``tb/`` and
    ``checkpoints/`` inside, and return its path. If the folder exists, ``-2``, ``-3``, ... is appended."""
    if name is not None:
        bad = (
            not isinstance(name, str)
            or name.strip() in ("", ".", "..")
            or "/" in name
            or os.sep in name
            or (os.altsep is not None and os.altsep in name)
            or "\0" in name
        )
        if bad:
            raise ValueError(
                f"name: a run name must be a single folder name (no path separators, not '.' or '..'), got "
                f"{name!r:.120}"
            )
        if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise ValueError(f"name: got a run name of {len(name)} characters; allowed: at most {MAX_NAME_BYTES} "
                             f"bytes (file systems refuse longer folder names)")
        base = name
    else:
        base = _time.strftime("%Y-%m-%d_%H-%M-%S")
    root_p = Path(root)
    root_p.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        candidate = root_p / (base if i == 1 else f"{base}-{i}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        (candidate / "tb").mkdir()
        (candidate / "checkpoints").mkdir()
        return candidate
    raise FileExistsError(f"could not find a free folder name for {base!r} under {str(root_p)!r}")
