"""The run directory: where a training run keeps everything another process needs to watch and steer it.

Layout::

    <run_dir>/config.yaml     the run's configuration
    <run_dir>/run.db          SQLite (WAL): metrics, event log, control inbox, checkpoints, metadata
    <run_dir>/tb/             TensorBoard event files
    <run_dir>/checkpoints/    checkpoint files

The trainer process writes ``run.db`` from a background thread; a dashboard in another process reads it
(read-only connections are fine while the trainer writes, thanks to WAL) and posts control requests to the
inbox, which the trainer applies and resolves. One job per module: ``schema`` (tables, types, JSON),
``store`` (``RunDB``), ``tb`` (``TBWriter``), ``listing`` (run folders).
"""
from __future__ import annotations

from .listing import list_runs, new_run_dir
from .schema import (CHECKPOINT_COLUMNS, DB_NAME, EVAL_COLUMNS, EVENT_COLUMNS, LAYER_COLUMNS, LIST_RUNS_COLUMNS,
                     STEP_COLUMNS, to_jsonable)
from .store import RunDB
from .tb import TBWriter

__all__ = ["RunDB", "TBWriter", "list_runs", "new_run_dir", "STEP_COLUMNS", "EVAL_COLUMNS", "LAYER_COLUMNS",
           "EVENT_COLUMNS", "CHECKPOINT_COLUMNS", "LIST_RUNS_COLUMNS", "DB_NAME", "to_jsonable"]
