"""A run seen from its directory: read what another process (a CLI run, a notebook) records, and steer it
through the run's control inbox.

``RunView(run_dir)`` is the remote implementation of the run handle (workbench.handle): the read side of the
Trainer's API (snapshot, series, history, evals, layer_history, events, checkpoints, alerts) and its
requests (set, command, dismiss, apply_action), which the run's trainer checks and applies at a step
boundary. Reads are incremental: each table is fetched from the row after the last one seen, so watching a
long run stays cheap; a run resumed in place (its later rows rewritten) is read again from the start.
"""
from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import yaml

from .chartdata import RATE_COLUMNS, RATE_TAIL, samples_per_s
from .diagnosis.alert import health_of
from .metrics import SeriesStore, downsample
from .requests import ENDED, RunFacts, make_request
from .runlog import PRECISION_CODES, wall_clock
from . import cost
from .rundir import DB_NAME, RunDB

STEP_SERIES = ("step", "epoch", "train_loss", "lr", "batch_size", "precision", "grad_norm", "samples_per_s", "time")


class RunView:
    """Read a run directory (possibly being written by another process) and post requests to it.
    Thread-safe: one view may serve every session of a dashboard."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        db = self.run_dir / DB_NAME
        if not db.exists():
            raise FileNotFoundError(f"run_dir: {self.run_dir} has no run.db; allowed: a run directory made by "
                                    f"the workbench (see `workbench runs`)")
        self._db = RunDB(db, readonly=True)
        self._inbox_db: RunDB | None = None
        self._lock = threading.RLock()
        self._meta: dict[str, Any] = {}
        self._reset()

    def _reset(self) -> None:
        self._steps = SeriesStore(STEP_SERIES)
        self._last_step: int | None = None
        self._evals = self._db.read_evals(since_step=-1).iloc[0:0]
        self._layers = self._db.read_layers(since_step=-1).iloc[0:0]
        self._events = self._db.read_events(since_id=-1).iloc[0:0]
        self._generation = _resume_mark(self._db.meta())

    # ------------------------------------------------------------------ reading
    def refresh(self) -> int:
        """Fetch what was logged since the last refresh (metadata, steps, evals, layers, events); returns how
        many step rows arrived."""
        with self._lock:
            self._pull_meta()
            self._pull_evals()
            self._pull_layers()
            self._pull_events()
            return self._pull_steps()

    def _pull_meta(self) -> dict[str, Any]:
        meta = self._db.meta()
        if _resume_mark(meta) != self._generation:  # resumed in place: rows after its checkpoint were rewritten
            self._reset()
        self._meta = meta
        return meta

    def _pull_steps(self) -> int:
        new = self._db.read_steps(since_step=self._last_step)
        if new.empty:
            return 0
        new = new.assign(precision=new["precision"].map(PRECISION_CODES))   # as a Trainer's series: codes
        self._steps.extend({c: new[c].to_numpy(dtype=float) for c in STEP_SERIES})
        self._last_step = int(new["step"].iloc[-1])
        return len(new)

    def _pull_evals(self) -> None:
        last = int(self._evals["step"].iloc[-1]) if len(self._evals) else None
        self._evals = _grow(self._evals, self._db.read_evals(since_step=last))

    def _pull_layers(self) -> None:
        last = int(self._layers["step"].iloc[-1]) if len(self._layers) else None
        self._layers = _grow(self._layers, self._db.read_layers(since_step=last))

    def _pull_events(self) -> None:
        last = int(self._events["id"].iloc[-1]) if len(self._events) else None
        self._events = _grow(self._events, self._db.read_events(since_id=last))

    @property
    def meta(self) -> dict[str, Any]:
        """The run's metadata (status, controls in force, pid of its trainer, lineage, ...)."""
        with self._lock:
            return dict(self._pull_meta())

    @property
    def status(self) -> str:
        return str(self.meta.get("status", "unknown"))

    @property
    def config(self) -> dict[str, Any]:
        """The run's config.yaml as a dict (empty when missing)."""
        return read_config(self.run_dir) or {}

    @property
    def history(self) -> pd.DataFrame:
        return self._db.read_steps()

    @property
    def evals(self) -> pd.DataFrame:
        """step, val_loss, val_acc, time, then one column per other metric (as ``Trainer.evals``)."""
        with self._lock:
            self._pull_evals()
            df = self._evals.copy()
            extra = self._extra_evals()
        if len(extra.columns) > 1:
            df = df.merge(extra, on="step", how="left")
        df["time"] = wall_clock(df["time"])
        return df

    def _extra_evals(self) -> pd.DataFrame:
        """The other eval metrics, read again only when an evaluation arrived that they do not hold yet (a view
        asks for them once per series it draws; the recorder writes them just after the eval's row)."""
        cached = getattr(self, "_extra", None)
        newest = int(self._evals["step"].iloc[-1]) if len(self._evals) else None
        if cached is None or (newest is not None and newest not in set(cached[1]["step"].astype(int))
                              and (cached[0] != len(self._evals) or len(cached[1].columns) > 1)):
            self._extra = cached = (len(self._evals), self._db.read_eval_metrics())
        return cached[1]

    @property
    def fixed_controls(self) -> dict[str, str]:
        """Controls this run cannot change, with the reason (as ``Trainer.fixed_controls``)."""
        return dict(self.meta.get("fixed_controls") or {})

    @property
    def eval_names(self) -> list[str]:
        """Every metric the run's evaluations record (val_loss, val_acc, then the others)."""
        return [c for c in self.evals.columns if c.startswith("val_")]

    @property
    def layer_history(self) -> pd.DataFrame:
        with self._lock:
            self._pull_layers()
            return self._layers

    @property
    def events(self) -> pd.DataFrame:
        with self._lock:
            self._pull_events()
            return self._events

    @property
    def checkpoints(self) -> pd.DataFrame:
        return self._db.read_checkpoints()

    @property
    def alerts(self) -> list[dict[str, Any]]:
        """The run's alerts (as plain dicts, from the event log; see :func:`alerts_in`)."""
        return alerts_in(self.events)

    def alert_list(self) -> list[dict[str, Any]]:
        """Every alert, newest first, each with ``open`` (not dismissed, and no ``alert_closed`` event yet)."""
        return newest_first(dict(a, open=not a["dismissed"] and a.get("closed_step") is None) for a in self.alerts)

    def health(self) -> dict[str, Any]:
        """The run's health in one word (from its open alerts) and a one-line summary."""
        alerts = self.alert_list()
        return {"health": health_of(a["severity"] for a in alerts if a["open"]),
                "summary": f"{len(alerts)} alert(s) in the run's event log."}

    def series(self, y: str, n_out: int = 2000) -> tuple[np.ndarray, np.ndarray]:
        """Downsampled (step, value) of a step column or an eval column (val_loss, val_acc)."""
        if y.startswith("val_"):
            ev = self.evals
            return downsample(ev["step"].to_numpy(float), ev[y].to_numpy(float), n_out) if y in ev and not ev.empty \
                else (np.array([]), np.array([]))
        with self._lock:
            self._pull_steps()
            return self._steps.series(y, "step", n_out)

    def snapshot(self) -> dict[str, Any]:
        """Status line data, in the shape of ``Trainer.snapshot()``."""
        with self._lock:
            meta = self._pull_meta()
            self._pull_steps()
            last = self._steps.last() or {}
            rate = samples_per_s(self._steps.tail(RATE_TAIL, RATE_COLUMNS), meta.get("status", "unknown"))
            ev = self.evals
        epoch = last.get("epoch", 0) or 0
        c, world = meta.get("controls") or {}, int(meta.get("world_size", 1) or 1)
        last_eval = {} if ev.empty else {"step": int(ev["step"].iloc[-1]),
                                         **{c: float(ev[c].iloc[-1]) for c in ev.columns if c.startswith("val_")}}
        return {"status": meta.get("status", "unknown"), "step": int(last.get("step", 0) or 0),
                "epoch": int(epoch) if math.isfinite(epoch) else 0,
                "train_loss": last.get("train_loss"), "lr": last.get("lr"), "samples_per_s": rate,
                "total_steps": meta.get("total_steps"), "controls": meta.get("controls", {}),
                "last_eval": last_eval, "run_dir": str(self.run_dir), "world_size": world,
                **cost.projection(rate, int(last.get("step", 0) or 0), meta.get("total_steps"),
                                  int(c.get("batch_size", 1) or 1) * int(c.get("accumulate", 1) or 1) * world,
                                  meta.get("flops_per_sample"))}

    @property
    def lineage(self) -> dict[str, Any]:
        m = self.meta
        return {k: m[k] for k in ("parent_run", "parent_step", "parent_checkpoint") if k in m}

    # ------------------------------------------------------------------ steering (through the inbox)
    def ask(self, action: str, args: Mapping[str, Any] | None = None, source: str = "dashboard") -> int:
        """Check a request with what the run directory tells (workbench.requests) and post it to the run's
        inbox; returns the request id. The trainer checks the rest (the device's precisions, that an alert
        exists) when it picks the request up, and a refusal comes back with its reason."""
        meta = self.meta
        if meta.get("status") in ENDED:  # no trainer will ever pick the request up
            raise RuntimeError(f"the run has ended (status {meta['status']}); fork it from a checkpoint to continue "
                               f"with other controls")
        fixed = (meta.get("fixed_controls") or {}).get("batch_size")
        req = make_request(action, args, RunFacts(n_train=meta.get("n_train"), fixed=fixed), source)
        with self._lock:
            if self._inbox_db is None:
                self._inbox_db = RunDB(self.run_dir / DB_NAME)
            return self._inbox_db.post_control(req.args, source=req.source, action=req.action)

    def set(self, source: str = "dashboard", **controls: Any) -> int:
        """Post a change of live controls (``Trainer.set``); returns the request id."""
        return self.ask("set", controls, source)

    def command(self, action: str, source: str = "dashboard", **args: Any) -> int:
        """Post pause, resume, step (n=), stop or checkpoint (tag=); returns the request id."""
        return self.ask(action, args, source)

    def dismiss(self, alert_id: int, source: str = "dashboard") -> int:
        """Post: mark alert ``alert_id`` a false alarm (``Trainer.dismiss``); returns the request id."""
        return self.ask("dismiss", {"alert": alert_id}, source)

    def apply_action(self, alert_id: int, index: int = 0, source: str = "dashboard") -> int:
        """Post: apply suggested action ``index`` of alert ``alert_id``, a rollback included
        (``Trainer.apply_action``); the trainer checks that both exist. Returns the request id."""
        return self.ask("alert_action", {"alert": alert_id, "index": index}, source)

    def request(self, request_id: int) -> dict[str, Any]:
        """The request's outcome so far: status pending, applied (with step) or refused (with message)."""
        return self._db.control(request_id)

    def wait(self, request_id: int, timeout: float = 10.0) -> dict[str, Any]:
        return self._db.wait_control(request_id, timeout)

    def close(self) -> None:
        self._db.close()
        if self._inbox_db is not None:
            self._inbox_db.close()


