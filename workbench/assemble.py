"""Putting a Trainer together: from a config and what the user brought to the run's parts and collaborators.

The order matters and is this: the parts a config resolves to (workbench.build), the data source, the
optimizer and its lr control, the stateful parts a checkpoint holds (in ``checkpoint.STATE_KEYS`` order),
then the collaborators that use them: the loop, the record, diagnosis, checkpoints, good states.
"""
from __future__ import annotations

import os
import time
from typing import Any

from . import checkpoint as ck
from . import cost, distributed, pacing
from .batches import StepContract
from .build import EarlyStopping, Own, ScalerHolder, build_parts, n_classes
from .checkpointing import Checkpointer
from .config import TrainConfig
from .controls import Controls
from .diagnosis import Diagnoser, default_detectors
from .evalmetrics import EvalMetrics, check_metrics, ignore_index_of
from .hooks import HookRegistry
from .loaders import data_size, kind_of, make_source
from .loop import Loop
from .optim import LRControl, check_optimizer, make_optimizer
from .recorder import Recorder
from .requests import RunFacts
from .rollback import GoodStates
from .rundir import RunDB, TBWriter
from .rundir.lock import RunLock
from .runlog import RunLog
from .sampler import BatchFetcher
from .watch import Watch


def assemble(tr: Any, cfg: TrainConfig, own: Own, *, resuming: bool) -> None:
    """Build every part of ``tr`` (a Trainer) from ``cfg`` and ``own``; the run directory is made here."""
    tr.dist = distributed.current()  # None outside torchrun; rank > 0 builds in a private folder
    p = build_parts(tr.dist.rank_config(cfg) if tr.dist else cfg, own)
    tr.cfg = cfg = p.cfg
    tr.device, tr.task, tr.data_info = p.device, p.task, p.data_info
    tr.model, tr.loss_fn, tr.train_data, tr.val_data = p.model, p.loss_fn, p.train_data, p.val_data
    tr._own, tr._own_model, tr.collate_fn = own, p.own_model, own.collate_fn
    tr.run_dir, tr.checkpoint_dir = p.run_dir, p.run_dir / "checkpoints"
    tr.run_lock = RunLock(tr.run_dir)  # one trainer per run directory, before anything is written there
    try:
        _build(tr, p, own, resuming)
    except BaseException:
        tr.run_lock.release()  # bad input found while building: the directory is free for the next try
        db = getattr(tr, "db", None)
        if db is not None:
            db.close()
        raise


