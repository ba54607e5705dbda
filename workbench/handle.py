"""The run handle: what a view needs from a run, whether the run trains in this process or in another one.

The dashboard reads and steers every run through a :class:`RunHandle` (the notebook panel and the CLI hold the
``Trainer`` of their own process, whose API the handle mirrors). Two implementations:

* :class:`LocalRun` wraps a ``Trainer`` of this process: reads come from its memory, requests go to its queue;
* :class:`RemoteRun`, a :class:`workbench.runview.RunView`, reads a run directory another process writes, and
  posts requests to the run's inbox, which that process's trainer checks and applies.

``open_run(run_dir)`` gives the right one: the trainer this process registered for the directory (see
workbench.registry), else a shared ``RemoteRun`` of it. Either way a request returns a :class:`Ticket` that says
when the trainer applied it, or why it refused. ``launch``, ``resume`` and ``fork`` start a run in this
process and register it, so every view of the process (every dashboard session) finds it.
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import pandas as pd

from . import registry
from .requests import ENDED, RunFacts, make_request
from .runs import owner, pid_alive
from .runview import RunView, newest_first, read_config


class Ticket(Protocol):
    """A request's fate: ``state()`` gives status (pending, applied, refused), step and message."""

    def state(self) -> dict[str, Any]: ...
    def wait(self, timeout: float | None = None) -> "Ticket": ...


class RunHandle(Protocol):
    """What a view reads of a run and asks of it."""

    run_dir: Path

    def refresh(self) -> Any: ...
    def snapshot(self) -> dict[str, Any]: ...
    def series(self, y: str, n_out: int = 2000) -> tuple[np.ndarray, np.ndarray]: ...
    @property
    def history(self) -> pd.DataFrame: ...
    @property
    def evals(self) -> pd.DataFrame: ...
    @property
    def eval_names(self) -> list[str]: ...
    @property
    def fixed_controls(self) -> dict[str, str]: ...
    @property
    def layer_history(self) -> pd.DataFrame: ...
    @property
    def events(self) -> pd.DataFrame: ...
    @property
    def checkpoints(self) -> pd.DataFrame: ...
    @property
    def config(self) -> dict[str, Any]: ...
    def alert_list(self) -> list[dict[str, Any]]: ...
    def health(self) -> dict[str, Any]: ...
    def owner(self) -> dict[str, Any]: ...
    def ask(self, action: str, args: Mapping[str, Any] | None = None, source: str = "dashboard") -> Any: ...


class LocalTicket:
    """The fate of a request to a trainer of this process."""

    def __init__(self, request: Any) -> None:
        self.request = request

    def state(self) -> dict[str, Any]:
        r = self.request
        return {"status": r.status, "step": r.step, "message": r.message}

    def wait(self, timeout: float | None = None) -> "LocalTicket":
        self.request.wait(timeout)
        return self


class InboxTicket:
    """The fate of a request posted to a run directory's inbox."""

    def __init__(self, view: RunView, request_id: int) -> None:
        self.view, self.id = view, request_id

    def state(self) -> dict[str, Any]:
        rec = self.view.request(self.id)
        return {"status": rec["status"], "step": rec["step"], "message": rec["message"]}

    def wait(self, timeout: float | None = None) -> "InboxTicket":
        self.view.wait(self.id, 10.0 if timeout is None else timeout)
        return self


class LocalRun:
    """A Trainer of this process, seen through the run handle."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.run_dir = Path(trainer.run_dir)

    def refresh(self) -> None:
        """Nothing to fetch: the trainer's record is in memory."""

    def snapshot(self) -> dict[str, Any]:
        return self.trainer.snapshot()

    def series(self, y: str, n_out: int = 2000) -> tuple[np.ndarray, np.ndarray]:
        return self.trainer.series(y, n_out)

    @property
    def history(self) -> pd.DataFrame:
        return self.trainer.history

    @property
    def evals(self) -> pd.DataFrame:
        return self.trainer.evals

    @property
    def eval_names(self) -> list[str]:
        return self.trainer.eval_names

    @property
    def fixed_controls(self) -> dict[str, str]:
        return self.trainer.fixed_controls

    @property
    def layer_history(self) -> pd.DataFrame:
        return self.trainer.layer_history

    @property
    def events(self) -> pd.DataFrame:
        return self.trainer.events

    @property
    def checkpoints(self) -> pd.DataFrame:
        return self.trainer.checkpoints

    @property
    def config(self) -> dict[str, Any]:
        """The run's config.yaml (it also holds the resolved seed, device and library versions)."""
        saved = read_config(self.run_dir)
        return saved if saved is not None else self.trainer.cfg.to_dict()

    def alert_list(self) -> list[dict[str, Any]]:
        """Every alert, newest first, each with ``open`` (its episode goes on and it is not dismissed)."""
        open_ids = {a.id for a in self.trainer.diagnose()["alerts"]}
        return newest_first(dict(a.to_dict(), open=a.id in open_ids) for a in self.trainer.alerts)

    def health(self) -> dict[str, Any]:
        d = self.trainer.diagnose()
        return {"health": d["health"], "summary": d["summary"]}

    def owner(self) -> dict[str, Any]:
        """Who trains the run (workbench.runs.owner): this process."""
        return owner(self.run_dir)

    def ask(self, action: str, args: Mapping[str, Any] | None = None, source: str = "dashboard") -> LocalTicket:
        return LocalTicket(self.trainer.ask(action, args, source))


