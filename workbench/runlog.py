"""The run's record in memory: step, eval and per-layer metric stores, the event log, and their way to disk.

The trainer thread writes here; any thread reads (the views poll ``snapshot``-sized pieces: ``series``,
``event_list``, ``layer_columns``). Every row and event also goes to the :class:`~workbench.recorder.Recorder`,
which writes them to the run directory's SQLite file and TensorBoard off the training thread. A step's
loss and grad norm stay on the device until :meth:`RunLog.flush` reads a batch of them back (every
``sync_every`` steps on a GPU, every step on a CPU, where there is no transfer to batch).
"""
from __future__ import annotations

import datetime as _dt
import math
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .metrics import SeriesStore
from .recorder import Recorder
from .rundir import RunDB

PRECISION_CODES = {"fp32": 0, "bf16": 1, "fp16": 2}


def wall_clock(seconds: pd.Series) -> pd.Series:
    """Seconds since the epoch as timestamps in this machine's time zone (a table shows 2026-12-05 10:40:12,
    not 1.796e+09)."""
    return pd.to_datetime(seconds, unit="s", utc=True).dt.tz_convert(_dt.datetime.now().astimezone().tzinfo)
PRECISION_NAMES = {v: k for k, v in PRECISION_CODES.items()}
STEP_COLUMNS = ("step", "epoch", "train_loss", "lr", "batch_size", "precision", "grad_norm", "samples_per_s",
                "time")
EVAL_COLUMNS = ("step", "val_loss", "val_acc", "time")
LAYER_COLUMNS = ("step", "layer", "grad_norm", "param_norm", "update_ratio")


