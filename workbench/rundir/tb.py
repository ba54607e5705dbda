"""TensorBoard scalars for a run, written in batches from a background thread (workbench.tbevents)."""
from __future__ import annotations

import os
import threading
import time as _time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..tbevents import EventFile, encode_scalars
from .schema import _to_int


class TBWriter:
    """Writes scalars to a TensorBoard event file in batches (called from a background thread, never per
    step on the hot path). Thread-safe.

    Consecutive records with the same step and wall time (a training step's loss, lr, grad norm, ...)
    become one event; see :mod:`workbench.tbevents` for why this does not go through ``SummaryWriter``.
    Events reach the file on ``flush()`` and at most every ``flush_secs`` seconds of writes."""

    def __init__(self, logdir: str | os.PathLike, flush_secs: int = 10):
        self.logdir = Path(logdir)
        self._lock = threading.Lock()
        self._file: Any = EventFile(self.logdir)
        self._flush_secs = flush_secs
        self._flushed = _time.monotonic()

    def write(self, records: Iterable[tuple[str, int, float, float]]) -> None:
        """Write ``(tag, step, value, walltime)`` records; walltime None means now."""
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
