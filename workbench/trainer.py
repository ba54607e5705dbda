"""The Trainer: the one facade every view uses. It builds a run, runs its loop in a background thread, and
offers the run's record and controls to any thread.

Views, scripts, hooks and other processes (through the run directory) talk to it by posting requests that
the loop applies between two optimizer steps (workbench.requests). The parts it is made of each do one job:

    workbench.build          config -> device, data, model, loss, optimizer
    workbench.loop           the trainer thread: one turn of training, in causal order, and the boundary
    workbench.step           one optimizer step, one evaluation (plain functions)
    workbench.runlog         metric stores, event log, read-back of device values
    workbench.checkpointing  checkpoints: layout, NaN guard, host copy, writer, retention
    workbench.rollback       the ring of good states and going back to one
    workbench.watch          when detectors run, and the divergence policy
"""
from __future__ import annotations

import atexit
import copy
import math
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from . import checkpoint as ck
from . import pacing
from .build import EarlyStopping, ScalerHolder, as_config, build_optimizer, build_parts, n_classes, planned_steps
from .checkpointing import Checkpointer
from .config import TrainConfig
from .controls import Controls
from .diagnosis import Alert, Diagnoser, default_detectors
from .hooks import HookContext, HookHandle, HookRegistry
from .loop import Loop
from .recorder import Recorder
from .requests import Request, RunFacts, make_request
from .rollback import GoodStates
from .rundir import RunDB, TBWriter
from .runlog import LAYER_COLUMNS, RunLog
from .sampler import BatchFetcher, EpochSampler
from .schedules import Schedule
from .watch import Watch