class RunLog:
    """Metric stores, the event log and the read-back of device values, for one run.

    ``on_value(loss, grad_norm, precision_code)`` is called for every step read back (the diagnosis watch
    uses it to see a NaN or an exploding loss at once).
    """

    def __init__(self, recorder: Recorder, param_names: Sequence[str],
                 on_value: Callable[[float, float, int], None]) -> None:
        self.recorder = recorder
        self.param_names = list(param_names)
        self.steps = SeriesStore(STEP_COLUMNS)
        self.evals_store = SeriesStore(EVAL_COLUMNS)
        self.layers = SeriesStore(LAYER_COLUMNS)
        self.latest_layers: dict[str, Any] | None = None   # the newest layer statistics, for detectors
        self.last_eval: dict[str, float] = {}
        self.extra_evals: dict[str, SeriesStore] = {}   # metrics beyond loss and accuracy, by name
        self._events: list[dict[str, Any]] = []
        self._events_lock = threading.Lock()
        self._pending: list[tuple] = []   # steps whose device values are not read back yet
        self._on_value = on_value

    # ------------------------------------------------------------------ writing (trainer thread)
    def event(self, kind: str, source: str, data: Mapping[str, Any] | None, step: int) -> None:
        """Append an entry to the event log (and to the run directory's)."""
        ev = {"time": time.time(), "step": step, "kind": kind, "source": source, "data": dict(data or {})}
        with self._events_lock:
            self._events.append(ev)
        self.recorder.events.append(ev)

    def note_error(self, kind: str, step: int, data: Mapping[str, Any]) -> None:
        """An event for this log only: the recorder itself failed and cannot carry it to disk."""
        with self._events_lock:
            self._events.append({"time": time.time(), "step": step, "kind": kind, "source": "trainer",
                                 "data": dict(data)})

    def queue_step(self, row: tuple) -> int:
        """A step's row with its loss and grad norm still on the device, in STEP_COLUMNS order; returns
        how many steps wait for read-back."""
        self._pending.append(row)
        return len(self._pending)

    @property
    def pending(self) -> bool:
        """Steps are waiting for their read-back (detectors run only when none do)."""
        return bool(self._pending)

    def flush(self) -> None:
        """Read back the queued steps' losses and grad norms in one transfer, and store their rows."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if pending[0][2].device.type == "cpu":  # no transfer to batch: two scalar reads beat two stacks
            values = [(p[2].item(), p[6].item()) for p in pending]
        else:
            values = torch.stack([torch.stack([p[2].float(), p[6].float()]) for p in pending]).tolist()
        append, rows, on_value = self.steps.append_values, self.recorder.steps, self._on_value
        for p, (loss, gn) in zip(pending, values):
            on_value(loss, gn, p[5])
            append((p[0], p[1], loss, p[3], p[4], p[5], gn, p[7], p[8]))  # STEP_COLUMNS order
            rows.append({"step": p[0], "epoch": p[1], "train_loss": loss, "lr": p[3], "batch_size": p[4],
                         "precision": PRECISION_NAMES[p[5]], "grad_norm": gn, "samples_per_s": p[7],
                         "time": p[8]})

    def record_layers(self, step: int, grad_norms: list, param_norms: list, update_norms: list,
                      is_matrix: np.ndarray) -> None:
        """One step's per-parameter statistics (device tensors, read back here in one transfer)."""
        stats = torch.stack([torch.stack(grad_norms), torch.stack(param_norms),
                             torch.stack(update_norms)]).float().tolist()
        g, pn, u = (np.asarray(v) for v in stats)
        with np.errstate(all="ignore"):
            ratio = np.where(pn > 0, u / pn, np.nan)
        self.latest_layers = {"step": step, "name": np.asarray(self.param_names), "grad_norm": g,
                              "param_norm": pn, "update_ratio": ratio, "is_matrix": is_matrix}
        for i, name in enumerate(self.param_names):
            g, p, u = stats[0][i], stats[1][i], stats[2][i]
            ratio = u / p if p > 0 else float("nan")
            self.layers.append({"step": step, "layer": i, "grad_norm": g, "param_norm": p, "update_ratio": ratio})
            self.recorder.layers.append({"step": step, "layer": name, "grad_norm": g, "param_norm": p,
                                         "update_ratio": ratio})

    def record_eval(self, step: int, val_loss: float, val_acc: float,
                    extra: Mapping[str, float] | None = None) -> None:
        """One evaluation: loss, accuracy (NaN: none) and the other metrics by name (workbench.evalmetrics)."""
        row = {"step": step, "val_loss": val_loss, "val_acc": val_acc, "time": time.time()}
        self.evals_store.append(row)
        extra = dict(extra or {})
        for name, value in extra.items():
            store = self.extra_evals.get(name)
            if store is None:
                store = self.extra_evals[name] = SeriesStore(("step", "value"))
            store.append({"step": step, "value": value})
        self.recorder.evals.append({**row, "val_acc": None if math.isnan(val_acc) else val_acc})
        if extra:
            self.recorder.eval_metrics.extend((step, k, None if math.isnan(v) else v) for k, v in extra.items())
        self.last_eval = {"step": step, "val_loss": val_loss, "val_acc": val_acc, **extra}

    # ------------------------------------------------------------------ reading (any thread)
    def history(self) -> pd.DataFrame:
        df = self.steps.frame()
        for col in ("step", "epoch", "batch_size"):
            df[col] = df[col].astype("int64")
        df["precision"] = df["precision"].map(lambda c: PRECISION_NAMES.get(int(c), "?")).astype(str)
        return df

    def evals(self) -> pd.DataFrame:
        """step, val_loss, val_acc, time, then one column per other metric (NaN where an eval lacks it)."""
        df = self.evals_store.frame()
        df["step"] = df["step"].astype("int64")
        df["time"] = wall_clock(df["time"])
        for name, store in list(self.extra_evals.items()):
            col = store.frame()
            df[name] = df["step"].map(dict(zip(col["step"].astype("int64"), col["value"]))).astype(float)
        return df

    @property
    def eval_names(self) -> list[str]:
        """Every metric an evaluation has recorded (val_loss, val_acc, then the others in order seen)."""
        return ["val_loss", "val_acc", *self.extra_evals]

    def layer_history(self) -> pd.DataFrame:
        df = self.layers.frame()
        df["step"] = df["step"].astype("int64")
        df["layer"] = [self.param_names[int(i)] for i in df["layer"]]
        return df

    def layer_columns(self, columns: Sequence[str] = LAYER_COLUMNS) -> dict[str, np.ndarray]:
        return self.layers.tail(len(self.layers), columns)

    def events(self) -> pd.DataFrame:
        with self._events_lock:
            rows = list(self._events)
        return pd.DataFrame(rows, columns=["time", "step", "kind", "source", "data"])

    @property
    def event_count(self) -> int:
        return len(self._events)

    def event_list(self, start: int = 0) -> list[dict[str, Any]]:
        with self._events_lock:
            return self._events[start:]

    def series(self, y: str, n_out: int = 2000) -> tuple[np.ndarray, np.ndarray]:
        if y in self.extra_evals:
            return self.extra_evals[y].series("value", "step", n_out)
        store = self.evals_store if y in EVAL_COLUMNS and y != "time" else self.steps   # time: the steps' clock
        return store.series(y, "step", n_out)

    # ------------------------------------------------------------------ resume
    def load(self, db: RunDB) -> list[float]:
        """Fill the stores and the event list from the run's SQLite file (after resume or fork); returns the
        run's first train losses (the baseline the detectors compare with)."""
        steps = db.read_steps()
        first: list[float] = []
        if not steps.empty:
            first = [float(v) for v in steps["train_loss"].to_numpy(dtype=float)[:10]]
            steps = steps.copy()
            steps["precision"] = steps["precision"].map(PRECISION_CODES).fillna(0)
            self.steps.extend({c: steps[c].to_numpy(dtype=float) for c in STEP_COLUMNS})
        evals = db.read_evals()
        if not evals.empty:
            self.evals_store.extend({c: evals[c].to_numpy(dtype=float) for c in EVAL_COLUMNS})
            last = evals.iloc[-1]
            self.last_eval = {"step": int(last["step"]), "val_loss": float(last["val_loss"]),
                              "val_acc": float(last["val_acc"]) if pd.notna(last["val_acc"]) else float("nan")}
        extra = db.read_eval_metrics()
        for name in extra.columns.drop("step"):
            col = extra[["step", name]].dropna()
            self.extra_evals[name] = store = SeriesStore(("step", "value"))
            store.extend({"step": col["step"].to_numpy(float), "value": col[name].to_numpy(float)})
            if self.last_eval and len(col) and int(col["step"].iloc[-1]) == self.last_eval["step"]:
                self.last_eval[name] = float(col[name].iloc[-1])
        layers = db.read_layers()
        if not layers.empty:
            index = {n: i for i, n in enumerate(self.param_names)}
            layers = layers[layers["layer"].isin(index)]
            self.layers.extend({"step": layers["step"].to_numpy(float),
                                "layer": layers["layer"].map(index).to_numpy(float),
                                "grad_norm": layers["grad_norm"].to_numpy(float),
                                "param_norm": layers["param_norm"].to_numpy(float),
                                "update_ratio": layers["update_ratio"].to_numpy(float)})
        events = db.read_events()
        with self._events_lock:
            self._events = [{k: r[k] for k in ("time", "step", "kind", "source", "data")}
                            for r in events.to_dict("records")]
        return first