def _build(tr: Any, p: Any, own: Own, resuming: bool) -> None:
    cfg = p.cfg
    # the stateful parts, each with state_dict/load_state_dict; a checkpoint holds them all
    tr.params = [q for q in tr.model.parameters() if q.requires_grad]
    names = [n for n, q in tr.model.named_parameters() if q.requires_grad]
    sourced = tr.dist.source if tr.dist else make_source  # under torchrun: this rank's shard
    tr.source = sourced(tr.train_data, tr.device, seed=cfg.seed, batch_size=cfg.batch_size,
                        collate_fn=own.collate_fn, max_epochs=cfg.max_epochs)
    tr._optimizer = make_optimizer(cfg, own.optimizer, tr.params)
    check_optimizer(tr._optimizer, tr.model)
    tr.lr_control = LRControl(tr._optimizer, own.schedule, cfg=cfg, planned_steps=tr.planned_steps)
    if own.optimizer is not None:  # the user's optimizer sets the base lr and weight decay the run starts at
        decay = float(tr._optimizer.param_groups[0].get("weight_decay", 0.0))
        cfg = tr.cfg = cfg.replace(lr=tr.lr_control.base, weight_decay=decay)
    cfg.to_yaml(tr.run_dir / "config.yaml", extra={"seed": cfg.seed, "device": str(tr.device),
                                                    "precision": p.precision, "versions": ck.library_versions()})
    tr.db = RunDB(tr.run_dir / "run.db")
    existing = None if resuming else tr.db.last_step()
    if existing is not None:
        raise ValueError(f"run_dir: {tr.run_dir} already holds a run (up to step {existing}); allowed: a new "
                         f"folder, or Trainer.from_checkpoint({str(tr.run_dir)!r}) to continue it")
    tr.controls = Controls.from_config(cfg, precision=p.precision)
    tr.scaler = ScalerHolder(tr.device.type, p.precision)
    tr.early_stopping = EarlyStopping(cfg.early_stopping_patience, cfg.monitor_mode, cfg.min_delta)
    diagnoser = Diagnoser(default_detectors(cfg.diagnosis_options))
    parts = {"model": tr.model, "optimizer": tr._optimizer, "schedule": tr.lr_control, "scaler": tr.scaler,
             "controls": tr.controls, "sampler": tr.source,
             "rng": distributed.DistributedRNG(tr.dist) if tr.dist else ck.RNGState(),
             "early_stopping": tr.early_stopping, "detectors": diagnoser}
    tr.contract = StepContract(loss_fn=tr.loss_fn, step_fn=own.step_fn, output_key=own.output_key,
                               target_key=own.target_key)
    tr.eval_metrics = EvalMetrics(classification=tr.task == "classification", user=check_metrics(own.metrics),
                                  ignore_index=ignore_index_of(tr.loss_fn))
    tr.eval_metrics.check_monitor(cfg.monitor)
    tr.val_fetcher = None
    if tr.val_data is not None and kind_of(tr.val_data) == "map":
        if len(tr.val_data):
            tr.val_fetcher = BatchFetcher(tr.val_data, tr.device, own.collate_fn)
        else:
            tr.val_data = None  # an empty validation set: no evaluations
    tr.facts = RunFacts(n_train=data_size(tr.train_data), device=tr.device, find_alert=diagnoser.find,
                        fixed=tr.source.batch_size_fixed)

    # the collaborators: the loop, the record of the run, diagnosis, checkpoints, good states, hooks
    tr._loop = loop = Loop(tr)
    tr.hooks = HookRegistry(loop.hook_failed)
    recorder = Recorder(tr.db, TBWriter(tr.run_dir / "tb") if cfg.tensorboard else None,
                        on_inbox=loop.inbox_request, on_error=loop.recorder_failed, pacer=pacing.default_pacer())
    tr.runlog = RunLog(recorder, names, on_value=lambda *v: tr.watch.see(*v))
    n_cls = tr.data_info.get("n_classes") if tr.data_info else n_classes(tr.train_data, tr.task)
    tr.watch = Watch(diagnoser, cfg, tr.runlog, loop, model=tr.model,
                     facts=lambda: {"task": tr.task, "n_classes": n_cls, "planned_steps": tr.planned_steps,
                                    "controls": tr.controls.state_dict()},
                     probe_batch=tr.probe_input,
                     on_alert=lambda a: tr.hooks.fire("alert", lambda: loop.context("alert", {}, data=a.to_dict())))
    tr.checkpointer = Checkpointer(cfg, parts, tr.db, tr.checkpoint_dir, position=lambda: (loop.step_count, tr.epoch),
                                   last_eval=lambda: tr.runlog.last_eval, flush=tr.runlog.flush,
                                   event=loop.log_event, on_save=loop.saved,
                                   persist=lambda: recorder.flush(paced=True))  # paced: it shares the GIL with steps
    tr.good_states = GoodStates(cfg.good_states, parts, tr.controls, lr_factor=cfg.rollback_lr_factor,
                                device=tr.device, folder=tr.checkpoint_dir, wait_for_saves=tr.checkpointer.wait,
                                after_load=loop.after_load, event=loop.log_event)
    if cfg.checkpoint_every:
        tr.checkpointer.writer.start()  # a writer process imports torch (~1 s): ready for the first save
    if "started" not in tr.db.meta():
        tr.db.set_meta(started=time.time())
    fixed = {"batch_size": tr.source.batch_size_fixed} if tr.source.batch_size_fixed else {}
    tr.db.set_meta(n_train=data_size(tr.train_data), total_steps=tr.planned_steps,
                   controls=tr.controls.state_dict(), status="idle", dataset=cfg.dataset, model=cfg.model,
                   seed=cfg.seed, device=str(tr.device), task=tr.task, pid=os.getpid(), layer_names=names,
                   fixed_controls=fixed)
    tr.flops_per_sample = cost.flops_per_sample(tr.model, tr.params, tr.source.probe(2))  # None: not estimated
    tr.db.set_meta(flops_per_sample=tr.flops_per_sample)
    tr.train_model = tr.model  # what the loop steps through: DDP around the model under torchrun
    if tr.dist:
        tr.dist.attach(tr)
