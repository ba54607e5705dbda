"""The Trainer: the one facade every view uses.

It owns a background thread that runs the loop below; everything else (views, scripts, hooks,
other processes through the run directory) talks to it by posting requests that the loop applies
between two optimizer steps. In causal order, one turn of the loop is::

    boundary   apply queued requests (controls, pause/step/stop, checkpoint); wait while paused
    fetch      next index batch(es) from the resumable sampler -> (x, y) on the device
    step       train_step(): forward/backward per micro-batch, unscale, grad norm, clip, step, zero
    record     queue the step's device tensors; read them back every ``sync_every`` steps
    evaluate   every ``eval_every`` steps: val loss/acc, plateau schedule, early stopping, best-k
    checkpoint every ``checkpoint_every`` steps (copied on this thread, written on another)
"""
from __future__ import annotations

import atexit
import copy
import math
import os
import random
import statistics
import threading
import time
import traceback
import warnings
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, TensorDataset

from . import checkpoint as ck
from . import ckptproc, cputhreads, pacing
from .config import TrainConfig, check_int
from .controls import (CONTROL_NAMES, SOURCES, Controls, Request, check_source, precision_problem, resolve_precision,
                       same_value, validate_controls)
from .data import load_dataset
from .diagnosis import ActivationProbe, Alert, Diagnoser, Signals, default_detectors
from .hooks import HookContext, HookHandle, HookRegistry, frozen
from .metrics import SeriesStore
from .models import build_model
from .recorder import Recorder
from .rundir import RunDB, TBWriter, new_run_dir
from .sampler import BatchFetcher, EpochSampler
from .schedules import Schedule
from .step import AMP_DTYPES, evaluate, train_step

DIAGNOSIS_TICK = 10         # detectors' schedules are multiples of this many steps (fewer ticks: less
                            # Python between steps; NaN/inf still triggers divergence at once)
DIAGNOSIS_WINDOW = 2000     # history rows detectors see
ROLLBACK_KEYS = ("model", "optimizer", "schedule", "scaler", "rng", "early_stopping")
STATUSES = ("idle", "running", "paused", "stopped", "finished", "failed")
PRECISION_CODES = {"fp32": 0, "bf16": 1, "fp16": 2}
PRECISION_NAMES = {v: k for k, v in PRECISION_CODES.items()}
STEP_COLUMNS = ("step", "epoch", "train_loss", "lr", "batch_size", "precision", "grad_norm", "samples_per_s",
                "time")
EVAL_COLUMNS = ("step", "val_loss", "val_acc", "time")
LAYER_COLUMNS = ("step", "layer", "grad_norm", "param_norm", "update_ratio")
AUTO_TAGS = ("periodic", "stopped", "finished", "best")  # checkpoints that retention may delete