def alerts_in(events: pd.DataFrame) -> list[dict[str, Any]]:
    """The alerts of an event log (as dicts), each ``dismissed`` when a later dismiss event names it, with the
    newest evidence of its ``alert_update`` events and the ``closed_step`` of its ``alert_closed`` one."""
    if events.empty:
        return []
    dismissed = {int(d.get("alert", -1)) for d in events.loc[events["kind"] == "dismiss", "data"]}
    later: dict[int, dict[str, Any]] = {}
    for d in events.loc[events["kind"].isin(["alert_update", "alert_closed"]), "data"]:
        later.setdefault(int(d.get("alert", -1)), {}).update(
            {k: d[k] for k in ("severity", "message", "evidence", "last_step", "updates", "closed_step", "actions")
             if k in d})
    return [dict(d, **later.get(int(d.get("id", -1)), {}),
                 dismissed=bool(d.get("dismissed")) or int(d.get("id", -1)) in dismissed)
            for d in events.loc[events["kind"] == "alert", "data"]]


def newest_first(alerts: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Alerts as dicts, the newest (latest step, then highest id) first."""
    return sorted(alerts, key=lambda a: (a.get("step", 0), a.get("id", 0)), reverse=True)


def read_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A run directory's config.yaml (it also holds the resolved seed, device and library versions); None when
    the file is missing."""
    path = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else None


def _resume_mark(meta: Mapping[str, Any]) -> tuple:
    """Changes when the run is resumed in place (rows after the checkpoint are rewritten)."""
    return meta.get("resumed_from"), meta.get("resumed_at"), meta.get("started")


def _grow(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    if not len(new):
        return old
    return new if old.empty else pd.concat([old, new], ignore_index=True)
