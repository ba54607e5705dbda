"""The run directory: where a training run keeps everything another process needs to watch and steer it.

Layout::

    <run_dir>/config.yaml     the run's configuration (written elsewhere)
    <run_dir>/run.db          SQLite (WAL): metrics, event log, control inbox, checkpoints, metadata
    <run_dir>/tb/             TensorBoard event files
    <run_dir>/checkpoints/    checkpoint files

The trainer process writes ``run.db`` from a background thread; a dashboard in another process reads it
(read-only connections are fine while the trainer writes, thanks to WAL) and posts control requests to the
inbox, which the trainer applies and resolves.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import operator
import os
import sqlite3
import threading
import time as _time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

__all__ = [
    "RunDB",
    "TBWriter",
    "list_runs",
    "new_run_dir",
    "STEP_COLUMNS",
    "EVAL_COLUMNS",
    "LAYER_COLUMNS",
    "EVENT_COLUMNS",
    "CHECKPOINT_COLUMNS",
    "CONTROL_ACTIONS",
    "CONTROL_STATUSES",
    "LIST_RUNS_COLUMNS",
    "DB_NAME",
    "to_jsonable",
]

DB_NAME = "run.db"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 5000

#: Actions a control request may carry.
CONTROL_ACTIONS = ("set", "pause", "resume", "step", "stop", "checkpoint", "dismiss", "alert_action")
#: Outcomes the trainer may write back (a request starts as ``"pending"``).
CONTROL_STATUSES = ("applied", "refused")

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


# ---------------------------------------------------------------------------------------------- RunDB
class RunDB:
    """The run's SQLite database: metrics, event log, control inbox, checkpoint table, run metadata.

    Safe to use from several threads (each thread gets its own connection, opened on first use) and from
    several processes (WAL journal, ``busy_timeout`` 5 s, ``synchronous=NORMAL``; writes use
    ``BEGIN IMMEDIATE`` transactions). ``readonly=True`` opens ``file:...?mode=ro`` and never creates or
    changes anything; reads of tables that do not exist yet return empty frames.

    Metric rows are written with ``INSERT OR REPLACE`` keyed on ``step`` (``(step, layer)`` for layers):
    re-writing a step replaces the whole row. NaN is stored as NULL and read back as NaN; +-inf round-trip.
    A missing or None ``time`` is filled with the current unix time.
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = bool(readonly)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        if self.readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"run database {str(self.path)!r} does not exist (readonly=True)")
        else:
            if self.path.is_dir():
                raise IsADirectoryError(
                    f"{str(self.path)!r} is a directory; pass the path of the database file, e.g. "
                    f"{str(self.path / DB_NAME)!r}"
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._create_schema()

    # ------------------------------------------------------------------ connections
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"RunDB({str(self.path)!r}) is closed")
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self.readonly:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            conn = sqlite3.connect(
                uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
        else:
            conn = sqlite3.connect(
                str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if not self.readonly:
            conn.execute("PRAGMA synchronous=NORMAL")
        with self._conns_lock:
            if self._closed:
                conn.close()
                raise RuntimeError(f"RunDB({str(self.path)!r}) is closed")
            self._conns.append(conn)
        self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise PermissionError(f"RunDB({str(self.path)!r}) was opened with readonly=True")
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _select(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if _is_missing_table(exc):  # schema not created yet by the writer
                return []
            raise

    def _create_schema(self) -> None:
        conn = self._conn()
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":  # pragma: no cover - e.g. file systems without shared memory
            raise RuntimeError(f"could not switch {str(self.path)!r} to WAL mode (got journal_mode={mode!r})")
        with self._write() as c:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        """Close every connection this object opened (from any thread). Idempotent."""
        with self._conns_lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.close()
            except sqlite3.Error:
                pass

    def __enter__(self) -> "RunDB":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunDB({str(self.path)!r}, readonly={self.readonly})"

    # ------------------------------------------------------------------ metadata
    def set_meta(self, **values: Any) -> None:
        """Set metadata keys (each value stored as JSON), e.g. ``status="running", started=time.time()``."""
        if not values:
            return
        items = [(k, _dumps(v)) for k, v in values.items()]
        with self._write() as c:
            c.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", items)

    def meta(self) -> dict:
        """All metadata as ``{key: value}`` (values parsed from JSON)."""
        return {k: _loads(v) for k, v in self._select("SELECT key, value FROM meta ORDER BY key")}

    # ------------------------------------------------------------------ metrics
    def insert_steps(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write training-step rows in one transaction (``INSERT OR REPLACE`` on ``step``).

        Allowed keys: :data:`STEP_COLUMNS`; ``step`` is required, missing keys are NULL.
        """
        self.insert_step_tuples(self.step_tuples(rows))

    @staticmethod
    def step_tuples(rows: Sequence[Mapping[str, Any]]) -> list[tuple]:
        """Check and convert step rows (as :meth:`insert_steps` does) without writing them: the recorder
        converts a flush's rows a few at a time, pausing between them, then writes them in one go."""
        return _rows_to_tuples(rows, _STEP_SPEC, "steps", ("step",))

    def insert_step_tuples(self, tuples: Sequence[tuple]) -> None:
        """Write rows made by :meth:`step_tuples` in one transaction."""
        if not tuples:
            return
        cols = ", ".join(STEP_COLUMNS)
        marks = ", ".join("?" * len(STEP_COLUMNS))
        with self._write() as c:
            c.executemany(f"INSERT OR REPLACE INTO steps ({cols}) VALUES ({marks})", tuples)

    def insert_evals(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write evaluation rows (keys :data:`EVAL_COLUMNS`; ``INSERT OR REPLACE`` on ``step``)."""
        tuples = _rows_to_tuples(rows, _EVAL_SPEC, "evals", ("step",))
        if not tuples:
            return
        with self._write() as c:
            c.executemany(
                "INSERT OR REPLACE INTO evals (step, val_loss, val_acc, time) VALUES (?, ?, ?, ?)", tuples
            )

    def insert_layers(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write per-layer statistics (keys :data:`LAYER_COLUMNS`; primary key ``(step, layer)``)."""
        tuples = _rows_to_tuples(rows, _LAYER_SPEC, "layers", ("step", "layer"))
        if not tuples:
            return
        with self._write() as c:
            c.executemany(
                "INSERT OR REPLACE INTO layers (step, layer, grad_norm, param_norm, update_ratio) "
                "VALUES (?, ?, ?, ?, ?)",
                tuples,
            )

    def _read_table(self, table: str, spec: Mapping[str, str], order: str, since_step: int | None) -> pd.DataFrame:
        cols = ", ".join(spec)
        if since_step is None:
            rows = self._select(f"SELECT {cols} FROM {table} ORDER BY {order}")
        else:
            rows = self._select(
                f"SELECT {cols} FROM {table} WHERE step > ? ORDER BY {order}", (_to_int(since_step, "since_step"),)
            )
        return _frame(rows, spec)

    def read_steps(self, since_step: int | None = None) -> pd.DataFrame:
        """Training-step rows ordered by step (only ``step > since_step`` if given); columns :data:`STEP_COLUMNS`."""
        return self._read_table("steps", _STEP_SPEC, "step", since_step)

    def read_evals(self, since_step: int | None = None) -> pd.DataFrame:
        """Evaluation rows ordered by step (``step > since_step`` if given); columns :data:`EVAL_COLUMNS`."""
        return self._read_table("evals", _EVAL_SPEC, "step", since_step)

    def read_layers(self, since_step: int | None = None) -> pd.DataFrame:
        """Per-layer rows ordered by (step, layer) (``step > since_step`` if given); columns :data:`LAYER_COLUMNS`."""
        return self._read_table("layers", _LAYER_SPEC, "step, layer", since_step)

    def last_step(self) -> int | None:
        """The largest step in the ``steps`` table, or None when it is empty."""
        rows = self._select("SELECT MAX(step) FROM steps")
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    def delete_after(self, step: int) -> None:
        """Delete steps/evals/layers rows with ``step > step`` (when resuming from an older checkpoint)."""
        s = _to_int(step, "step")
        if s is None:
            raise ValueError("step must be an integer, got None")
        with self._write() as c:
            for table in ("steps", "evals", "layers"):
                c.execute(f"DELETE FROM {table} WHERE step > ?", (s,))

    # ------------------------------------------------------------------ event log
    def log_event(
        self,
        *,
        step: int,
        kind: str,
        source: str,
        data: Mapping | None = None,
        time: float | None = None,
    ) -> int:
        """Append an event (e.g. kind="control_applied", source="trainer") and return its id."""
        s = _to_int(step, "step")
        if s is None:
            raise ValueError("step must be an integer, got None")
        for name, val in (("kind", kind), ("source", source)):
            if not isinstance(val, str) or not val:
                raise ValueError(f"{name} must be a non-empty string, got {val!r}")
        if data is not None and not isinstance(data, Mapping):
            raise ValueError(f"data must be a mapping (dict) or None, got {data!r:.200}")
        t = _time.time() if time is None else float(time)
        with self._write() as c:
            cur = c.execute(
                "INSERT INTO events (time, step, kind, source, data) VALUES (?, ?, ?, ?, ?)",
                (t, s, kind, source, _dumps(dict(data or {}))),
            )
            return int(cur.lastrowid)

    def read_events(self, since_id: int | None = None) -> pd.DataFrame:
        """Events ordered by id (only ``id > since_id`` if given): id, time, step, kind, source, data (dict)."""
        sql = "SELECT id, time, step, kind, source, data FROM events"
        if since_id is None:
            rows = self._select(sql + " ORDER BY id")
        else:
            rows = self._select(sql + " WHERE id > ? ORDER BY id", (_to_int(since_id, "since_id"),))
        rows = [r[:5] + (_loads(r[5]),) for r in rows]
        spec = {"id": "int", "time": "real", "step": "int", "kind": "text", "source": "text", "data": "obj"}
        return _frame(rows, spec)

    # ------------------------------------------------------------------ control inbox
    def post_control(self, controls: Mapping[str, Any], *, source: str = "dashboard", action: str = "set") -> int:
        """Post a control request (status ``"pending"``) for the trainer process; returns the request id.

        ``action`` is one of :data:`CONTROL_ACTIONS`; ``"set"`` needs a non-empty ``controls`` mapping
        (e.g. ``{"lr": 1e-3}``); ``"dismiss"`` takes ``{"alert": id}``, ``"alert_action"`` ``{"alert": id,
        "index": i}`` (the trainer checks both); the other actions may pass ``{}``.
        """
        if action not in CONTROL_ACTIONS:
            raise ValueError(f"unknown control action {action!r}; allowed: {list(CONTROL_ACTIONS)!r}")
        if not isinstance(controls, Mapping):
            raise ValueError(f"controls must be a mapping (dict), got {controls!r:.200}")
        if action == "set" and not controls:
            raise ValueError("action 'set' needs at least one control, got an empty mapping")
        if not isinstance(source, str) or not source:
            raise ValueError(f"source must be a non-empty string, got {source!r}")
        with self._write() as c:
            cur = c.execute(
                "INSERT INTO controls (time, source, action, controls, status) VALUES (?, ?, ?, ?, 'pending')",
                (_time.time(), source, action, _dumps(dict(controls))),
            )
            return int(cur.lastrowid)

    def pending_controls(self) -> list[dict]:
        """Pending requests, oldest first: ``[{id, time, source, action, controls}]``."""
        rows = self._select(
            "SELECT id, time, source, action, controls FROM controls WHERE status = 'pending' ORDER BY id"
        )
        return [
            {"id": int(i), "time": t, "source": s, "action": a, "controls": _loads(c)} for i, t, s, a, c in rows
        ]

    def resolve_control(self, request_id: int, *, status: str, step: int | None, message: str = "") -> None:
        """Write the outcome of a pending request: ``status`` in :data:`CONTROL_STATUSES`, the step at which
        it took effect (None if not applicable) and a human-readable message.

        Raises ``KeyError`` for an unknown id and ``ValueError`` if the request is no longer pending.
        """
        if status not in CONTROL_STATUSES:
            raise ValueError(f"unknown control status {status!r}; allowed: {list(CONTROL_STATUSES)!r}")
        rid = _to_int(request_id, "request_id")
        s = _to_int(step, "step")
        with self._write() as c:
            cur = c.execute(
                "UPDATE controls SET status = ?, step = ?, message = ?, resolved_time = ? "
                "WHERE id = ? AND status = 'pending'",
                (status, s, str(message), _time.time(), rid),
            )
            if cur.rowcount == 0:
                row = c.execute("SELECT status FROM controls WHERE id = ?", (rid,)).fetchone()
                if row is None:
                    raise KeyError(f"no control request with id {request_id!r}")
                raise ValueError(f"control request {request_id!r} is already {row[0]!r}, not 'pending'")

    def control(self, request_id: int) -> dict:
        """One request: ``{id, time, source, action, controls, status, step, message, resolved_time}``."""
        rows = self._select(
            "SELECT id, time, source, action, controls, status, step, message, resolved_time "
            "FROM controls WHERE id = ?",
            (_to_int(request_id, "request_id"),),
        )
        if not rows:
            raise KeyError(f"no control request with id {request_id!r}")
        i, t, src, act, ctl, st, step, msg, rt = rows[0]
        return {
            "id": int(i),
            "time": t,
            "source": src,
            "action": act,
            "controls": _loads(ctl),
            "status": st,
            "step": None if step is None else int(step),
            "message": msg,
            "resolved_time": rt,
        }

    def wait_control(self, request_id: int, timeout: float = 10.0, poll: float = 0.05) -> dict:
        """Poll until the request is no longer pending or ``timeout`` seconds pass; returns :meth:`control`
        (its ``status`` is still ``"pending"`` after a timeout)."""
        deadline = _time.monotonic() + float(timeout)
        while True:
            rec = self.control(request_id)
            if rec["status"] != "pending" or _time.monotonic() >= deadline:
                return rec
            _time.sleep(max(0.0, min(poll, deadline - _time.monotonic())))

    # ------------------------------------------------------------------ checkpoints
    def add_checkpoint(
        self, *, step: int, path: str, metric: float | None, tag: str | None, time: float | None = None
    ) -> None:
        """Record a checkpoint file (keyed on ``path``: adding the same path again replaces the record)."""
        (row,) = _rows_to_tuples(
            [{"step": step, "path": os.fspath(path), "metric": metric, "tag": tag, "time": time}],
            _CHECKPOINT_SPEC,
            "checkpoints",
            ("step", "path"),
        )
        with self._write() as c:
            c.execute("INSERT OR REPLACE INTO checkpoints (step, path, metric, tag, time) VALUES (?, ?, ?, ?, ?)", row)

    def remove_checkpoint(self, path: str) -> None:
        """Forget a checkpoint record (the file itself is not touched); unknown paths are ignored."""
        with self._write() as c:
            c.execute("DELETE FROM checkpoints WHERE path = ?", (os.fspath(path),))

    def read_checkpoints(self) -> pd.DataFrame:
        """Checkpoint records ordered by step: step, path, metric, tag, time."""
        return _frame(self.checkpoint_rows(), _CHECKPOINT_SPEC)

    def checkpoint_rows(self) -> list[tuple]:
        """The same records as plain ``(step, path, metric, tag, time)`` tuples (no DataFrame to build:
        retention runs this on the checkpoint writer's thread after every save)."""
        return self._select("SELECT step, path, metric, tag, time FROM checkpoints ORDER BY step, time")


# ---------------------------------------------------------------------------------------------- TensorBoard
class TBWriter:
    """Writes scalars to a TensorBoard event file in batches (called from a background thread, never per
    step on the hot path). Thread-safe.

    Consecutive records with the same step and wall time (a training step's loss, lr, grad norm, ...)
    become one event; see :mod:`workbench.tbevents` for why this does not go through ``SummaryWriter``.
    Events reach the file on ``flush()`` and at most every ``flush_secs`` seconds of writes."""

    def __init__(self, logdir: str | os.PathLike, flush_secs: int = 10):
        from .tbevents import EventFile

        self.logdir = Path(logdir)
        self._lock = threading.Lock()
        self._file: Any = EventFile(self.logdir)
        self._flush_secs = flush_secs
        self._flushed = _time.monotonic()

    def write(self, records: Iterable[tuple[str, int, float, float]]) -> None:
        """Write ``(tag, step, value, walltime)`` records; walltime None means now."""
        from .tbevents import encode_scalars

        events: list[bytes] = []
        key: tuple[int, float] | None = None
        values: list[tuple[str, float]] = []
        for rec in records:
            try:
                tag, step, value, walltime = rec
            except (TypeError, ValueError):
                raise ValueError(f"records must be (tag, step, value, walltime) tuples, got {rec!r:.200}") from None
            if not isinstance(tag, str) or not tag:
                raise ValueError(f"tag must be a non-empty string, got {tag!r}")
            k = (_to_int(step, "step"), _time.time() if walltime is None else float(walltime))
            if k != key:
                if values:
                    events.append(encode_scalars(key[0], key[1], values))
                key, values = k, []
            values.append((tag, float(value)))
        if values:
            events.append(encode_scalars(key[0], key[1], values))
        with self._lock:
            if self._file is None:
                raise RuntimeError(f"TBWriter({str(self.logdir)!r}) is closed")
            for e in events:
                self._file.write_record(e)
            if _time.monotonic() - self._flushed >= self._flush_secs:
                self._file.flush()
                self._flushed = _time.monotonic()

    def flush(self) -> None:
        """Push buffered events to disk."""
        with self._lock:
            if self._file is not None:
                self._file.flush()
                self._flushed = _time.monotonic()

    def close(self) -> None:
        """Flush and close the event file. Idempotent."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "TBWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- run folders
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
                f"run name must be a single folder name (no path separators, not '.' or '..'), got {name!r}"
            )
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