class TrainingFailed(RuntimeError):
    """Raised by ``join()`` when user code (model, loss, data) raised on the trainer thread."""


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
        p = build_parts(as_config(cfg, overrides), model=model, train_data=train_data, val_data=val_data,
                        loss_fn=loss_fn, task=task)
        self.cfg = cfg = p.cfg
        self.device, self.task, self.data_info = p.device, p.task, p.data_info
        self.model, self.loss_fn, self.train_data, self.val_data = p.model, p.loss_fn, p.train_data, p.val_data
        self._own_model = p.own_model
        self.run_dir, self.checkpoint_dir = p.run_dir, p.run_dir / "checkpoints"
        cfg.to_yaml(self.run_dir / "config.yaml", extra={"seed": cfg.seed, "device": str(self.device),
                                                          "precision": p.precision, "versions": ck.library_versions()})
        self.db = RunDB(self.run_dir / "run.db")
        existing = None if _resuming else self.db.last_step()
        if existing is not None:
            self.db.close()
            raise ValueError(f"run_dir: {self.run_dir} already holds a run (up to step {existing}); allowed: a new "
                             f"folder, or Trainer.from_checkpoint({str(self.run_dir)!r}) to continue it")

        # the stateful parts, each with state_dict/load_state_dict; a checkpoint holds them all
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        names = [n for n, q in self.model.named_parameters() if q.requires_grad]
        self.optimizer = build_optimizer(cfg, self.params)
        self.controls = Controls.from_config(cfg, precision=p.precision)
        self.schedule = Schedule(cfg.schedule, cfg.schedule_options, self.planned_steps, cfg.monitor_mode)
        self.scaler = ScalerHolder(self.device.type, p.precision)
        self.sampler = EpochSampler(len(self.train_data), cfg.seed)
        self.early_stopping = EarlyStopping(cfg.early_stopping_patience, cfg.monitor_mode, cfg.min_delta)
        diagnoser = Diagnoser(default_detectors(cfg.diagnosis_options))
        parts = {"model": self.model, "optimizer": self.optimizer, "schedule": self.schedule, "scaler": self.scaler,
                 "controls": self.controls, "sampler": self.sampler, "rng": ck.RNGState(),
                 "early_stopping": self.early_stopping, "detectors": diagnoser}
        self.fetcher = BatchFetcher(self.train_data, self.device)
        n_val = len(self.val_data) if self.val_data is not None else 0
        self.val_fetcher = BatchFetcher(self.val_data, self.device) if n_val else None
        self.facts = RunFacts(n_train=len(self.train_data), device=self.device, find_alert=diagnoser.find)

        # the collaborators: the loop, the record of the run, diagnosis, checkpoints, good states, hooks
        self._loop = loop = Loop(self)
        self.hooks = HookRegistry(loop.hook_failed)
        recorder = Recorder(self.db, TBWriter(self.run_dir / "tb") if cfg.tensorboard else None,
                            on_inbox=loop.inbox_request, on_error=loop.recorder_failed, pacer=pacing.default_pacer())
        self.runlog = RunLog(recorder, names, on_value=lambda *v: self.watch.see(*v))
        n_cls = self.data_info.get("n_classes") if self.data_info else n_classes(self.train_data, self.task)
        self.watch = Watch(diagnoser, cfg, self.runlog, loop, model=self.model,
                           facts=lambda: {"task": self.task, "n_classes": n_cls, "planned_steps": self.planned_steps,
                                          "controls": self.controls.state_dict()},
                           probe_batch=lambda: self.fetcher.fetch(torch.arange(min(256, len(self.train_data))))[0],
                           on_alert=lambda a: self.hooks.fire("alert", lambda: loop.context("alert", {},
                                                                                            data=a.to_dict())))
        self.checkpointer = Checkpointer(cfg, parts, self.db, self.checkpoint_dir,
                                         position=lambda: (loop.step_count, self.epoch),
                                         last_eval=lambda: self.runlog.last_eval, flush=self.runlog.flush,
                                         event=loop.log_event, on_save=loop.saved)
        self.good_states = GoodStates(cfg.good_states, parts, self.controls, lr_factor=cfg.rollback_lr_factor,
                                      device=self.device, folder=self.checkpoint_dir,
                                      wait_for_saves=self.checkpointer.wait, after_load=loop.after_load,
                                      event=loop.log_event)
        if cfg.checkpoint_every:
            self.checkpointer.writer.start()  # a writer process imports torch (~1 s): ready for the first save
        if "started" not in self.db.meta():
            self.db.set_meta(started=time.time())
        self.db.set_meta(n_train=len(self.train_data), total_steps=self.planned_steps,
                          controls=self.controls.state_dict(), status="idle", dataset=cfg.dataset, model=cfg.model,
                          seed=cfg.seed, device=str(self.device), task=self.task, pid=os.getpid(), layer_names=names)

    # ================================================================= lifecycle
    @property
    def status(self) -> str:
        """idle, running, paused, stopped, finished or failed."""
        return self._loop.status

    @property
    def step_count(self) -> int:
        """Optimizer steps completed."""
        return self._loop.step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._loop.step_count = value

    @property
    def traceback(self) -> str | None:
        """The traceback of the user code that failed the run (None unless it failed)."""
        return self._loop.traceback

    @property
    def epoch(self) -> int:
        """Index of the epoch the next step draws from (0-based)."""
        return self.sampler.epoch + (1 if self.sampler.epoch_done else 0)

    @property
    def planned_steps(self) -> int | None:
        """Optimizer steps the run will take (None: no end set)."""
        return planned_steps(self.cfg, len(self.train_data))

    def start(self, paused: bool = False) -> "Trainer":
        """Start the loop in a background thread and return at once."""
        loop = self._loop
        if loop.thread is not None:
            raise RuntimeError(f"start: this run was already started (status {loop.status}); use resume() "
                               f"to continue a paused run, or Trainer.from_checkpoint / fork for a new one")
        loop.paused = paused
        loop.default_threads = torch.get_num_threads()  # the caller's count: what its own loop would use
        self.runlog.recorder.start()
        self.checkpointer.writer.start()
        loop.hand_over()
        loop.thread = threading.Thread(target=loop.run, name="workbench-trainer", daemon=True)
        _LIVE.add(self)
        loop.thread.start()
        return self

    def pause(self, source: str = "api") -> Request:
        """Pause at the next step boundary."""
        return self.ask("pause", source=source)

    def resume(self, source: str = "api") -> Request:
        """Continue a paused run."""
        return self.ask("resume", source=source)

    def step(self, n: int = 1, source: str = "api") -> Request:
        """While paused, run exactly ``n`` optimizer steps, then pause again (``.wait()`` until done)."""
        return self.ask("step", {"n": n}, source)

    def stop(self, source: str = "api") -> Request:
        """Finish the current step, save a checkpoint and end the run cleanly (status stopped)."""
        return self.ask("stop", source=source)

    def set(self, source: str = "api", **controls: Any) -> Request:
        """Change live controls (lr, batch_size, precision, grad_clip, accumulate, weight_decay).

        Validated now, in the caller's thread (ValueError/TypeError naming the field and what is
        allowed); applied by the trainer at the next optimizer-step boundary. ``lr`` sets the base
        (peak) LR of the schedule from that step on. Returns a Request; ``.wait()`` blocks until applied.
        """
        return self.ask("set", controls, source)

    def ask(self, action: str, args: Mapping[str, Any] | None = None, source: str = "api") -> Request:
        """Post any request of the vocabulary (workbench.requests.ACTIONS): checked now, applied at the next
        step boundary; a run that has ended refuses all but a checkpoint."""
        req = make_request(action, args, self.facts, source)
        if action in ("set", "resume", "step"):
            self._loop.hand_over()
        return self._loop.post(req)

    def join(self, timeout: float | None = None) -> str:
        """Wait for the thread to end (or ``timeout``); re-raise a failure from user code. Returns the status."""
        loop = self._loop
        if loop.thread is not None:
            loop.thread.join(timeout)
        if loop.error is not None:
            raise TrainingFailed(f"training failed at step {loop.step_count + 1}: "
                                 f"{type(loop.error).__name__}: {loop.error}\n{loop.traceback}") from loop.error
        return loop.status

    def run(self) -> "Trainer":
        """Start and wait until the run ends (a blocking convenience for scripts)."""
        self.start()
        self.join()
        return self

    @property
    def is_alive(self) -> bool:
        """The trainer thread is running (or paused): the run has started and not ended."""
        return self._loop.thread is not None and self._loop.thread.is_alive()

    @property
    def paused_by_policy(self) -> bool:
        """The divergence policy paused the run, and nobody has resumed it since."""
        return self._loop.paused and self._loop.paused_by == "policy"

    @property
    def is_stepping(self) -> bool:
        """A ``step(n)`` is being carried out (the run is paused, but its loop is running steps)."""
        return self._loop.steps_allowed > 0

    def save_checkpoint(self, tag: str | None = None, source: str = "api", timeout: float | None = 60.0) -> Path:
        """Save a checkpoint now (at the next boundary when running) and return its path."""
        req = self.ask("checkpoint", {"tag": tag}, source).wait(timeout)
        if req.status != "applied":
            raise RuntimeError(f"save_checkpoint: {req.message or 'not saved in time'}")
        self.checkpointer.wait()
        return req.result

    def on(self, event: str, fn: Callable[[HookContext], Any]) -> HookHandle:
        """Call ``fn(context)`` on the trainer thread at ``event``: step_end, eval_end, checkpoint, alert, status."""
        return self.hooks.add(event, fn)

    def log_event(self, kind: str, source: str, data: Mapping[str, Any] | None = None,
                  step: int | None = None) -> None:
        """Append an entry to the run's event log (default step: the steps completed so far)."""
        self._loop.log_event(kind, source, data, step)

    # ================================================================= diagnosis and finders
    @property
    def alerts(self) -> list[Alert]:
        """Every alert raised in this run (dismissed ones included, marked so)."""
        return list(self.watch.diagnoser.alerts)

    def diagnose(self) -> dict[str, Any]:
        """The open alerts plus a short health summary (healthy, warning or critical)."""
        return self.watch.report()

    def dismiss(self, alert_id: int, source: str = "api") -> Request:
        """Mark an alert a false alarm; its detector backs off for the rest of this run (recorded)."""
        return self.ask("dismiss", {"alert": alert_id}, source)

    def apply_action(self, alert_id: int, index: int = 0, source: str = "api") -> Request:
        """Apply an alert's suggested action: its controls (after a rollback if it asks for one)."""
        return self.ask("alert_action", {"alert": alert_id, "index": index}, source)

    def lr_find(self, **options: Any) -> Any:
        """LR range test (Smith 2017, fastai's valley rule) on copies; see ``workbench.finders.lr_find``."""
        from .finders import lr_find

        return lr_find(self, **options)

    def find_batch_size(self, **options: Any) -> int:
        """Largest batch that fits (accelerate-style halving on OOM); see ``workbench.finders.find_batch_size``."""
        from .finders import find_batch_size

        return find_batch_size(self, **options)

    def panel(self, **options: Any) -> Any:
        """The notebook panel on this run (workbench.notebook)."""
        from .notebook import panel

        return panel(self, **options)

    # ================================================================= the record (any thread)
    @property
    def history(self) -> pd.DataFrame:
        """One row per optimizer step: step, epoch, train_loss, lr, batch_size, precision, grad_norm, ..."""
        return self.runlog.history()

    @property
    def evals(self) -> pd.DataFrame:
        """One row per evaluation: step, val_loss, val_acc (NaN for regression), time."""
        return self.runlog.evals()

    @property
    def last_eval(self) -> dict[str, float]:
        """The newest evaluation: step, val_loss, val_acc (empty before the first)."""
        return self.runlog.last_eval

    @property
    def layer_history(self) -> pd.DataFrame:
        """Per parameter tensor, every ``layer_every`` steps: grad norm, parameter norm, update/weight ratio."""
        return self.runlog.layer_history()

    @property
    def layer_names(self) -> list[str]:
        """The trained parameter tensors' names, in model order (``layer_columns``' layer index)."""
        return list(self.runlog.param_names)

    @property
    def layer_count(self) -> int:
        """Per-layer rows recorded so far; a poller re-reads ``layer_columns`` only when this moved."""
        return self.runlog.layers.appended

    def layer_columns(self, columns: Sequence[str] = LAYER_COLUMNS) -> dict[str, np.ndarray]:
        """The rows of ``layer_history`` as numeric arrays (``layer``: an index into ``layer_names``)."""
        return self.runlog.layer_columns(columns)

    @property
    def events(self) -> pd.DataFrame:
        """The event log: time, step, kind, source, data (changes, status, checkpoints, alerts, errors)."""
        return self.runlog.events()

    @property
    def event_count(self) -> int:
        """Entries in the event log; a poller re-reads ``event_list`` only when this moved."""
        return self.runlog.event_count

    def event_list(self, start: int = 0) -> list[dict[str, Any]]:
        """The event log from entry ``start`` on, as dicts (never changed once logged; do not change them)."""
        return self.runlog.event_list(start)

    @property
    def checkpoints(self) -> pd.DataFrame:
        """The checkpoint table (step, path, metric, tag, time) from the run's SQLite file."""
        return self.db.read_checkpoints()

    def series(self, y: str, n_out: int = 2000) -> tuple[np.ndarray, np.ndarray]:
        """A downsampled (step, value) series of a history or eval column that keeps minima and maxima."""
        return self.runlog.series(y, n_out)

    def snapshot(self) -> dict[str, Any]:
        """A small dict of the current state for status lines (safe to call from any thread)."""
        last = self.runlog.steps.last() or {}
        epoch = last.get("epoch", 0)  # the last step's, as in history (a run read from its directory says the same)
        return {"status": self.status, "step": self.step_count, "epoch": int(epoch) if math.isfinite(epoch) else 0,
                "train_loss": last.get("train_loss"), "lr": last.get("lr"), "samples_per_s": last.get("samples_per_s"),
                "total_steps": self.planned_steps, "controls": self.controls.state_dict(),
                "last_eval": dict(self.last_eval), "run_dir": str(self.run_dir)}

    # ================================================================= checkpoints, resume, fork
    def state_dict(self) -> dict[str, Any]:
        """The full training state: one dict with constant keys (see workbench.checkpoint)."""
        return self.checkpointer.layout(self.checkpointer.states())

    def load_state_dict(self, ckpt: Mapping[str, Any]) -> None:
        """Restore every registered component from a checkpoint dict."""
        self.step_count = self.checkpointer.load(ckpt)
        self.scaler.use(self.controls.precision)

    @classmethod
    def from_checkpoint(cls, path_or_run_dir: str | os.PathLike, **options: Any) -> "Trainer":
        """Continue a run from a checkpoint file, or from a run directory's newest intact checkpoint.

        The trainer continues in the same run directory (history is appended; rows logged after the
        checkpoint's step are dropped) unless ``run_dir`` names a new one. Pass the same ``model`` /
        ``train_data`` / ``val_data`` / ``loss_fn`` / ``task`` when the run used its own. A ``cfg`` that
        disagrees with the checkpoint's is reported field by field (the checkpoint's wins).
        """
        from .resume import from_checkpoint

        return from_checkpoint(cls, path_or_run_dir, **options)

    def fork(self, checkpoint: str | os.PathLike | None = None, run_dir: str | os.PathLike | None = None,
             source: str = "api", **controls: Any) -> "Trainer":
        """A new run (new directory) from a checkpoint of this one (default: the newest), with changed
        controls; the child records its parent run and step and is returned not yet started."""
        from .resume import fork

        return fork(self, checkpoint, run_dir, source, controls)

    def continue_from(self, checkpoint: str | os.PathLike) -> "Trainer":
        """A new Trainer that continues this run, in its own directory, from one of its checkpoints, with the
        model, data and loss this run was given; only once this run has ended (one writer per directory)."""
        if self.is_alive:
            raise RuntimeError("continue_from: the run is still going; stop it first (it continues in the same "
                               "run directory, so only one trainer may write there)")
        return Trainer.from_checkpoint(checkpoint, **self.own_objects(copy_model=False))

    def own_objects(self, copy_model: bool) -> dict[str, Any]:
        """What a Trainer made from this run's checkpoint needs beside it: nothing for a built-in model and
        data set, else this run's own model (a copy, for a fork), data, loss and task."""
        if not self._own_model:
            return {}
        return dict(model=copy.deepcopy(self.model) if copy_model else self.model, train_data=self.train_data,
                    val_data=self.val_data, loss_fn=self.loss_fn, task=self.task)

    @property
    def lineage(self) -> dict[str, Any]:
        """Parent run, step and checkpoint for a forked run (empty for a fresh one)."""
        meta = self.db.meta()
        return {k: meta[k] for k in ("parent_run", "parent_step", "parent_checkpoint") if k in meta}

    def __repr__(self) -> str:
        return f"Trainer(run_dir={str(self.run_dir)!r}, status={self.status!r}, step={self.step_count})"


_LIVE: "weakref.WeakSet[Trainer]" = weakref.WeakSet()  # started trainers, for the exit handler


@atexit.register
def _stop_at_exit(timeout: float = 60.0) -> None:
    """The interpreter is exiting with trainer threads still running or paused (a script that ends without
    ``stop()``/``join()``): stop each at its next step boundary, which saves a "stopped" checkpoint so the
    run can be resumed, and wait for it. A daemon thread left to the interpreter's teardown can be cut off
    inside torch, which aborts the process ("terminate called without an active exception")."""
    live = [t for t in list(_LIVE) if t.is_alive]
    for t in live:
        t.stop(source="api")
    deadline = time.monotonic() + timeout
    for t in live:
        t._loop.thread.join(max(0.0, deadline - time.monotonic()))
