"""The run's SQLite database: metrics, event log, control inbox, checkpoint table and run metadata."""
from __future__ import annotations

import os
import sqlite3
import threading
import time as _time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from ..requests import ACTIONS, OUTCOMES
from .schema import (_CHECKPOINT_SPEC, _EVAL_SPEC, _LAYER_SPEC, _SCHEMA, _STEP_SPEC, BUSY_TIMEOUT_MS, DB_NAME,
                     SCHEMA_VERSION, STEP_COLUMNS, _dumps, _frame, _is_missing_table,
                     _loads, _loads_or_text, _rows_to_tuples, _to_int)


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

    def insert_eval_metrics(self, rows: Sequence[tuple[int, str, float | None]]) -> None:
        """Write (step, name, value) rows of the metrics an evaluation measures beyond loss and accuracy."""
        tuples = [(_to_int(step, "step"), str(name), None if value is None else float(value))
                  for step, name, value in rows]
        if tuples:
            with self._write() as c:
                c.executemany("INSERT OR REPLACE INTO eval_metrics (step, name, value) VALUES (?, ?, ?)", tuples)

    def read_eval_metrics(self) -> pd.DataFrame:
        """The other metrics of every evaluation, one column per name (step first, ordered by step)."""
        rows = self._select("SELECT step, name, value FROM eval_metrics ORDER BY step")  # none: no such table yet
        if not rows:
            return pd.DataFrame({"step": pd.Series(dtype="int64")})
        long = pd.DataFrame(rows, columns=["step", "name", "value"])
        wide = long.pivot(index="step", columns="name", values="value").reset_index()
        wide.columns.name = None
        return wide

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
            for table in ("steps", "evals", "layers", "eval_metrics"):
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

        ``action`` is one of the request vocabulary's (``workbench.requests.ACTIONS``), ``controls`` its
        arguments: what they may be is checked by ``workbench.requests.make_request`` (the poster, and the
        trainer again when it picks the request up), not here.
        """
        if action not in ACTIONS:
            raise ValueError(f"unknown control action {action!r}; allowed: {list(ACTIONS)!r}")
        if not isinstance(controls, Mapping):
            raise ValueError(f"controls must be a mapping (dict), got {controls!r:.200}")
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
            {"id": int(i), "time": t, "source": s, "action": a, "controls": _loads_or_text(c)}
            for i, t, s, a, c in rows
        ]

    def resolve_control(self, request_id: int, *, status: str, step: int | None, message: str = "") -> None:
        """Write the outcome of a pending request: ``status`` in :data:`CONTROL_STATUSES`, the step at which
        it took effect (None if not applicable) and a human-readable message.

        Raises ``KeyError`` for an unknown id and ``ValueError`` if the request is no longer pending.
        """
        if status not in OUTCOMES:
            raise ValueError(f"unknown control status {status!r}; allowed: {list(OUTCOMES)!r}")
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
            "controls": _loads_or_text(ctl),
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