class RemoteRun(RunView):
    """A run another process trains (or nobody does), seen through the run handle: a RunView whose requests
    return tickets, and that refuses at once a request nobody would ever pick up."""

    def ask(self, action: str, args: Mapping[str, Any] | None = None, source: str = "dashboard") -> InboxTicket:
        meta = self.meta
        pid = meta.get("pid")
        if meta.get("status") not in ENDED and (pid is None or not pid_alive(pid)):
            raise RuntimeError(f"no process is training this run (its trainer, pid {pid}, is gone); resume it "
                               f"from one of its checkpoints")
        return InboxTicket(self, super().ask(action, args, source))

    def owner(self) -> dict[str, Any]:
        """Who trains the run (workbench.runs.owner), from the metadata this view reads anyway."""
        return owner(self.run_dir, self.meta)


_views: dict[str, RemoteRun] = {}
_views_lock = threading.Lock()


def open_run(run_dir: str | os.PathLike) -> LocalRun | RemoteRun:
    """The handle of ``run_dir``: its Trainer when this process runs it, else the process-wide RemoteRun."""
    tr = registry.get(run_dir)
    if tr is not None:
        return LocalRun(tr)
    k = registry.key(run_dir)
    with _views_lock:
        view = _views.get(k)
        if view is None:
            view = _views[k] = RemoteRun(k)
        return view


def forget(run_dir: str | os.PathLike) -> None:
    """Drop the shared RemoteRun of ``run_dir`` (after this process takes the run over, e.g. resume)."""
    with _views_lock:
        view = _views.pop(registry.key(run_dir), None)
    if view is not None:
        view.close()


def close_all() -> None:
    """Close and forget every shared RemoteRun (tests, a clean exit)."""
    with _views_lock:
        views = list(_views.values())
        _views.clear()
    for v in views:
        v.close()


# ---------------------------------------------------------------------------- runs this process trains
def launch(cfg: Any, paused: bool = False) -> Any:
    """Create a run from ``cfg`` (a TrainConfig; a new directory under its ``runs_root``), register it
    process-wide and start it."""
    from .trainer import Trainer

    tr = Trainer(cfg)
    registry.add(tr)
    tr.start(paused=paused)
    return tr


def _not_training(run_dir: str | os.PathLike) -> None:
    who = owner(run_dir)
    if who["alive"]:
        where = "in this process" if who["where"] == "app" else f"in another process (pid {who['pid']})"
        raise ValueError(f"the run is still going {where}; stop it first, or fork it")


def resume(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None, paused: bool = False) -> Any:
    """Continue a run nobody trains, in its own directory, from ``checkpoint`` (default: its newest intact
    one); the trainer is registered and started in this process."""
    from .trainer import Trainer

    _not_training(run_dir)
    tr = Trainer.from_checkpoint(checkpoint or run_dir)
    if registry.key(tr.run_dir) != registry.key(run_dir):
        tr.db.close()
        raise ValueError(f"checkpoint: {checkpoint} belongs to run {tr.run_dir}, not {run_dir}")
    forget(run_dir)
    registry.add(tr)
    tr.start(paused=paused)
    return tr


def fork(run_dir: str | os.PathLike, checkpoint: str | os.PathLike, controls: Mapping[str, Any],
         runs_root: str | os.PathLike, source: str = "api") -> Any:
    """A new run (a new directory under ``runs_root``) from ``checkpoint`` of ``run_dir`` with ``controls``
    changed, registered and started in this process; it records its parent run and step. A parent this
    process trains lends its own model, data and loss (a copy of the model); any other parent must use the
    built-in ones, which its checkpoint names."""
    from .rundir import new_run_dir
    from .trainer import Trainer

    parent = registry.get(run_dir)
    if controls:  # bad input is refused before a directory or a trainer exists
        facts = parent.facts if parent is not None else RunFacts(n_train=open_run(run_dir).meta.get("n_train"))
        make_request("set", controls, facts, source)
    target = new_run_dir(runs_root, f"{Path(run_dir).name}-fork")
    try:
        if parent is not None:
            child = parent.fork(checkpoint=checkpoint, run_dir=target, source=source, **controls)
        else:
            child = Trainer.from_checkpoint(checkpoint, run_dir=target)
            if controls:
                child.set(source=source, **controls)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    registry.add(child)
    child.start()
    return child
