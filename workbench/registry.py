"""Process-wide registry of the trainers a long-lived view (the dashboard) started in its own process.

A Streamlit session is one browser tab; its ``session_state`` dies with the tab. Trainers started from
the dashboard must outlive it: a reload or a second tab has to find the same runs, and closing a tab
must not end a run. So they live here, in a module-level table keyed by the run directory's resolved
path, shared by every session of the process. Nothing here imports streamlit or torch.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps this module light
    from .trainer import Trainer

_lock = threading.RLock()
_trainers: dict[str, "Trainer"] = {}
_once: set[str] = set()


def key(run_dir: str | os.PathLike) -> str:
    """The registry key of a run directory: its absolute, resolved path as a string."""
    return str(Path(run_dir).expanduser().resolve())


def add(trainer: "Trainer") -> "Trainer":
    """Register ``trainer`` under its run directory and return it.

    A trainer already registered for the same directory is replaced only when its thread has ended
    (a resumed run continues in the same directory); replacing a live one is refused.
    """
    k = key(trainer.run_dir)
    with _lock:
        old = _trainers.get(k)
        if old is not None and old is not trainer and old.is_alive:
            raise ValueError(f"run {k}: a trainer is still running there in this process (status {old.status}); "
                             f"stop it first")
        _trainers[k] = trainer
    return trainer


def get(run_dir: str | os.PathLike) -> "Trainer | None":
    """The trainer this process holds for ``run_dir``, or None (the run lives in another process or none)."""
    with _lock:
        return _trainers.get(key(run_dir))


def trainers() -> dict[str, "Trainer"]:
    """A copy of the table: {resolved run dir: trainer}."""
    with _lock:
        return dict(_trainers)


def remove(run_dir: str | os.PathLike) -> "Trainer | None":
    """Forget the trainer of ``run_dir`` (it is not stopped); returns it, or None."""
    with _lock:
        return _trainers.pop(key(run_dir), None)


def once(name: str) -> bool:
    """True the first time it is called with ``name`` in this process, False after (e.g. start the demo once)."""
    with _lock:
        if name in _once:
            return False
        _once.add(name)
        return True


def stop_all(timeout: float = 30.0, under: str | os.PathLike | None = None) -> list[str]:
    """Stop every live registered trainer (only those whose run dir is inside ``under`` when given), wait
    for them, and forget them. Returns the run dirs stopped. For tests and a clean process exit."""
    root = key(under) if under is not None else None
    with _lock:
        chosen = {k: t for k, t in _trainers.items() if root is None or Path(k).is_relative_to(root)}
    for t in chosen.values():
        if t.is_alive:
            t.stop(source="dashboard")
    for k, t in chosen.items():
        try:
            t.join(timeout)
        except Exception:  # noqa: BLE001 - a failed run is still stopped; its error is in its event log
            pass
        with _lock:
            if _trainers.get(k) is t:
                del _trainers[k]
    return list(chosen)
