"""TensorBoard records of a run, written in batches from a background thread (workbench.tbevents).

What a TensorBoard user finds in ``<run>/tb``:

* Scalars: ``train/*`` per step (loss, lr, grad norm, batch size, samples/s, precision as a code:
  0 fp32, 1 bf16, 2 fp16), ``val/*`` per evaluation, ``controls/*`` (each live control at the start and at
  every change: lr, batch size, accumulate, precision code, grad clip, weight decay), and the per-layer
  statistics ``layer_grad_norm/<parameter>``, ``layer_update_ratio/<parameter>``,
  ``layer_param_norm/<parameter>`` every ``layer_every`` steps;
* Text: ``config`` (the run's config.yaml) and ``events`` (the event log: live changes and who made them,
  checkpoints, alerts, pauses, ...; one entry per step that had events);
* HParams: the config's scalar fields as hyperparameters, with val/loss, val/acc and train/loss as metrics.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time as _time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..tbevents import EventFile, encode_hparams, encode_scalars, encode_text
from .schema import _to_int

PRECISION_CODES = {"fp32": 0, "bf16": 1, "fp16": 2}     # the step table's codes (runlog.PRECISION_CODES)
CONTROL_FIELDS = ("lr", "batch_size", "accumulate", "precision", "grad_clip", "weight_decay")
HPARAM_METRICS = ("val/loss", "val/acc", "train/loss")
LAYER_STATS = ("grad_norm", "update_ratio", "param_norm")


class TBWriter:
    """Writes scalars to a TensorBoard event file in batches (called from a background thread, never per
    step on the hot path). Thread-safe.

    Consecutive records with the same step and wall time (a training step's loss, lr, grad norm, ...)
    become one event; see :mod:`workbench.tbevents` for why this does not go through ``SummaryWriter``.
    Events reach the file on ``flush()`` and at most every ``flush_secs`` seconds of writes.

    ``config``: the run's configuration, written at once as text, hyperparameters and the starting
    ``controls/*``; by default the run directory's ``config.yaml`` (``logdir``'s parent) when it exists."""

    def __init__(self, logdir: str | os.PathLike, flush_secs: int = 10, config: Mapping[str, Any] | None = None):
        self.logdir = Path(logdir)
        self._lock = threading.Lock()
        self._file: Any = EventFile(self.logdir)
        self._flush_secs = flush_secs
        self._flushed = _time.monotonic()
        if config is None:
            path = self.logdir.parent / "config.yaml"
            config = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else None
        if config:
            self.write_config(config)

    def write_config(self, config: Mapping[str, Any], walltime: float | None = None) -> None:
        """The config as markdown text (tag ``config``), as HParams (its scalar fields, nested ones dotted)
        and the controls it starts with (``controls/*`` at step 0)."""
        t = _time.time() if walltime is None else float(walltime)
        text = "    " + yaml.safe_dump(dict(config), sort_keys=False).replace("\n", "\n    ")  # a code block
        hparams = {k: v for k, v in _flat(config).items() if v is not None}
        records = [encode_text(0, t, "config", text), *encode_hparams(t, hparams, HPARAM_METRICS)]
        self._append(records)
        self.write((f"controls/{k}", 0, v, t) for k, v in _control_values(config).items())

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
        self._append(events)

    def write_layers(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Per-layer statistics rows (step, layer, grad_norm, update_ratio, param_norm) as scalars
        ``layer_<stat>/<layer>``; non-finite values are left out."""
        records = [(f"layer_{stat}/{r['layer']}", int(r["step"]), float(r[stat]), None)
                   for r in rows for stat in LAYER_STATS
                   if r.get(stat) is not None and math.isfinite(float(r[stat]))]
        if records:
            self.write(records)

    def write_events(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Event-log entries (time, step, kind, source, data) as markdown text (tag ``events``, one entry per
        step), and each live control change as a ``controls/<field>`` scalar at the step it took effect."""
        by_step: dict[int, list[str]] = defaultdict(list)
        times: dict[int, float] = {}
        scalars = []
        for ev in events:
            step = int(ev.get("step") or 0)
            data = dict(ev.get("data") or {})
            by_step[step].append(f"* **{ev.get('kind')}** ({ev.get('source')}): {_describe(data)}")
            times[step] = float(ev.get("time") or _time.time())
            if ev.get("kind") == "control" and data.get("field") in CONTROL_FIELDS:
                value = _control_value(data["field"], data.get("new"))
                if value is not None:
                    scalars.append((f"controls/{data['field']}", step, value, times[step]))
        self._append([encode_text(step, times[step], "events", "\n".join(lines)) for step, lines in by_step.items()])
        if scalars:
            self.write(scalars)

    def _append(self, records: list[bytes]) -> None:
        with self._lock:
            if self._file is None:
                raise RuntimeError(f"TBWriter({str(self.logdir)!r}) is closed")
            for e in records:
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


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | float | str]:
    """Scalar fields of a nested config as ``a.b`` names (lists and other values as their JSON text)."""
    out: dict[str, bool | float | str] = {}
    for k, v in config.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, name + "."))
        elif isinstance(v, bool) or isinstance(v, str):
            out[name] = v
        elif isinstance(v, (int, float)):
            out[name] = float(v)
        elif v is not None:
            out[name] = json.dumps(v, default=str)
    return out


def _control_value(name: str, value: Any) -> float | None:
    """A control's value as a scalar (precision by its code); None for "off" or a value that is not a number."""
    if name == "precision":
        return PRECISION_CODES.get(str(value))
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _control_values(config: Mapping[str, Any]) -> dict[str, float]:
    values = {k: _control_value(k, config.get(k)) for k in CONTROL_FIELDS}
    return {k: v for k, v in values.items() if v is not None}


def _describe(data: Mapping[str, Any]) -> str:
    """An event's data in one line: ``lr: 0.001 -> 0.003`` for a change, else its fields."""
    if {"field", "old", "new"} <= set(data):
        return f"{data['field']}: {data['old']} -> {data['new']}"
    return ", ".join(f"{k}={v}" for k, v in data.items() if k != "traceback") or "-"
