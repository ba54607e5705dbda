"""Continuing a run: resume it in its own directory, or fork it into a new one, from a checkpoint.

A resumed run appends to its history (rows logged after the checkpoint's step are dropped first); a fork
starts a new directory that copies its parent's history up to the fork's step and records its lineage.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.utils.data import Dataset

from . import checkpoint as ck
from .config import TrainConfig
from .rundir import RunDB, new_run_dir


def from_checkpoint(cls: type, path_or_run_dir: str | os.PathLike, *, cfg: TrainConfig | Mapping | None = None,
                    run_dir: str | os.PathLike | None = None, model: torch.nn.Module | None = None,
                    train_data: Dataset | None = None, val_data: Dataset | None = None,
                    loss_fn: Callable | None = None, task: str | None = None) -> Any:
    """``Trainer.from_checkpoint``: a Trainer of class ``cls`` restored from a checkpoint file, or from a run
    directory's newest intact checkpoint, in that run's directory or ``run_dir``."""
    src = Path(path_or_run_dir)
    if src.is_dir():
        folder = src / "checkpoints" if (src / "checkpoints").is_dir() else src
        path, ckpt = ck.newest_intact(folder, warn=lambda m: warnings.warn(m, stacklevel=4))
    else:
        path, ckpt = src, ck.load_checkpoint(src)
    saved = TrainConfig.from_dict(ckpt["config"])
    if cfg is not None:
        given = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
        diffs = [f"{k}: checkpoint {v!r}, given {getattr(given, k)!r}" for k, v in saved.to_dict().items()
                 if k not in ("run_dir", "runs_root", "name") and getattr(given, k) != v]
        if diffs:
            warnings.warn("config differs from the checkpoint's (the checkpoint's is used): " + "; ".join(diffs),
                          stacklevel=3)
    orig_run = path.parent.parent if path.parent.name == "checkpoints" else Path(saved.run_dir or path.parent)
    target = Path(run_dir) if run_dir is not None else orig_run
    resumed = target.resolve() == orig_run.resolve()
    tr = cls(saved.replace(run_dir=str(target)), model=model, train_data=train_data, val_data=val_data,
             loss_fn=loss_fn, task=task, _resuming=True)
    db = tr.db
    try:
        tr.load_state_dict(ckpt)
    except (ValueError, KeyError, TypeError) as e:
        db.close()
        raise ck.CheckpointError(path, f"does not fit this run: {e}") from None
    step = tr.step_count
    lineage: dict[str, Any] = {}
    if resumed:
        db.delete_after(step)
        db.set_meta(status="idle", resumed_from=str(path), resumed_at=step)
    else:
        if (orig_run / "run.db").exists():
            parent = RunDB(orig_run / "run.db", readonly=True)
            db.insert_steps(parent.read_steps().query("step <= @step").to_dict("records"))
            db.insert_evals(parent.read_evals().query("step <= @step").to_dict("records"))
            parent.close()
        lineage = {"parent_run": str(orig_run), "parent_step": step, "parent_checkpoint": str(path)}
        db.set_meta(**lineage)
    tr.watch.baseline(tr.runlog.load(db))
    tr.log_event("resume" if resumed else "fork", "api", {"checkpoint": str(path), "step": step, **lineage},
                 step=step)
    return tr


def fork(parent: Any, checkpoint: str | os.PathLike | None, run_dir: str | os.PathLike | None, source: str,
         controls: Mapping[str, Any]) -> Any:
    """``Trainer.fork``: a child run from ``checkpoint`` of ``parent`` (a Trainer; default: its newest
    checkpoint), not yet started, with ``controls`` changed."""
    if checkpoint is None:
        parent.checkpointer.wait()
        table = parent.checkpoints
        if table.empty:
            raise ValueError("fork: this run has no checkpoint yet; call save_checkpoint() first")
        checkpoint = table.sort_values(["step", "time"]).iloc[-1]["path"]
    if run_dir is None:
        run_dir = new_run_dir(parent.cfg.runs_root, f"{parent.run_dir.name}-fork")
    child = type(parent).from_checkpoint(checkpoint, run_dir=run_dir, **parent.own_objects(copy_model=True))
    if controls:
        child.set(source=source, **controls)
    return child
