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
import yaml
from torch.utils.data import Dataset

from . import checkpoint as ck
from .config import TrainConfig
from .rundir import RunDB, new_run_dir


#: The config fields that say what a checkpoint's state *is*: a checkpoint whose values differ from its run's
#: belongs to another run (a file copied in), and resuming from it would silently become that run.
IDENTITY = ("dataset", "dataset_options", "val_fraction", "normalize", "model", "model_options", "loss", "optimizer")


def run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The config a run directory's ``config.yaml`` records (None when it has none, or it cannot be read)."""
    try:
        data = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def foreign(ckpt: Mapping[str, Any], expected: Mapping[str, Any] | None) -> str | None:
    """Why checkpoint ``ckpt`` does not belong to a run whose config is ``expected`` (None: it does)."""
    if not expected:
        return None
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else {}
    diffs = [f"{k}: checkpoint {saved.get(k)!r:.80}, run {expected.get(k)!r:.80}" for k in IDENTITY
             if k in expected and saved.get(k) != expected.get(k)]
    return ("it was saved by a different run (" + "; ".join(diffs) + "), so it was refused") if diffs else None


def _run_of(path: Path) -> Path | None:
    return path.parent.parent if path.parent.name == "checkpoints" else None


def from_checkpoint(cls: type, path_or_run_dir: str | os.PathLike, *, cfg: TrainConfig | Mapping | None = None,
                    run_dir: str | os.PathLike | None = None, model: torch.nn.Module | None = None,
                    train_data: Dataset | None = None, val_data: Dataset | None = None,
                    loss_fn: Callable | None = None, task: str | None = None, **more: Any) -> Any:
    """``Trainer.from_checkpoint``: a Trainer of class ``cls`` restored from a checkpoint file, or from a run
    directory's newest checkpoint that is intact and belongs to it (each newer one that is broken, was saved
    by another run, or does not fit the model is reported and passed over), in that run's directory or
    ``run_dir``."""
    src = Path(path_or_run_dir)
    own = dict(model=model, train_data=train_data, val_data=val_data, loss_fn=loss_fn, task=task, **more)
    warn = lambda m: warnings.warn(m, stacklevel=4)  # noqa: E731
    if src.is_dir():
        folder = src / "checkpoints" if (src / "checkpoints").is_dir() else src
        candidates = [p for _, p in ck.checkpoint_files(folder)]
        if not candidates:
            raise ck.CheckpointError(folder, "no checkpoint files (step-*.pt) in this folder")
    else:
        folder, candidates = None, [src]
    tr, problems = None, []
    path = ckpt = None
    for p in candidates:
        try:
            c = ck.load_checkpoint(p)
            orig = _run_of(p)
            if folder is not None or run_dir is None or (orig is not None and Path(run_dir).resolve() == orig.resolve()):
                expected = run_config(orig) if orig is not None else None
                if expected is None and tr is not None:
                    expected = tr.cfg.to_dict()
                why = foreign(c, expected)
                if why:
                    raise ck.CheckpointError(p, why)
            if tr is None:
                tr = _build(cls, p, c, run_dir, own)
            try:
                tr.load_state_dict(c)
            except (ValueError, KeyError, TypeError) as e:
                raise ck.CheckpointError(p, f"does not fit this run: {e}") from None
            path, ckpt = p, c
            break
        except ck.CheckpointError as e:
            if folder is None:
                _discard(tr)
                raise
            problems.append(str(e))
            warn(f"{e}; falling back to an older checkpoint")
    if ckpt is None:
        _discard(tr)
        raise ck.CheckpointError(folder, "no intact checkpoint of this run: " + "; ".join(problems))
    saved = TrainConfig.from_dict(ckpt["config"])
    if cfg is not None:
        given = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
        diffs = [f"{k}: checkpoint {v!r}, given {getattr(given, k)!r}" for k, v in saved.to_dict().items()
                 if k not in ("run_dir", "runs_root", "name") and getattr(given, k) != v]
        if diffs:
            warnings.warn("config differs from the checkpoint's (the checkpoint's is used): " + "; ".join(diffs),
                          stacklevel=3)
    orig_run = _run_of(path) or Path(saved.run_dir or path.parent)
    resumed = tr.run_dir.resolve() == orig_run.resolve()
    db = tr.db
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
            extra = parent.read_eval_metrics().melt(id_vars="step").dropna().query("step <= @step")
            db.insert_eval_metrics(list(extra.itertuples(index=False, name=None)))
            parent.close()
        lineage = {"parent_run": str(orig_run), "parent_step": step, "parent_checkpoint": str(path)}
        db.set_meta(**lineage)
    tr.watch.baseline(tr.runlog.load(db))
    tr.log_event("resume" if resumed else "fork", "api", {"checkpoint": str(path), "step": step, **lineage},
                 step=step)
    return tr


def _build(cls: type, path: Path, ckpt: Mapping[str, Any], run_dir: str | os.PathLike | None,
           own: Mapping[str, Any]) -> Any:
    """The Trainer a checkpoint continues in: its config, in its run's directory or ``run_dir``."""
    saved = TrainConfig.from_dict(ckpt["config"])
    orig_run = _run_of(path) or Path(saved.run_dir or path.parent)
    target = Path(run_dir) if run_dir is not None else orig_run
    return cls(saved.replace(run_dir=str(target)), **own, _resuming=True)


def _discard(tr: Any) -> None:
    """A Trainer built for a resume that cannot go on: its directory is let go at once."""
    if tr is not None:
        tr.db.close()
        tr.run_lock.release()


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
