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

from . import checkpoint as ck
from . import cost
from .assemble import assemble
from .build import Own, as_config, planned_steps
from .chartdata import RATE_COLUMNS, RATE_TAIL, samples_per_s
from .config import TrainConfig
from .diagnosis import Alert
from .hooks import HookContext, HookHandle
from .loaders import data_size
from .optim import copy_training
from .requests import Request, make_request
from .runlog import LAYER_COLUMNS


class TrainingFailed(RuntimeError):
    """Raised by ``join()`` when user code (model, loss, data) raised on the trainer thread."""


class Trainer:
    """Train a model in a background thread and steer it while it runs.

    ``Trainer(cfg)`` trains the built-in data set and model the config names; ``Trainer(cfg, model=...,
    train_data=..., val_data=..., loss_fn=...)`` trains your own. What you may bring (all optional):

    - ``train_data`` / ``val_data``: a map-style Dataset, an IterableDataset or a DataLoader
      (workbench.loaders says what each supports); ``collate_fn`` for a Dataset's items.
    - batches of any structure: ``(input, target)`` pairs with ``loss_fn(prediction, target)``; dict batches
      with a model that returns ``.loss`` (Hugging Face style) or with ``loss_fn``; or ``step_fn(model,
      batch) -> loss`` for anything else (workbench.batches; ``output_key`` / ``target_key`` name the
      prediction and the target when the default rule does not find them).
    - ``optimizer``: a name, an Optimizer or ``fn(params)``; ``schedule``: a name, an LRScheduler, a factory
      ``fn(optimizer)`` or ``fn(step) -> multiplier`` (workbench.optim: how a live lr change composes).
    - ``metrics``: ``{"name": fn(preds, targets) or a torchmetrics Metric}``, computed at every evaluation.

    ``cfg`` may be a ``TrainConfig``, a mapping, a YAML path or None; keyword ``overrides`` replace config
    fields.
    """

    def __init__(self, cfg: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None, *,
                 model: torch.nn.Module | None = None, train_data: Any = None, val_data: Any = None,
                 loss_fn: Callable | None = None, task: str | None = None, optimizer: Any = None,
                 schedule: Any = None, step_fn: Callable | None = None, collate_fn: Callable | None = None,
                 metrics: Mapping[str, Any] | None = None, output_key: str | None = None,
                 target_key: str | None = None, _resuming: bool = False, **overrides: Any) -> None:
        own = Own(model=model, train_data=train_data, val_data=val_data, loss_fn=loss_fn, task=task,
                  optimizer=optimizer, schedule=schedule, step_fn=step_fn, collate_fn=collate_fn, metrics=metrics,
                  output_key=output_key, target_key=target_key)
        assemble(self, as_config(cfg, {**overrides, **own.named_builtins()}), own, resuming=_resuming)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer the run steps (the user's own when one was passed)."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, value: Any) -> None:
        raise AttributeError("optimizer: a run's optimizer is fixed once it is built (the lr control, the "
                             "checkpoints and resume follow it); allowed: Trainer(..., optimizer=opt_or_factory)")

    @property
    def sampler(self) -> Any:
        """Where the next batch comes from: a map-style Dataset's resumable sampler (epoch, position in samples),
        else the loader source (workbench.loaders)."""
        return getattr(self.source, "sampler", self.source)

    def probe_input(self) -> Any:
        """The input tensor of a fixed training batch, for the dead-unit probe (None: the batch has none)."""
        batch = self.source.probe(256)
        return batch[0] if isinstance(batch, tuple) and len(batch) == 2 else None

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
        src = self.source
        return src.epoch + (1 if src.epoch_done and not getattr(src, "exhausted", False) else 0)

    @property
    def planned_steps(self) -> int | None:
        """Optimizer steps the run will take (None: no end set)."""
        return planned_steps(self.cfg, data_size(self.train_data), getattr(self.source, "batches_per_epoch", None))

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
            raise TrainingFailed(f"training failed in {loop.failed_in}: "
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
    def fixed_controls(self) -> dict[str, str]:
        """Controls this run cannot change, with the reason (the batch size of data a loader batches)."""
        return {"batch_size": self.facts.fixed} if self.facts.fixed else {}

    @property
    def eval_names(self) -> list[str]:
        """Every metric the evaluations record: val_loss, val_acc, then the others (workbench.evalmetrics)."""
        return self.runlog.eval_names

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
        sps, c, world = samples_per_s(self.runlog.steps.tail(RATE_TAIL, RATE_COLUMNS), self.status), self.controls, \
            self.dist.world if self.dist else 1
        return {"status": self.status, "step": self.step_count, "epoch": int(epoch) if math.isfinite(epoch) else 0,
                "train_loss": last.get("train_loss"), "lr": last.get("lr"), "samples_per_s": sps,
                "total_steps": self.planned_steps, "controls": c.state_dict(),
                "last_eval": dict(self.last_eval), "run_dir": str(self.run_dir), "world_size": world,
                **cost.projection(sps, self.step_count, self.planned_steps, c.batch_size * c.accumulate * world,
                                  self.flops_per_sample)}  # eta_s, flops_per_sample, flop_s (workbench.cost)

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
        data set, else what this run was given; for a fork, copies of its model, optimizer and scheduler,
        made in one go so that the copies refer to each other."""
        given = self._own.given()
        if self._own_model:
            given.update(model=self.model, loss_fn=self.loss_fn, task=self.task)
        if copy_model and (self._own_model or "optimizer" in given or "schedule" in given):
            instance = "schedule" in given and not callable(given["schedule"])  # an LRScheduler, not a factory
            sched = self.lr_control.scheduler if instance else None
            model, opt, sched_copy = copy_training(self.model, self._optimizer, sched)
            if self._own_model:
                given["model"] = model
            if "optimizer" in given or sched is not None:
                given["optimizer"] = opt
            if sched is not None:
                given["schedule"] = sched_copy
        return given

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
