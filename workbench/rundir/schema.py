"""The run directory's SQLite schema: its tables, their column types, and how values go in and come out.

Metric and checkpoint rows are plain mappings checked column by column (a wrong type is a ValueError that
names the column); event and request payloads are stored as JSON that never makes logging crash
(:func:`to_jsonable`). NaN is stored as NULL and read back as NaN; +-inf round-trip.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import operator
import os
import sqlite3
import time as _time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

DB_NAME = "run.db"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 5000


# column name -> kind ("int", "real", "text"); order is the table's column order
_STEP_SPEC: dict[str, str] = {
    "step": "int",
    "epoch": "real",
    "train_loss": "real",
    "lr": "real",
    "batch_size": "int",
    "precision": "text",
    "grad_norm": "real",
    "samples_per_s": "real",
    "time": "real",
}
_EVAL_SPEC: dict[str, str] = {"step": "int", "val_loss": "real", "val_acc": "real", "time": "real"}
_LAYER_SPEC: dict[str, str] = {
    "step": "int",
    "layer": "text",
    "grad_norm": "real",
    "param_norm": "real",
    "update_ratio": "real",
}
_CHECKPOINT_SPEC: dict[str, str] = {"step": "int", "path": "text", "metric": "real", "tag": "text", "time": "real"}

STEP_COLUMNS: tuple[str, ...] = tuple(_STEP_SPEC)
EVAL_COLUMNS: tuple[str, ...] = tuple(_EVAL_SPEC)
LAYER_COLUMNS: tuple[str, ...] = tuple(_LAYER_SPEC)
CHECKPOINT_COLUMNS: tuple[str, ...] = tuple(_CHECKPOINT_SPEC)
EVENT_COLUMNS: tuple[str, ...] = ("id", "time", "step", "kind", "source", "data")
LIST_RUNS_COLUMNS: tuple[str, ...] = ("run", "path", "status", "step", "best_val_loss", "started", "dataset", "model")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    step          INTEGER PRIMARY KEY,
    epoch         REAL,
    train_loss    REAL,
    lr            REAL,
    batch_size    INTEGER,
    precision     TEXT,
    grad_norm     REAL,
    samples_per_s REAL,
    time          REAL
);
CREATE TABLE IF NOT EXISTS evals (
    step     INTEGER PRIMARY KEY,
    val_loss REAL,
    val_acc  REAL,
    time     REAL
);
CREATE TABLE IF NOT EXISTS layers (
    step         INTEGER NOT NULL,
    layer        TEXT NOT NULL,
    grad_norm    REAL,
    param_norm   REAL,
    update_ratio REAL,
    PRIMARY KEY (step, layer)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS eval_metrics (
    step  INTEGER NOT NULL,
    name  TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (step, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    time   REAL NOT NULL,
    step   INTEGER NOT NULL,
    kind   TEXT NOT NULL,
    source TEXT NOT NULL,
    data   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS controls (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    time          REAL NOT NULL,
    source        TEXT NOT NULL,
    action        TEXT NOT NULL,
    controls      TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'pending',
    step          INTEGER,
    message       TEXT NOT NULL DEFAULT '',
    resolved_time REAL
);
CREATE INDEX IF NOT EXISTS controls_status ON controls (status, id);
CREATE TABLE IF NOT EXISTS checkpoints (
    path   TEXT PRIMARY KEY,
    step   INTEGER NOT NULL,
    metric REAL,
    tag    TEXT,
    time   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_step ON checkpoints (step);
"""


# ---------------------------------------------------------------------------------------------- JSON
def to_jsonable(obj: Any) -> Any:
    """Turn ``obj`` into plain JSON types: numpy scalars/arrays, tensors, tuples, sets, paths and
    datetimes are converted; mapping keys become strings; other objects become ``str(obj)``.

    Why: event/control payloads come from training code and must never make logging crash.
    Non-finite floats are kept as floats (written as ``NaN``/``Infinity`` tokens, which Python reads back).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {(k if isinstance(k, str) else str(to_jsonable(k))): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    tolist = getattr(obj, "tolist", None)  # torch tensors and similar
    if callable(tolist):
        try:
            return to_jsonable(tolist())
        except Exception:
            pass
    return str(obj)


def _dumps(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), allow_nan=True, separators=(",", ":"))


def _loads(text: str | None) -> Any:
    if text is None:
        return None
    return json.loads(text)


class Unreadable(str):
    """Stored text that is not valid JSON (a row another program wrote): kept as text, so that one bad row
    never stops the reading of the others; ``error`` says what is wrong with it."""

    error: str = ""


def _loads_or_text(text: Any) -> Any:
    """``_loads``, or the text itself as :class:`Unreadable` when it is not JSON."""
    try:
        return _loads(text)
    except (TypeError, ValueError) as e:
        bad = Unreadable(text if isinstance(text, str) else repr(text))
        bad.error = f"not valid JSON ({e})"
        return bad


# ---------------------------------------------------------------------------------------------- converters
def _to_int(v: Any, col: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    try:
        return operator.index(v)
    except TypeError:
        pass
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"column {col!r} must be an integer or None, got {v!r:.200}") from None
    if not f.is_integer():
        raise ValueError(f"column {col!r} must be an integer or None, got {v!r:.200}")
    return int(f)


def _to_real(v: Any, col: str) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"column {col!r} must be a number or None, got {v!r:.200}") from None
    return None if math.isnan(f) else f  # SQLite stores NaN as NULL anyway; be explicit


def _to_text(v: Any, col: str) -> str | None:
    return None if v is None else str(v)


_CONVERTERS: dict[str, Callable[[Any, str], Any]] = {"int": _to_int, "real": _to_real, "text": _to_text}


def _rows_to_tuples(
    rows: Sequence[Mapping[str, Any]], spec: Mapping[str, str], table: str, required: Sequence[str]
) -> list[tuple]:
    cols = tuple(spec)
    convs = [(c, _CONVERTERS[spec[c]]) for c in cols]
    now = _time.time()
    out: list[tuple] = []
    for row in rows:
        if not isinstance(row, Mapping):
            raise ValueError(f"{table} rows must be mappings (dicts), got {row!r:.200}")
        unknown = [k for k in row if k not in spec]
        if unknown:
            raise ValueError(f"unknown {table} column(s) {unknown!r}; allowed: {list(cols)!r}")
        vals = []
        for c, conv in convs:
            v = conv(row.get(c), c)
            if v is None:
                if c == "time":
                    v = now
                elif c in required:
                    raise ValueError(f"{table} row is missing required column {c!r}: {dict(row)!r:.300}")
            vals.append(v)
        out.append(tuple(vals))
    return out


def _frame(rows: list[tuple], spec: Mapping[str, str]) -> pd.DataFrame:
    """Build a DataFrame with stable dtypes whatever the rows: ``step``/``id`` int64, other numbers float64
    (NULL -> NaN), text and parsed JSON as object (NULL -> None)."""
    columns = list(zip(*rows)) if rows else [()] * len(spec)
    data: dict[str, Any] = {}
    for (c, kind), vals in zip(spec.items(), columns):
        if kind == "int" and c in ("step", "id"):
            data[c] = np.array(vals, dtype=np.int64)
        elif kind in ("int", "real"):
            data[c] = np.array(vals, dtype=np.float64)  # None -> NaN
        else:
            data[c] = pd.Series(vals, dtype=object)
    return pd.DataFrame(data, columns=list(spec))


def _is_missing_table(exc: sqlite3.OperationalError) -> bool:
    return "no such table" in str(exc)