class TrainingFailed(RuntimeError):
    """Raised by ``join()`` when user code (model, loss, data) raised on the trainer thread."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else mps, else cpu; an unavailable device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device: got {name!r}, but no such CUDA device is available here; allowed: auto, cpu"
                         + (", cuda" if torch.cuda.is_available() else ""))
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device: got {name!r}, but MPS is not available here; allowed: auto, cpu")
    return dev


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EarlyStopping:
    """Patience on a monitored eval metric; also remembers the best value (for best-k checkpoints)."""

    def __init__(self, patience: int | None, mode: str, min_delta: float) -> None:
        self.patience, self.mode, self.min_delta = patience, mode, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.wait = 0

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def update(self, value: float, step: int) -> bool:
        """Record an eval value; True when patience has run out."""
        if self.improved(value):
            self.best, self.best_step, self.wait = value, step, 0
            return False
        self.wait += 1
        return self.patience is not None and self.wait >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "wait": self.wait}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_step, self.wait = state["best"], state["best_step"], int(state["wait"])


class ScalerHolder:
    """The GradScaler in force; a new enabled one is made when precision switches to fp16."""

    def __init__(self, device_type: str, precision: str) -> None:
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")

    def use(self, precision: str) -> None:
        if precision == "fp16" and not self.scaler.is_enabled():
            self.scaler = torch.amp.GradScaler(self.device_type)

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.scaler.is_enabled(), "state": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=bool(state["enabled"]))
        if state["enabled"] and state["state"]:
            self.scaler.load_state_dict(state["state"])


def _build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Trainer:
    """Train a model in a background thread and steer it while it runs.

    ``Trainer(cfg)`` trains the built-in data set and model the config names;
    ``Trainer(cfg, model=..., train_data=..., val_data=..., loss_fn=...)`` trains your own ``nn.Module``
    on any map-style ``Dataset`` yielding (input, target) pairs. ``cfg`` may be a ``TrainConfig``, a
    mapping, a YAML path or None; keyword ``overrides`` replace config fields.
    """

    def __init__(self, cfg: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None, *,
                 model: torch.nn.Module | None = None, train_data: Dataset | None = None,
                 val_data: Dataset | None = None, loss_fn: Callable | None = None, task: str | None = None,
                 _resuming: bool = False, **overrides: Any) -> None:
        if isinstance(model, str):  # Trainer(model="mlp", ...) names a built-in model, like the config field
            overrides["model"], model = model, None
        cfg = _as_config(cfg, overrides)
        if cfg.seed is None:
            cfg = cfg.replace(seed=random.SystemRandom().randrange(2**31))
        self.device = resolve_device(cfg.device)
        precision = resolve_precision(self.device, cfg.precision)
        problem = precision_problem(self.device, precision)
        if problem:
            raise ValueError(f"precision: got {cfg.precision!r}, which this device cannot run ({problem})")
        seed_everything(cfg.seed)

        # ---- data
        self.data_info: dict[str, Any] = {}
        if train_data is None:
            if cfg.dataset is None:
                raise ValueError("dataset: none given and no train_data passed; name a built-in data set "
                                 "(digits, breast_cancer, wine, moons, spirals, regression, csv:PATH) or pass train_data")
            bundle = load_dataset(cfg.dataset, seed=cfg.seed, val_fraction=cfg.val_fraction,
                                  normalize=cfg.normalize, **cfg.dataset_options)
            train_data, val_data = bundle.train, bundle.val
            task = bundle.task
            self.data_info = {"dataset": bundle.name, "n_features": bundle.n_features, "n_classes": bundle.n_classes,
                              "class_names": bundle.class_names}
            out_features = bundle.n_classes if bundle.task == "classification" else 1
        else:
            task = task or _infer_task(loss_fn, train_data, cfg.loss)
            out_features = None
        if task not in ("classification", "regression"):
            raise ValueError(f"task: got {task!r}; allowed: classification, regression")
        self.task = task
        self.train_data, self.val_data = train_data, val_data
        if cfg.batch_size > len(train_data):
            raise ValueError(f"batch_size: got {cfg.batch_size}; allowed: 1 to {len(train_data)} (the training "
                             f"set's size)")

        # ---- model and loss
        self._own_model = model is None
        if model is None:
            if cfg.model is None:
                raise ValueError("model: none given and no model passed; name a built-in model (mlp, cnn, logreg) "
                                 "or pass model=")
            torch.manual_seed(cfg.seed)
            model = build_model(cfg.model, in_features=self.data_info["n_features"], out_features=out_features,
                                **cfg.model_options)
        self.model = model.to(self.device)
        if loss_fn is None:
            loss_name = cfg.loss if cfg.loss != "auto" else ("cross_entropy" if task == "classification" else "mse")
            loss_fn = torch.nn.CrossEntropyLoss() if loss_name == "cross_entropy" else torch.nn.MSELoss()
        self.loss_fn = loss_fn
        self.cfg = cfg

        # ---- run directory
        if cfg.run_dir:
            run_dir = Path(cfg.run_dir)
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / "tb").mkdir(exist_ok=True)
        else:
            run_dir = new_run_dir(cfg.runs_root, cfg.name)
            self.cfg = cfg = cfg.replace(run_dir=str(run_dir))
        self.run_dir = run_dir
        self.checkpoint_dir = run_dir / "checkpoints"
        ck.remove_stale_temps(self.checkpoint_dir)
        cfg.to_yaml(run_dir / "config.yaml", extra={"seed": cfg.seed, "device": str(self.device),
                                                     "precision": precision, "versions": ck.library_versions()})
        self._db = RunDB(run_dir / "run.db")
        existing = None if _resuming else self._db.last_step()
        if existing is not None:
            self._db.close()
            raise ValueError(f"run_dir: {run_dir} already holds a run (up to step {existing}); "
                             f"allowed: a new folder, or Trainer.from_checkpoint({str(run_dir)!r}) to continue it")

        # ---- state components (each has state_dict/load_state_dict; the checkpoint registers them all)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = _build_optimizer(cfg, self._params)
        self.controls = Controls(lr=cfg.lr, batch_size=cfg.batch_size, precision=precision,
                                 grad_clip=cfg.grad_clip, accumulate=cfg.accumulate, weight_decay=cfg.weight_decay)
        self.schedule = Schedule(cfg.schedule, cfg.schedule_options, self._planned_steps(), cfg.monitor_mode)
        self._scaler = ScalerHolder(self.device.type, precision)
        self.sampler = EpochSampler(len(train_data), cfg.seed)
        self._early = EarlyStopping(cfg.early_stopping_patience, cfg.monitor_mode, cfg.min_delta)
        self._diagnoser = Diagnoser(default_detectors(cfg.diagnosis_options))
        self._stateful: dict[str, Any] = {
            "model": self.model, "optimizer": self.optimizer, "schedule": self.schedule, "scaler": self._scaler,
            "controls": self.controls, "sampler": self.sampler, "rng": ck.RNGState(),
            "early_stopping": self._early, "detectors": self._diagnoser}
        assert tuple(self._stateful) == ck.STATE_KEYS
        self._fetch = BatchFetcher(train_data, self.device)
        self._val_fetch = BatchFetcher(val_data, self.device) if val_data is not None and len(val_data) else None
        self._base_batch_size = cfg.batch_size

        # ---- progress, metrics, events
        self.step_count = 0            # optimizer steps completed
        self._status = "idle"
        self._store = SeriesStore(STEP_COLUMNS)
        self._eval_store = SeriesStore(EVAL_COLUMNS)
        self._layer_store = SeriesStore(LAYER_COLUMNS)
        self._events: list[dict[str, Any]] = []
        self._events_lock = threading.Lock()
        self._initial_losses: list[float] = []   # the first steps' losses: the baseline detectors compare with
        self._alarm_loss = math.inf               # a loss above this runs the divergence detector at once
        self._latest_layers: dict[str, Any] | None = None
        self._urgent = False                      # a non-finite value arrived: check divergence now
        self._good_states: deque[tuple[int, dict]] = deque(maxlen=cfg.good_states)
        self._rollbacks = 0
        self._probe: ActivationProbe | None = None
        self.last_eval: dict[str, float] = {}
        self._pending: list[tuple] = []   # steps whose device values are not read back yet
        self._sync_every = 1 if self.device.type == "cpu" else cfg.sync_every
        self._hooks = HookRegistry(self._hook_failed)
        self._recorder = Recorder(self._db, TBWriter(run_dir / "tb") if cfg.tensorboard else None,
                                  on_inbox=self._inbox_request, on_error=self._recorder_failed,
                                  pacer=pacing.default_pacer())
        self._writer = self._make_writer(cfg.checkpoint_writer)
        if cfg.checkpoint_every:
            self._writer.start()  # a writer process imports torch (~1 s): started now, it is ready for the first save
        self._config_dict: tuple[TrainConfig | None, dict] = (None, {})  # (cfg, cfg.to_dict()) for saves
        self._versions = ck.library_versions()  # for saves, shared by them (never changed)
        self._layer_scratch: list[torch.Tensor] = []  # pre-step parameter copy for layer stats, reused
        self._eval_cache: tuple[int, dict[str, np.ndarray]] | None = None  # (evals stored, their tail)
        self._n_params = sum(p.numel() for p in self._params)
        self._default_threads: int | None = None  # the intra-op count of the thread that started the run

        # ---- the thread and its requests
        self._requests: deque[Request] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._paused = False
        self._steps_allowed = 0
        self._step_requests: list[Request] = []
        self._stop_request: Request | None = None
        self._error: BaseException | None = None
        self.traceback: str | None = None
        self._last_time: float | None = None
        self._lineage: dict[str, Any] = {}

        if "started" not in self._db.meta():
            self._db.set_meta(started=time.time())
        self._db.set_meta(n_train=len(train_data), total_steps=self._planned_steps(),
                          controls=self.controls.state_dict())
        self._db.set_meta(status="idle", dataset=cfg.dataset, model=cfg.model,
                          seed=cfg.seed, device=str(self.device), task=task, pid=os.getpid(),
                          layer_names=self._param_names)

    # ================================================================= public API: lifecycle
    @property
    def status(self) -> str:
        """idle, running, paused, stopped, finished or failed."""
        return self._status

    @property
    def epoch(self) -> int:
        """Index of the epoch the next step draws from (0-based)."""
        return self.sampler.epoch + (1 if self.sampler.epoch_done else 0)

    def start(self, paused: bool = False) -> "Trainer":
        """Start the loop in a background thread and return at once."""
        if self._thread is not None:
            raise RuntimeError(f"start: this run was already started (status {self._status}); use resume() "
                               f"to continue a paused run, or Trainer.from_checkpoint / fork for a new one")
        self._paused = paused
        self._default_threads = torch.get_num_threads()  # the caller's count: what its own loop would use
        self._recorder.start()
        self._writer.start()
        self._hand_over()
        self._thread = threading.Thread(target=self._run, name="workbench-trainer", daemon=True)
        _LIVE.add(self)
        self._thread.start()
        return self

    def pause(self, source: str = "api") -> Request:
        """Pause at the next step boundary."""
        return self._post(Request("pause", source=check_source(source)))

    def resume(self, source: str = "api") -> Request:
        """Continue a paused run."""
        self._hand_over()
        return self._post(Request("resume", source=check_source(source)))

    def step(self, n: int = 1, source: str = "api") -> Request:
        """While paused, run exactly ``n`` optimizer steps, then pause again (``.wait()`` until done)."""
        n = check_int("n", n, minimum=1)
        self._hand_over()
        return self._post(Request("step", n=n, source=check_source(source)))

    def stop(self, source: str = "api") -> Request:
        """Finish the current step, save a checkpoint and end the run cleanly (status stopped)."""
        return self._post(Request("stop", source=check_source(source)))

    def join(self, timeout: float | None = None) -> str:
        """Wait for the thread to end (or ``timeout``); re-raise a failure from user code. Returns the status."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self._error is not None:
            raise TrainingFailed(f"training failed at step {self.step_count + 1}: "
                                 f"{type(self._error).__name__}: {self._error}\n{self.traceback}") from self._error
        return self._status

    def run(self) -> "Trainer":
        """Start and wait until the run ends (a blocking convenience for scripts)."""
        self.start()
        self.join()
        return self

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ================================================================= public API: controls
    def set(self, source: str = "api", **controls: Any) -> Request:
        """Change live controls (lr, batch_size, precision, grad_clip, accumulate, weight_decay).

        Validated now, in the caller's thread (ValueError/TypeError naming the field and what is
        allowed); applied by the trainer at the next optimizer-step boundary. ``lr`` sets the base
        (peak) LR of the schedule from that step on. Returns a Request; ``.wait()`` blocks until applied.
        """
        clean = validate_controls(controls, n_train=len(self.train_data), device=self.device)
        if self._status in ("finished", "stopped", "failed"):
            raise RuntimeError(f"set: the run has ended (status {self._status}); fork() it to continue with "
                               f"other controls")
        self._hand_over()
        return self._post(Request("set", controls=clean, source=check_source(source)))

    def save_checkpoint(self, tag: str | None = None, source: str = "api", timeout: float | None = 60.0) -> Path:
        """Save a checkpoint now (at the next boundary when running) and return its path."""
        if tag is not None:
            ck.checkpoint_name(0, tag)  # validates the tag here, in the caller's thread
        if self.is_alive:
            req = self._post(Request("checkpoint", tag=tag, source=check_source(source))).wait(timeout)
            if req.status != "applied":
                raise RuntimeError(f"save_checkpoint: {req.message or 'not saved in time'}")
            self._writer.wait()
            return req.result
        path = self._save_checkpoint(tag=tag or "manual", reason="manual", source=source)
        self._writer.wait()
        self._recorder.flush()
        return path

    def on(self, event: str, fn: Callable[[HookContext], Any]) -> HookHandle:
        """Call ``fn(context)`` on the trainer thread at ``event``: step_end, eval_end, checkpoint, alert, status."""
        return self._hooks.add(event, fn)

    # ================================================================= public API: diagnosis
    @property
    def alerts(self) -> list[Alert]:
        """Every alert raised in this run (dismissed ones included, marked so)."""
        return list(self._diagnoser.alerts)

    def diagnose(self) -> dict[str, Any]:
        """The open alerts plus a short health summary (healthy, warning or critical)."""
        summary = self._diagnoser.summary()
        current = self._diagnoser.current()
        if current:
            parts = [f"{a.kind} ({a.severity}, step {a.step})" for a in current]
            text = f"{len(current)} open alert(s): " + ", ".join(parts)
        else:
            text = f"No problems detected in {self.step_count} steps."
        return {**summary, "alerts": current, "summary": text}

    def dismiss(self, alert_id: int, source: str = "api") -> Request:
        """Mark an alert a false alarm; its detector backs off for the rest of this run (recorded)."""
        return self._post(self._dismiss_request(alert_id, check_source(source)))

    def apply_action(self, alert_id: int, index: int = 0, source: str = "api") -> Request:
        """Apply an alert's suggested action: its controls through ``set`` (after a rollback if it asks)."""
        action = self._alert_action(alert_id, index)
        if action.rollback:
            return self._post(self._rollback_request(action, check_source(source)))
        return self.set(source=source, **action.controls)

    def _dismiss_request(self, alert_id: int, source: str) -> Request:
        self._diagnoser.find(alert_id)  # validates the id now
        return Request("dismiss", n=int(alert_id), source=source)

    def _alert_action(self, alert_id: int, index: int) -> Any:
        """Suggested action ``index`` of alert ``alert_id``, once both exist and it can be applied."""
        alert = self._diagnoser.find(alert_id)
        if not 0 <= index < len(alert.actions):
            raise ValueError(f"index: got {index!r}; allowed: 0 to {len(alert.actions) - 1}")
        action = alert.actions[index]
        if not action.applicable:
            raise ValueError(f"action {action.label!r} is advice for the next run ({action.hint}); nothing to apply")
        return action

    def _rollback_request(self, action: Any, source: str) -> Request:
        controls = validate_controls(action.controls, n_train=len(self.train_data), device=self.device) \
            if action.controls else {}
        return Request("rollback", controls=controls, source=source)

    def lr_find(self, **options: Any) -> Any:
        """LR range test (Smith 2017, fastai's valley rule) on copies; see ``workbench.finders.lr_find``."""
        from .finders import lr_find

        return lr_find(self, **options)

    def find_batch_size(self, **options: Any) -> int:
        """Largest batch that fits (accelerate-style halving on OOM); see ``workbench.finders.find_batch_size``."""
        from .finders import find_batch_size

        return find_batch_size(self, **options)

    def panel(self, **options: Any) -> Any:
        from .notebook import panel
        return panel(self, **options)

    # ================================================================= public API: data views
    @property
    def history(self) -> pd.DataFrame:
        """One row per optimizer step: step, epoch, train_loss, lr, batch_size, precision, grad_norm, ..."""
        df = self._store.frame()
        for col in ("step", "epoch", "batch_size"):
            df[col] = df[col].astype("int64")
        df["precision"] = df["precision"].map(lambda c: PRECISION_NAMES.get(int(c), "?")).astype(str)
        return df

    @property
    def evals(self) -> pd.DataFrame:
        """One row per evaluation: step, val_loss, val_acc (NaN for regression), time."""
        df = self._eval_store.frame()
        df["step"] = df["step"].astype("int64")
        return df

    @property
    def layer_history(self) -> pd.DataFrame:
        """Per parameter tensor, every ``layer_every`` steps: grad norm, parameter norm, update/weight ratio."""
        df = self._layer_store.frame()
        df["step"] = df["step"].astype("int64")
        df["layer"] = [self._param_names[int(i)] for i in df["layer"]]
        return df

    @property
    def layer_names(self) -> list[str]:
        """The trained parameter tensors' names, in model order (``layer_columns``' layer index)."""
        return list(self._param_names)

    @property
    def layer_count(self) -> int:
        """How many per-layer rows have been recorded so far (one per parameter tensor every ``layer_every``
        steps); a poller re-reads ``layer_columns`` only when this moved."""
        return self._layer_store.appended

    def layer_columns(self, columns: Sequence[str] = LAYER_COLUMNS) -> dict[str, np.ndarray]:
        """The rows of ``layer_history`` as numeric arrays (``layer``: an index into ``layer_names``), without
        the DataFrame and the names: cheap enough to poll. Long runs are thinned as in ``layer_history``."""
        store = self._layer_store
        return store.tail(len(store), columns)

    @property
    def events(self) -> pd.DataFrame:
        """The event log: time, step, kind, source, data (changes, status, checkpoints, alerts, errors)."""
        with self._events_lock:
            rows = list(self._events)
        return pd.DataFrame(rows, columns=["time", "step", "kind", "source", "data"])

    @property
    def event_count(self) -> int:
        """How many entries the event log holds; a poller re-reads ``event_list`` only when this moved."""
        return len(self._events)

    def event_list(self, start: int = 0) -> list[dict[str, Any]]:
        """The event log from entry ``start`` on, as dicts (the rows of ``events``, without building a
        DataFrame: cheap to poll). Entries are never changed once logged; do not change them either."""
        with self._events_lock:
            return self._events[start:]

    @property
    def checkpoints(self) -> pd.DataFrame:
        """The checkpoint table (step, path, metric, tag, time) from the run's SQLite file."""
        return self._db.read_checkpoints()

    def series(self, y: str, n_out: int = 2000) -> tuple[np.ndarray, np.ndarray]:
        """A downsampled (step, value) series of a history column that keeps minima and maxima."""
        store = self._eval_store if y in EVAL_COLUMNS else self._store
        return store.series(y, "step", n_out)

    def snapshot(self) -> dict[str, Any]:
        """A small dict of the current state for status lines (safe to call from any thread)."""
        last = self._store.last() or {}
        total = self._planned_steps()
        return {"status": self._status, "step": self.step_count, "epoch": self.epoch,
                "train_loss": last.get("train_loss"), "samples_per_s": last.get("samples_per_s"),
                "total_steps": total, "controls": self.controls.state_dict(), "last_eval": dict(self.last_eval),
                "run_dir": str(self.run_dir)}

    # ================================================================= the loop (trainer thread)
    def _run(self) -> None:
        self._set_status("paused" if self._paused else "running", "api")
        if self.device.type == "cpu":
            self._choose_threads(log=True)
        reason, source = "finished", "api"
        try:
            if self.cfg.diagnose:
                for alert in self._diagnoser.preflight(self.train_data, self.val_data, self.task):
                    self._raise_alert(alert)
            while True:
                if not self._boundary():
                    reason, source = "stopped", self._stop_request.source if self._stop_request else "api"
                    break
                if self._done():
                    break
                self._one_step()
                if self._after_step():
                    break
            self._flush_pending()
            if reason == "finished" and self._val_fetch is not None and self._eval_store.last() is not None \
                    and int(self._eval_store.last()["step"]) != self.step_count:
                self._evaluate()
            self._save_checkpoint(tag=None, reason=reason, source=source)
            self._writer.wait()
            if self._stop_request is not None:
                self._stop_request.resolve("applied", self.step_count)
        except BaseException as e:  # noqa: BLE001 - user code may raise anything; it ends the run as failed
            self._error, self.traceback, reason = e, traceback.format_exc(), "failed"
            self._log_event("error", "trainer", {"error": f"{type(e).__name__}: {e}", "traceback": self.traceback})
        finally:
            try:
                self._writer.wait()
                self._writer.close()  # the host buffers kept for the next save (a later save makes new ones)
                self._flush_pending()
            except BaseException:  # noqa: BLE001 - already failing; keep the first error
                pass
            self._refuse_pending(f"the run ended ({reason})")
            if self.device.type == "cpu" and self._default_threads:
                torch.set_num_threads(self._default_threads)  # threads started later begin with this count
            self._set_status(reason, "trainer")
            self._recorder.close()

    def _hand_over(self) -> None:
        """Before the trainer thread runs torch work, the calling thread gives back its idle OpenMP
        workers: two OpenMP teams on few cores make libgomp stop spinning, and every parallel region
        then pays a futex wake-up (workbench.cputhreads, bench/RESULTS.md). CPU runs only."""
        if self.device.type == "cpu" and threading.current_thread() is not self._thread:
            cputhreads.release_idle_workers()

    def _choose_threads(self, log: bool = False) -> None:
        """Set this (trainer) thread's intra-op thread count for the current batch size; a ``cpu_threads``
        event says which and why (always with ``log``, else when the count changed).

        ``torch.set_num_threads`` here changes this thread's count, not the caller's; but threads started
        later begin with the count last set anywhere, so it is always set here (an earlier run may
        have left 1), and set back to the caller's when the run ends."""
        before = torch.get_num_threads()
        n, why = cputhreads.choose_threads(self.cfg.cpu_threads, self._n_params, self.controls.batch_size,
                                           self._default_threads or before)
        torch.set_num_threads(n)
        if log or n != before:
            self._log_event("cpu_threads", "trainer", {**cputhreads.describe(), "why": why})

    def _done(self) -> bool:
        cfg = self.cfg
        if cfg.max_steps is not None and self.step_count >= cfg.max_steps:
            return True
        return cfg.max_epochs is not None and self.sampler.epoch_done and self.sampler.epoch + 1 >= cfg.max_epochs

    def _one_step(self) -> None:
        """Fetch the step's micro-batches, run train_step, queue its values for read-back."""
        c = self.controls
        lr = c.lr * self.schedule.factor(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        epoch = self.sampler.epoch if not self.sampler.epoch_done else self.sampler.epoch + 1
        micro, ids = [], []
        for _ in range(c.accumulate):
            idx = self.sampler.next_indices(c.batch_size)
            ids.append(idx)
            micro.append(self._fetch.fetch(idx))
            if self.sampler.epoch_done:
                break  # one optimizer step never crosses an epoch boundary
        layer_stats = self.cfg.layer_every > 0 and (self.step_count + 1) % self.cfg.layer_every == 0
        result = train_step(self.model, self.optimizer, self.loss_fn, micro, params=self._params,
                            device_type=self.device.type, amp_dtype=AMP_DTYPES[c.precision],
                            scaler=self._scaler.scaler, grad_clip=c.grad_clip, layer_stats=layer_stats,
                            scratch=self._layer_scratch)
        self.step_count += 1
        now = time.perf_counter()
        sps = result.samples / (now - self._last_time) if self._last_time is not None else float("nan")
        self._last_time = now
        self._pending.append((self.step_count, epoch, result.loss, result.grad_norm, lr, c.batch_size,
                              PRECISION_CODES[c.precision], sps, time.time()))
        if layer_stats:
            self._record_layers(result)
        if len(self._pending) >= self._sync_every:
            self._flush_pending()
        if self._hooks.has("step_end"):
            sample_ids = tuple(torch.cat(ids).tolist())
            self._flush_pending()
            self._hooks.fire("step_end", lambda: self._context("step_end", self._store.last() or {},
                                                               sample_ids=sample_ids))

    def _flush_pending(self) -> None:
        """Read back the queued steps' losses and grad norms in one transfer, and store the rows."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if self.device.type == "cpu":  # no transfer to batch: two scalar reads are cheaper than two stacks
            values = [(p[2].item(), p[3].item()) for p in pending]
        else:
            values = torch.stack([torch.stack([p[2].float(), p[3].float()]) for p in pending]).tolist()
        for p, (loss, gn) in zip(pending, values):
            if len(self._initial_losses) < 10 and math.isfinite(loss):
                self._initial_losses.append(loss)
                self._alarm_loss = self._divergence_alarm()
            if not (math.isfinite(loss) and (math.isfinite(gn) or p[6] == PRECISION_CODES["fp16"])) \
                    or loss > self._alarm_loss:
                self._urgent = True
            self._store.append_values((p[0], p[1], loss, p[4], p[5], p[6], gn, p[7], p[8]))  # STEP_COLUMNS order
            self._recorder.steps.append({"step": p[0], "epoch": p[1], "train_loss": loss, "lr": p[4],
                                         "batch_size": p[5], "precision": PRECISION_NAMES[p[6]], "grad_norm": gn,
                                         "samples_per_s": p[7], "time": p[8]})

    def _record_layers(self, r: Any) -> None:
        stats = torch.stack([torch.stack(r.layer_grad_norms), torch.stack(r.layer_param_norms),
                             torch.stack(r.layer_update_norms)]).float().tolist()
        g, pn, u = (np.asarray(v) for v in stats)
        with np.errstate(all="ignore"):
            ratio = np.where(pn > 0, u / pn, np.nan)
        self._latest_layers = {"step": self.step_count, "name": np.asarray(self._param_names),
                               "grad_norm": g, "param_norm": pn, "update_ratio": ratio,
                               "is_matrix": np.asarray([p.dim() >= 2 for p in self._params])}
        for i, name in enumerate(self._param_names):
            g, p, u = stats[0][i], stats[1][i], stats[2][i]
            ratio = u / p if p > 0 else float("nan")
            self._layer_store.append({"step": self.step_count, "layer": i, "grad_norm": g, "param_norm": p,
                                      "update_ratio": ratio})
            self._recorder.layers.append({"step": self.step_count, "layer": name, "grad_norm": g, "param_norm": p,
                                          "update_ratio": ratio})

    def _after_step(self) -> bool:
        """Evaluation, early stopping and periodic checkpoints; True when the run should finish now."""
        cfg, step = self.cfg, self.step_count
        if self._steps_allowed > 0:
            self._steps_allowed -= 1
            if self._steps_allowed == 0:
                self._flush_pending()
                for r in self._step_requests:
                    r.resolve("applied", step)
                self._step_requests = []
        finish = heavy = False
        if cfg.diagnose and step % DIAGNOSIS_TICK == 0:
            self._diagnoser.owed = step  # before a save below, so that a resumed run owes the same check
        epoch_end = self.sampler.epoch_done
        if self._val_fetch is not None and ((cfg.eval_every and step % cfg.eval_every == 0)
                                            or (not cfg.eval_every and epoch_end)):
            finish, heavy = self._evaluate(), True
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            self._save_checkpoint(tag=None, reason="periodic", source="trainer", checked=self._finite_params())
            heavy = True
        # Detectors read host values: run them when the pending read-back is empty (every step on CPU,
        # every ``sync_every`` steps on CUDA), so diagnosis adds no host-device sync of its own. A boundary
        # that already evaluated or copied a checkpoint puts the scheduled check off to the next one, so
        # their costs never land on one step; a loss above the divergence alarm is checked at once.
        if cfg.diagnose and (self._urgent or (self._diagnoser.owed is not None and not self._pending
                                              and not heavy)):
            self._diagnose(after_eval=False)
        if cfg.on_divergence == "rollback" and step % cfg.good_state_every == 0:
            self._keep_good_state()
        return finish

    def _evaluate(self) -> bool:
        """Run validation; update plateau schedule, early stopping, best-k. True when patience ran out."""
        self._flush_pending()
        c = self.controls
        bs = self.cfg.eval_batch_size
        n = len(self._val_fetch)
        batches = (self._val_fetch.fetch(torch.arange(i, min(i + bs, n))) for i in range(0, n, bs))
        loss_t, acc_t = evaluate(self.model, self.loss_fn, batches, device_type=self.device.type,
                                 amp_dtype=AMP_DTYPES[c.precision], classification=self.task == "classification")
        val_loss = float(loss_t)
        val_acc = float(acc_t) if acc_t is not None else float("nan")
        row = {"step": self.step_count, "val_loss": val_loss, "val_acc": val_acc, "time": time.time()}
        self._eval_store.append(row)
        self._recorder.evals.append({**row, "val_acc": None if math.isnan(val_acc) else val_acc})
        self.last_eval = {"step": self.step_count, "val_loss": val_loss, "val_acc": val_acc}
        metric = self.last_eval.get(self.cfg.monitor, float("nan"))
        if self.schedule.observe(metric):
            self._log_event("schedule", "trainer", {"plateau_scale": self.schedule.plateau_scale})
        improved = self._early.improved(metric)
        patience_out = self._early.update(metric, self.step_count)
        if improved and self.cfg.keep_best > 0:
            self._save_checkpoint(tag="best", reason="best", source="trainer", metric=metric)
        self._hooks.fire("eval_end", lambda: self._context("eval_end", self.last_eval))
        if self.cfg.diagnose:
            self._diagnose(after_eval=True)
        if patience_out:
            self._log_event("early_stop", "trainer", {"monitor": self.cfg.monitor, "best": self._early.best,
                                                      "best_step": self._early.best_step,
                                                      "patience": self.cfg.early_stopping_patience})
        return patience_out

    # ================================================================= boundary: requests
    def _post(self, req: Request) -> Request:
        if self._status in ("finished", "stopped", "failed") and req.action != "checkpoint":
            req.resolve("refused", self.step_count, f"the run has ended (status {self._status})")
            return req
        self._requests.append(req)
        with self._wake:
            self._wake.notify_all()
        return req

    def _boundary(self) -> bool:
        """Apply queued requests; block while paused. False when the run must stop."""
        while True:
            while self._requests:
                self._apply_request(self._requests.popleft())
            if self._stop_request is not None:
                return False
            if not self._paused or self._steps_allowed > 0:
                return True
            self._flush_pending()
            self._last_time = None  # samples/s restarts after a pause
            if self.device.type == "cpu":
                cputhreads.release_idle_workers()  # idle: leave the cores to the thread that steers us
            with self._wake:
                if not self._requests:
                    self._wake.wait(0.2)

    def _apply_request(self, req: Request) -> None:
        """The one place where requests take effect (trainer thread, between steps)."""
        next_step = self.step_count + 1
        try:
            if req.action == "set":
                changes = self._apply_controls(req.controls)
                for name, (old, new) in changes.items():
                    self._log_event("control", req.source, {"field": name, "old": old, "new": new}, step=next_step)
                if changes:
                    self._recorder.meta.append({"controls": self.controls.state_dict(),
                                                "total_steps": self._planned_steps()})
                req.resolve("applied", next_step, "no change" if not changes else "")
            elif req.action == "pause":
                if not self._paused:
                    self._paused = True
                    self._steps_allowed = 0
                    self._set_status("paused", req.source)
                req.resolve("applied", next_step)
            elif req.action == "resume":
                if self._paused:
                    self._paused = False
                    self._steps_allowed = 0
                    self._set_status("running", req.source)
                req.resolve("applied", next_step)
            elif req.action == "step":
                if not self._paused:
                    req.resolve("refused", next_step, "step(n) runs steps while paused; the run is running")
                else:
                    self._steps_allowed += req.n
                    self._step_requests.append(req)
                    self._log_event("command", req.source, {"action": "step", "n": req.n}, step=next_step)
            elif req.action == "stop":
                self._stop_request = req
                self._log_event("command", req.source, {"action": "stop"}, step=self.step_count)
            elif req.action == "checkpoint":
                path = self._save_checkpoint(tag=req.tag or "manual", reason="manual", source=req.source)
                if path is None:
                    raise ValueError("the model's weights are not finite (NaN/inf); a checkpoint was not saved")
                req.resolve("applied", self.step_count, str(path), result=path)
            elif req.action == "rollback":
                if not self._rollback(source=req.source, lr=req.controls.get("lr")):
                    raise ValueError("no good state to roll back to (no finite in-memory state or checkpoint)")
                req.resolve("applied", next_step)
            elif req.action == "dismiss":
                alert = self._diagnoser.dismiss(req.n)
                self._log_event("dismiss", req.source, {"alert": alert.id, "kind": alert.kind,
                                                        "muted": alert.detector}, step=self.step_count)
                req.resolve("applied", self.step_count)
        except Exception as e:  # noqa: BLE001 - a refused request never harms the run
            req.resolve("refused", next_step, f"{type(e).__name__}: {e}")
            self._log_event("refused", req.source, {"action": req.action, "controls": req.controls,
                                                    "reason": str(e)}, step=next_step)

    def _apply_controls(self, new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Apply validated controls; returns {field: (old, new)} for what actually changed."""
        c, changes = self.controls, {}
        if "batch_size" in new and new["batch_size"] > len(self.train_data):
            raise ValueError(f"batch_size: got {new['batch_size']}; allowed: 1 to {len(self.train_data)}")
        for name in CONTROL_NAMES:
            if name in new and not same_value(getattr(c, name), new[name]):
                changes[name] = (getattr(c, name), new[name])
        if "batch_size" in changes and self.cfg.linear_scaling and "lr" not in changes:
            old_bs, new_bs = changes["batch_size"]
            changes["lr"] = (c.lr, c.lr * new_bs / old_bs)  # Goyal et al. 2017: lr proportional to batch size
        for name, (_, value) in changes.items():
            setattr(c, name, value)
        if "precision" in changes:
            self._scaler.use(c.precision)
        if "batch_size" in changes and self.device.type == "cpu" and threading.current_thread() is self._thread:
            self._choose_threads()
        if "weight_decay" in changes:
            for group in self.optimizer.param_groups:
                group["weight_decay"] = c.weight_decay
        return changes

    def _inbox_request(self, item: dict) -> None:
        """A request from another process (recorder thread): validate and queue it, or refuse it.

        Its outcome (applied at step N, or refused and why) is written back to the SQLite inbox.
        """
        action, source, args = item.get("action", "set"), item.get("source", "dashboard"), item.get("controls") or {}

        def write_back(r: Request) -> None:
            self._recorder.outcomes.append((item["id"], r.status, r.step, r.message))

        try:
            source = check_source(source)
            if action == "set":
                req = self._set_request(args, source)
            elif action == "alert_action":  # an alert's suggested action: a rollback (with its controls), or a set
                suggested = self._alert_action(check_int("alert", args.get("alert"), minimum=0),
                                               check_int("index", args.get("index", 0), minimum=0))
                req = (self._rollback_request(suggested, source) if suggested.rollback
                       else self._set_request(suggested.controls, source))
            elif action == "step":
                req = Request("step", n=check_int("n", args.get("n", 1), minimum=1), source=source)
            elif action in ("pause", "resume", "stop"):
                req = Request(action, source=source)
            elif action == "checkpoint":
                tag = args.get("tag")
                if tag is not None:
                    ck.checkpoint_name(0, tag)
                req = Request("checkpoint", tag=tag, source=source)
            elif action == "dismiss":
                req = self._dismiss_request(check_int("alert", args.get("alert"), minimum=0), source)
            else:
                raise ValueError(f"action: got {action!r}; allowed: set, pause, resume, step, stop, checkpoint, "
                                 f"dismiss, alert_action")
        except (ValueError, TypeError, RuntimeError) as e:
            self._recorder.outcomes.append((item["id"], "refused", self.step_count, str(e)))
            self._log_event("refused", source if source in SOURCES else "dashboard",
                            {"action": action, "controls": args, "reason": str(e)})
            return
        req.inbox_id, req.on_done = item["id"], write_back
        self._post(req)

    def _set_request(self, controls: Mapping[str, Any], source: str) -> Request:
        if self._status in ("finished", "stopped", "failed"):
            raise RuntimeError(f"the run has ended (status {self._status})")
        return Request("set", controls=validate_controls(controls, n_train=len(self.train_data), device=self.device),
                       source=source)

    def _refuse_pending(self, why: str) -> None:
        while self._requests:
            self._requests.popleft().resolve("refused", self.step_count, why)
        for r in self._step_requests:
            r.resolve("refused", self.step_count, why)

    # ================================================================= checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The full training state: one dict with constant keys (see workbench.checkpoint)."""
        return self._checkpoint(self.cfg.to_dict(), ck.library_versions(), self._component_states())

    def _component_states(self) -> dict[str, Any]:
        return {name: comp.state_dict() for name, comp in self._stateful.items()}

    def _checkpoint(self, config: dict[str, Any], versions: dict[str, str], states: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's layout (``workbench.checkpoint``) around the components' ``states``."""
        return {"format_version": ck.FORMAT_VERSION, "versions": versions, "config": config,
                "step": self.step_count, "epoch": self.epoch, "state": states}

    def load_state_dict(self, ckpt: Mapping[str, Any]) -> None:
        """Restore every registered component from a checkpoint dict."""
        state = ckpt["state"]
        missing = [k for k in self._stateful if k not in state]
        if missing:
            raise ValueError(f"checkpoint: missing state for {', '.join(missing)}")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint: the model does not match the checkpoint's weights ({str(e).splitlines()[0]}"
                             f"{' ...' if len(str(e).splitlines()) > 1 else ''})\n{e}") from None
        for name, comp in self._stateful.items():
            if name != "model":
                comp.load_state_dict(state[name])
        self.step_count = int(ckpt["step"])
        self._scaler.use(self.controls.precision)

    def _finite_params(self) -> set[tuple]:
        """The parameters that the step just taken found finite: its layer statistics measured every
        parameter's norm after the update, and a finite norm means finite elements. As (pointer,
        shape, stride); empty unless this step took layer statistics and all were finite. Only valid
        right after the step (``_after_step``): a request at the boundary may load other weights."""
        layers = self._latest_layers
        if layers is None or layers["step"] != self.step_count or not np.isfinite(layers["param_norm"]).all():
            return set()
        return {(p.data_ptr(), p.shape, p.stride()) for p in self._params}

    def _save_checkpoint(self, *, tag: str | None, reason: str, source: str,
                         metric: float | None = None, checked: set[tuple] = frozenset()) -> Path | None:
        """Copy the state to host memory here; write it on the writer thread (atomic rename).

        Returns None (and logs why) when the weights are not finite: such a state is never saved.
        ``checked``: model tensors (pointer, shape, stride) known finite now (``_finite_params``).
        """
        self._flush_pending()
        # The config is fixed for the run (a change makes a new TrainConfig): its dict is built once and
        # shared by the checkpoints (never changed), like the library versions; only the components'
        # states are walked and copied, one save's worth of Python at a step boundary.
        if self._config_dict[0] is not self.cfg:
            self._config_dict = (self.cfg, self.cfg.to_dict())
        components = self._component_states()
        if _nonfinite(components["model"], checked):
            self._log_event("checkpoint_skipped", source, {"reason": "the weights hold NaN/inf; a good "
                                                                     "checkpoint is never overwritten by them"})
            return None
        # The host copy goes into the buffers of an earlier save once that one is on disk: copying into
        # memory that is already mapped is ~10x faster than fresh allocations (bench/RESULTS.md). With
        # the writer process they lie in memory it maps too.
        buffers = self._writer.take_buffers()
        state = self._checkpoint(self._config_dict[1], self._versions, _host_copy(components, buffers))
        path = self.checkpoint_dir / ck.checkpoint_name(self.step_count, tag)
        if metric is None and self.last_eval:
            metric = self.last_eval.get(self.cfg.monitor)
        step, when = self.step_count, time.time()

        def done(p: Path) -> None:
            self._writer.recycle(buffers)  # written: the next save may reuse them
            self._db.add_checkpoint(step=step, path=str(p), metric=metric, tag=tag or reason, time=when)
            self._apply_retention()

        self._writer.submit(state, path, done, buffers)
        self._log_event("checkpoint", source, {"path": str(path), "reason": reason, "tag": tag, "metric": metric},
                        step=step)
        self._hooks.fire("checkpoint", lambda: self._context("checkpoint", {"metric": metric},
                                                             data={"path": str(path), "reason": reason}))
        return path

    def _apply_retention(self) -> None:
        """Keep the newest ``keep_checkpoints`` plus the best ``keep_best``; user-tagged ones always stay.

        Plain tuples, not a DataFrame: this runs after every save on the writer thread, and every
        millisecond it holds the GIL there is a millisecond the trainer thread may wait."""
        auto = [r for r in self._db.checkpoint_rows() if r[3] in AUTO_TAGS]  # (step, path, metric, tag, time)
        if not auto:
            return
        k = self.cfg.keep_checkpoints
        keep = {r[1] for r in (sorted(auto, key=lambda r: (r[0], r[4] or 0.0))[-k:] if k > 0 else [])}
        scored = [r for r in auto if r[2] is not None and not math.isnan(r[2])]
        if self.cfg.keep_best and scored:
            sign = 1.0 if self.cfg.monitor_mode == "min" else -1.0
            keep |= {r[1] for r in sorted(scored, key=lambda r: (sign * r[2], -r[0]))[:self.cfg.keep_best]}
        for _, path, *_rest in auto:
            if path not in keep:
                Path(path).unlink(missing_ok=True)
                self._db.remove_checkpoint(path)

    def _make_writer(self, choice: str) -> "ck.AsyncWriter | ckptproc.ProcessWriter":
        """The checkpoint writer: a process of its own (``checkpoint_writer`` process, or auto where one
        can run), else a paced thread of this process (see workbench.ckptproc)."""
        why_not = ckptproc.unsupported()
        if choice == "process" and why_not:
            raise ValueError(f"checkpoint_writer: got 'process', but {why_not}; allowed here: auto, thread")
        if choice == "thread" or why_not:
            return ck.AsyncWriter(self._checkpoint_failed, pacing.default_pacer())
        return ckptproc.ProcessWriter(self._checkpoint_failed, pacing.default_pacer(),
                                      on_fallback=self._writer_fell_back)

    def _writer_fell_back(self, why: str) -> None:
        self._log_event("checkpoint_writer", "trainer", {"mode": "thread", "why": why})

    def _checkpoint_failed(self, path: Path, e: BaseException) -> None:
        self._log_event("checkpoint_failed", "trainer", {"path": str(path), "error": f"{type(e).__name__}: {e}"})

    @classmethod
    def from_checkpoint(cls, path_or_run_dir: str | os.PathLike, *, cfg: TrainConfig | Mapping | None = None,
                        run_dir: str | os.PathLike | None = None, model: torch.nn.Module | None = None,
                        train_data: Dataset | None = None, val_data: Dataset | None = None,
                        loss_fn: Callable | None = None, task: str | None = None) -> "Trainer":
        """Continue a run from a checkpoint file, or from a run directory's newest intact checkpoint.

        The trainer continues in the same run directory (history is appended; rows logged after the
        checkpoint's step are dropped) unless ``run_dir`` names a new one. Pass the same ``model`` /
        data / ``loss_fn`` objects when the run used its own. A ``cfg`` that disagrees with the
        checkpoint's is reported field by field (the checkpoint's wins, except run_dir/runs_root).
        """
        src = Path(path_or_run_dir)
        if src.is_dir():
            folder = src / "checkpoints" if (src / "checkpoints").is_dir() else src
            path, ckpt = ck.newest_intact(folder, warn=lambda m: warnings.warn(m, stacklevel=3))
        else:
            path, ckpt = src, ck.load_checkpoint(src)
        saved = TrainConfig.from_dict(ckpt["config"])
        if cfg is not None:
            given = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
            diffs = [f"{k}: checkpoint {v!r}, given {getattr(given, k)!r}" for k, v in saved.to_dict().items()
                     if k not in ("run_dir", "runs_root", "name") and getattr(given, k) != v]
            if diffs:
                warnings.warn("config differs from the checkpoint's (the checkpoint's is used): " + "; ".join(diffs),
                              stacklevel=2)
        orig_run = path.parent.parent if path.parent.name == "checkpoints" else Path(saved.run_dir or path.parent)
        target = Path(run_dir) if run_dir is not None else orig_run
        resumed = target.resolve() == orig_run.resolve()
        tr = cls(saved.replace(run_dir=str(target)), model=model, train_data=train_data, val_data=val_data,
                 loss_fn=loss_fn, task=task, _resuming=True)
        try:
            tr.load_state_dict(ckpt)
        except (ValueError, KeyError, TypeError) as e:
            tr._db.close()
            raise ck.CheckpointError(path, f"does not fit this run: {e}") from None
        step = tr.step_count
        if resumed:
            tr._db.delete_after(step)
            tr._db.set_meta(status="idle", resumed_from=str(path), resumed_at=step)
        else:
            src_db = RunDB(orig_run / "run.db", readonly=True) if (orig_run / "run.db").exists() else None
            if src_db is not None:
                tr._db.insert_steps(src_db.read_steps().query("step <= @step").to_dict("records"))
                tr._db.insert_evals(src_db.read_evals().query("step <= @step").to_dict("records"))
                src_db.close()
            tr._lineage = {"parent_run": str(orig_run), "parent_step": step, "parent_checkpoint": str(path)}
            tr._db.set_meta(**tr._lineage)
        tr._load_history()
        tr._log_event("resume" if resumed else "fork", "api", {"checkpoint": str(path), "step": step,
                                                                **tr._lineage}, step=step)
        return tr

    def fork(self, checkpoint: str | os.PathLike | None = None, run_dir: str | os.PathLike | None = None,
             source: str = "api", **controls: Any) -> "Trainer":
        """A new run (new directory) from a checkpoint of this one (default: the newest), with changed controls.

        The child records its parent run and step; it is returned not yet started.
        """
        if checkpoint is None:
            self._writer.wait()
            table = self.checkpoints
            if table.empty:
                raise ValueError("fork: this run has no checkpoint yet; call save_checkpoint() first")
            checkpoint = table.sort_values(["step", "time"]).iloc[-1]["path"]
        if run_dir is None:
            run_dir = new_run_dir(self.cfg.runs_root, f"{self.run_dir.name}-fork")
        child = Trainer.from_checkpoint(checkpoint, run_dir=run_dir, **self._own_objects(copy_model=True))
        if controls:
            child.set(source=source, **controls)
        return child

    def continue_from(self, checkpoint: str | os.PathLike) -> "Trainer":
        """A new Trainer that continues this run, in its own directory, from one of its checkpoints (the
        rows after it are dropped), with the model, data and loss this run was given; returned not yet
        started. Only once this run has ended: two trainers never write one directory."""
        if self.is_alive:
            raise RuntimeError("continue_from: the run is still going; stop it first (it continues in the same "
                               "run directory, so only one trainer may write there)")
        return Trainer.from_checkpoint(checkpoint, **self._own_objects(copy_model=False))

    def _own_objects(self, copy_model: bool) -> dict[str, Any]:
        """What a Trainer made from this run's checkpoint needs beside it: nothing for a built-in model and
        data set, else this run's own model (a copy for a fork), data, loss and task."""
        if self._own_model:
            return {}
        return dict(model=copy.deepcopy(self.model) if copy_model else self.model, train_data=self.train_data,
                    val_data=self.val_data, loss_fn=self.loss_fn, task=self.task)

    @property
    def lineage(self) -> dict[str, Any]:
        """Parent run, step and checkpoint for a forked run (empty for a fresh one)."""
        return dict(self._lineage)

    def _load_history(self) -> None:
        """Fill the in-memory stores and event list from the run's SQLite file (after resume/fork)."""
        steps = self._db.read_steps()
        if not steps.empty:
            first = steps["train_loss"].to_numpy(dtype=float)[:10]
            self._initial_losses = [float(v) for v in first if math.isfinite(v)]
            self._alarm_loss = self._divergence_alarm()
            steps = steps.copy()
            steps["precision"] = steps["precision"].map(PRECISION_CODES).fillna(0)
            self._store.extend({c: steps[c].to_numpy(dtype=float) for c in STEP_COLUMNS})
        evals = self._db.read_evals()
        if not evals.empty:
            self._eval_store.extend({c: evals[c].to_numpy(dtype=float) for c in EVAL_COLUMNS})
            last = evals.iloc[-1]
            self.last_eval = {"step": int(last["step"]), "val_loss": float(last["val_loss"]),
                              "val_acc": float(last["val_acc"]) if pd.notna(last["val_acc"]) else float("nan")}
        layers = self._db.read_layers()
        if not layers.empty:
            index = {n: i for i, n in enumerate(self._param_names)}
            layers = layers[layers["layer"].isin(index)]
            self._layer_store.extend({"step": layers["step"].to_numpy(float),
                                      "layer": layers["layer"].map(index).to_numpy(float),
                                      "grad_norm": layers["grad_norm"].to_numpy(float),
                                      "param_norm": layers["param_norm"].to_numpy(float),
                                      "update_ratio": layers["update_ratio"].to_numpy(float)})
        events = self._db.read_events()
        with self._events_lock:
            self._events = [{k: r[k] for k in ("time", "step", "kind", "source", "data")}
                            for r in events.to_dict("records")]

    # ================================================================= diagnosis (trainer thread)
    def _signals(self) -> Signals:
        if self._probe is None:
            n = min(256, len(self.train_data))
            x, _ = self._fetch.fetch(torch.arange(n))
            self._probe = ActivationProbe(self.model, x if isinstance(x, torch.Tensor) else None)
        return Signals(step=self.step_count,
                       # views, not copies: only this thread appends, and not while detectors run
                       history=self._store.tail(DIAGNOSIS_WINDOW, ("step", "train_loss", "grad_norm", "lr"),
                                                copy=False),
                       evals=self._eval_tail(),
                       layers=self._latest_layers, task=self.task, n_classes=self.data_info.get("n_classes")
                       if self.data_info else _n_classes(self.train_data, self.task),
                       planned_steps=self._planned_steps(), controls=self.controls.state_dict(),
                       initial_loss=self._initial_loss(), probe_activations=self._probe)

    def _divergence_alarm(self) -> float:
        """The loss that makes the divergence detector run at the step it is read back rather than on its
        schedule: its own explosion threshold (explode_factor x the starting loss). A short explosion
        is caught while it lasts, and the detector itself needs to run only every DIAGNOSIS_TICK steps."""
        det = self._diagnoser.detectors.get("divergence")
        initial = self._initial_loss()
        if not self.cfg.diagnose or det is None or initial is None:
            return math.inf
        return det.explode_factor * max(initial, 1e-12)

    def _initial_loss(self) -> float | None:
        """The starting loss detectors compare with: the median of the first finite losses (>= 3 of them).
        statistics.median gives np.median's value for these few floats, at a tenth of the cost."""
        return float(statistics.median(self._initial_losses)) if len(self._initial_losses) >= 3 else None

    def _eval_tail(self) -> dict[str, np.ndarray]:
        """The evaluations detectors see, copied again only when a new one was stored."""
        if self._eval_cache is None or self._eval_cache[0] != self._eval_store.appended:
            self._eval_cache = (self._eval_store.appended,
                                self._eval_store.tail(10_000, ("step", "val_loss", "val_acc")))
        return self._eval_cache[1]

    def _diagnose(self, after_eval: bool) -> None:
        """Run the detectors that are due; raise the alerts that start a new episode."""
        self._flush_pending()
        if after_eval:
            names = self._diagnoser.due(self.step_count, True)
        else:  # the scheduled check of the step it was due at (this boundary or an earlier one)
            owed, self._diagnoser.owed = self._diagnoser.owed, None
            names = [] if owed is None else self._diagnoser.due(owed, False)
        if self._urgent and "divergence" not in names and "divergence" not in self._diagnoser.muted:
            names.append("divergence")
        self._urgent = False
        if not names:
            return
        for alert in self._diagnoser.run(names, self._signals()):
            self._raise_alert(alert)

    def _raise_alert(self, alert: Alert) -> None:
        self._log_event("alert", "trainer", alert.to_dict(), step=alert.step)
        self._hooks.fire("alert", lambda: self._context("alert", {}, data=alert.to_dict()))
        if alert.kind == "divergence":
            self._on_divergence(alert)

    def _on_divergence(self, alert: Alert) -> None:
        """The run's divergence policy: pause (explain), rollback (PaLM/OPT), stop, or ignore."""
        policy = self.cfg.on_divergence
        if policy == "rollback":
            if self._rollbacks < self.cfg.max_rollbacks and self._rollback(source="policy"):
                return
            policy = "pause"
            self._log_event("policy", "policy", {"policy": "rollback", "outcome": "gave up; pausing",
                                                 "rollbacks": self._rollbacks})
        if policy == "pause" and not self._paused:
            self._paused, self._steps_allowed = True, 0
            self._set_status("paused", "policy")
            self._log_event("policy", "policy", {"policy": "pause", "alert": alert.id,
                                                 "why": "the run diverged; read the alert, then change a "
                                                        "control, roll back, or stop"})
        elif policy == "stop" and self._stop_request is None:
            self._stop_request = Request("stop", source="policy")
            self._log_event("policy", "policy", {"policy": "stop", "alert": alert.id})

    def _keep_good_state(self) -> None:
        """Keep a cheap in-memory copy of the state (on the device) when the last loss is finite."""
        last = self._store.last()
        if last is None or not math.isfinite(last["train_loss"]) or self._diagnoser.active.get("divergence"):
            return
        state = {k: _clone(self._stateful[k].state_dict()) for k in ROLLBACK_KEYS}
        state["lr"] = self.controls.lr
        if not ck.has_nonfinite(state["model"]):
            self._good_states.append((self.step_count, state))

    def _rollback(self, source: str, lr: float | None = None) -> bool:
        """Restore the last good state, keep the data stream where it is (the batches around the spike are
        skipped), lower the lr by ``rollback_lr_factor`` but not above the good state's lr (or set ``lr``). False when there is nothing to go
        back to. The step counter keeps counting up, so the history stays one line."""
        # the newest state from before the detection window; newer ones may already be on the way up
        earlier = [t for t in self._good_states if t[0] <= self.step_count - 5]
        target = earlier[-1] if earlier else (self._good_states[0] if self._good_states else None)
        if target is not None:
            while self._good_states and self._good_states[-1][0] > target[0]:
                self._good_states.pop()
        if target is None:
            self._writer.wait()  # saves already logged but still being written count too
            for step, path in ck.checkpoint_files(self.checkpoint_dir):
                try:
                    ckpt = ck.load_checkpoint(path, map_location=self.device)
                except ck.CheckpointError:
                    continue
                if not ck.has_nonfinite(ckpt["state"]["model"]):
                    target = (step, {**{k: ckpt["state"][k] for k in ROLLBACK_KEYS},
                                     "lr": ckpt["state"]["controls"]["lr"]})
                    break
        if target is None:
            return False
        step, state = target
        for k in ROLLBACK_KEYS:
            self._stateful[k].load_state_dict(_clone(state[k]))
        self._scaler.use(self.controls.precision)
        for group in self.optimizer.param_groups:
            group["weight_decay"] = self.controls.weight_decay
        old_lr = self.controls.lr
        # lower the lr by the factor, and never above the lr that was in force at the good state
        new_lr = lr if lr is not None else min(old_lr * self.cfg.rollback_lr_factor, state["lr"])
        self.controls.lr = new_lr
        self._rollbacks += 1
        self._log_event("rollback", source, {"from_step": self.step_count, "to_state_of_step": step,
                                             "lr_old": old_lr, "lr_new": new_lr, "rollbacks": self._rollbacks},
                        step=self.step_count + 1)
        self._log_event("control", source, {"field": "lr", "old": old_lr, "new": new_lr}, step=self.step_count + 1)
        return True

    # ================================================================= helpers
    def _planned_steps(self) -> int | None:
        cfg = self.cfg
        if cfg.max_steps is not None:
            return cfg.max_steps
        per_epoch = math.ceil(len(self.train_data) / cfg.batch_size / cfg.accumulate)
        return per_epoch * cfg.max_epochs if cfg.max_epochs else None

    def _set_status(self, status: str, source: str) -> None:
        self._status = status
        self._log_event("status", source, {"status": status})
        self._recorder.meta.append({"status": status, "step": self.step_count})
        self._hooks.fire("status", lambda: self._context("status", {}))

    def _log_event(self, kind: str, source: str, data: Mapping[str, Any] | None = None,
                   step: int | None = None) -> None:
        ev = {"time": time.time(), "step": self.step_count if step is None else step, "kind": kind,
              "source": source, "data": dict(data or {})}
        with self._events_lock:
            self._events.append(ev)
        self._recorder.events.append(ev)

    def _context(self, event: str, metrics: Mapping[str, Any], sample_ids: tuple[int, ...] | None = None,
                 data: Mapping[str, Any] | None = None) -> HookContext:
        return HookContext(event=event, step=self.step_count, epoch=self.epoch, status=self._status,
                           metrics=frozen(metrics), sample_ids=sample_ids, data=frozen(data or {}))

    def _hook_failed(self, event: str, fn: Callable, e: BaseException, tb: str) -> None:
        name = getattr(fn, "__qualname__", repr(fn))
        warnings.warn(f"hook {name} on {event!r} raised {type(e).__name__}: {e}; it has been disabled", stacklevel=2)
        self._log_event("hook_error", "trainer", {"hook": name, "event": event, "error": f"{type(e).__name__}: {e}",
                                                  "traceback": tb})

    def _recorder_failed(self, e: BaseException, tb: str) -> None:
        with self._events_lock:
            self._events.append({"time": time.time(), "step": self.step_count, "kind": "recorder_error",
                                 "source": "trainer", "data": {"error": f"{type(e).__name__}: {e}"}})

    def __repr__(self) -> str:
        return f"Trainer(run_dir={str(self.run_dir)!r}, status={self._status!r}, step={self.step_count})"


_LIVE: "weakref.WeakSet[Trainer]" = weakref.WeakSet()  # started trainers, for the exit handler


@atexit.register
def _stop_at_exit(timeout: float = 60.0) -> None:
    """The interpreter is exiting with trainer threads still running or paused (a script that ends
    without ``stop()``/``join()``): stop each at its next step boundary, which saves a "stopped"
    checkpoint so the run can be resumed, and wait for it. A daemon thread left to the interpreter's
    teardown can be cut off inside torch, which aborts the process ("terminate called without an
    active exception")."""
    live = [t for t in list(_LIVE) if t.is_alive]
    for t in live:
        t.stop(source="api")
    deadline = time.monotonic() + timeout
    for t in live:
        t._thread.join(max(0.0, deadline - time.monotonic()))


def _nonfinite(model_state: Mapping[str, Any], checked: set[tuple] | frozenset = frozenset()) -> bool:
    """``ck.has_nonfinite`` for a model state dict, with a fast first pass: one fused norm per tensor.

    NaN/inf anywhere makes a norm NaN/inf; only then (or when a huge finite tensor overflows its norm)
    is the exact element-wise check run, so the answer is always the exact one. The fused pass is
    cheaper than the per-tensor check at every size (21 vs 59 us for the tiny MLP's six tensors).
    Tensors in ``checked`` (pointer, shape, stride: known finite, ``Trainer._finite_params``) are skipped."""
    ts = [t for t in model_state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()
          and not (checked and (t.data_ptr(), t.shape, t.stride()) in checked)]
    if not ts:
        return False
    if bool(torch.stack(torch._foreach_norm(ts)).isfinite().all()):  # stack promotes mixed dtypes
        return False
    return ck.has_nonfinite(ts)


def _host_copy(obj: Any, buffers: dict) -> Any:
    """``ck.to_cpu`` into reused host buffers: the structure is rebuilt, every tensor is replaced by a
    host buffer of the same layout, and the copies are done at the end in one fused call.

    ``buffers`` maps a tensor's memory (pointer, shape, stride, dtype, device) to its buffer; it is
    updated in place to hold exactly the buffers this copy used, so the next save of the same state
    (parameters and optimizer state live at fixed addresses) copies into memory that is already
    mapped, ~10x faster than fresh allocations (bench/RESULTS.md). Two entries that share memory (tied
    weights) share one buffer, as torch.save would store them. New buffers come from ``buffers.alloc(t)``
    when it has one (``ckptproc.HostBuffers``: memory the writer process maps), else ``torch.empty_like``;
    with ``buffers.leaf`` the copy holds ``leaf(buffer)`` in each tensor's place (where the buffer lies:
    the message the writer process gets, built in the same walk).

    This runs on the trainer thread between two steps, so it is written for few bytecodes per node:
    plain values (most of a state's leaves) are kept without a call, and the walk is one closure."""
    used: dict = {}
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    off_host: list[tuple[torch.Tensor, torch.Tensor]] = []
    alloc, leaf = getattr(buffers, "alloc", _empty_host), getattr(buffers, "leaf", None)
    plain, tensor_type = _PLAIN, torch.Tensor

    def tensor(t: torch.Tensor) -> Any:
        if t.requires_grad:
            t = t.detach()
        try:
            key = (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)
        except RuntimeError:  # no plain memory (sparse, ...): a buffer of its own each time
            key = (id(t), t.shape, t.dtype, t.device)
        buf = used.get(key)
        if buf is None:
            buf = buffers.pop(key, None)
            if buf is None and len(key) == 5:
                buf = _same_layout(buffers, key)
            if buf is None:
                buf = alloc(t)
            used[key] = buf
            if t.is_cpu:
                dsts.append(buf)
                srcs.append(t)
            else:
                off_host.append((buf, t))
        return buf if leaf is None else leaf(buf)

    def walk(o: Any) -> Any:
        kind = type(o)
        if kind is dict or (kind is not list and kind is not tuple and isinstance(o, dict)):
            return {k: v if type(v) in plain else walk(v) for k, v in o.items()}
        if kind is list or kind is tuple or isinstance(o, (list, tuple)):
            out = [v if type(v) in plain else walk(v) for v in o]
            return out if isinstance(o, list) else tuple(out)
        if isinstance(o, tensor_type):
            return tensor(o)
        return o

    out = walk(obj)
    buffers.clear()
    buffers.update(used)
    if dsts:
        torch._foreach_copy_(dsts, srcs)
    for dst, src in off_host:
        dst.copy_(src)
    return out


def _empty_host(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="cpu")  # the layout .to("cpu", copy=True) gives


_PLAIN = frozenset({int, float, complex, bool, str, bytes, type(None)})  # leaves kept as they are


def _same_layout(old: dict, key: tuple) -> torch.Tensor | None:
    """An earlier buffer of the same layout whose tensor has moved: a state dict that returns a new tensor
    each call (``torch.get_rng_state()``, numpy's key array) refreshes the same host memory each save."""
    for k in old:
        if len(k) == 5 and k[1:] == key[1:]:
            return old.pop(k)
    return None


def _as_config(cfg: Any, overrides: Mapping[str, Any]) -> TrainConfig:
    if cfg is None:
        base = TrainConfig()
    elif isinstance(cfg, TrainConfig):
        base = cfg
    elif isinstance(cfg, Mapping):
        base = TrainConfig.from_dict(cfg)
    elif isinstance(cfg, (str, os.PathLike)):
        base = TrainConfig.from_yaml(cfg)
    else:
        raise TypeError(f"cfg: got {type(cfg).__name__}; allowed: TrainConfig, a mapping, a YAML path or None")
    return base.replace(**overrides) if overrides else base


def _clone(obj: Any) -> Any:
    """Deep copy with tensors cloned on their device (fast in-memory snapshots)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


def _n_classes(data: Dataset, task: str) -> int | None:
    if task != "classification":
        return None
    if isinstance(data, TensorDataset):
        return int(data.tensors[1].max()) + 1
    return None


def _infer_task(loss_fn: Callable | None, data: Dataset, loss: str) -> str:
    if loss == "cross_entropy" or isinstance(loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)):
        return "classification"
    if loss == "mse" or isinstance(loss_fn, (torch.nn.MSELoss, torch.nn.L1Loss, torch.nn.SmoothL1Loss,
                                             torch.nn.HuberLoss, torch.nn.BCEWithLogitsLoss)):
        return "regression"
    y = data.tensors[1] if isinstance(data, TensorDataset) else torch.as_tensor(data[0][1])
    return "classification" if not torch.is_floating_point(y) else "regression"
