"""Live controls: validation in the caller's thread, requests the trainer applies at a step boundary.

The path of a change: a view (or script) calls ``Trainer.set(...)`` -> ``validate_controls`` checks
it at once and raises on bad input -> a ``Request`` is queued -> the trainer thread applies it
between two optimizer steps (``Trainer._apply_request``) -> the change is written to the event log
with its step and source, and the request is marked applied (or refused, with the reason).
"""
from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .config import PRECISIONS, check_choice, check_int, check_number

CONTROL_NAMES = ("lr", "batch_size", "precision", "grad_clip", "accumulate", "weight_decay")
SOURCES = ("api", "notebook", "dashboard", "cli", "policy")
ACTIONS = ("set", "pause", "resume", "step", "stop", "checkpoint", "rollback", "dismiss")

_precision_cache: dict[tuple[str, str], str | None] = {}


def precision_problem(device: torch.device, precision: str) -> str | None:
    """None when ``precision`` works on ``device``, else a sentence saying why not.

    Checked by running a tiny autocast matmul once per (device, precision), since support depends on
    the hardware and the torch build rather than on anything a table could list.
    """
    if precision == "fp32":
        return None
    key = (str(device), precision)
    if key not in _precision_cache:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        reason = None
        if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
            reason = f"this GPU ({torch.cuda.get_device_name(device)}) does not support bf16"
        else:
            try:
                a = torch.ones(4, 4, device=device)
                with torch.autocast(device.type, dtype=dtype):
                    out = a @ a
                if out.dtype != dtype:
                    reason = f"autocast on {device.type} does not produce {precision}"
            except Exception as e:  # noqa: BLE001 - any failure means "not supported here"
                reason = f"{precision} autocast fails on {device.type}: {e}"
        _precision_cache[key] = reason
    return _precision_cache[key]


def resolve_precision(device: torch.device, precision: str) -> str:
    """Turn ``auto`` into bf16 where the GPU supports it, else fp32; pass others through."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def validate_controls(changes: Mapping[str, Any], *, n_train: int, device: torch.device) -> dict[str, Any]:
    """Check live-control values; return them normalised. Raises ValueError/TypeError naming the field.

    Called in the caller's thread, so bad input never reaches the training loop.
    """
    if not changes:
        raise ValueError(f"set: no control given; allowed: {', '.join(CONTROL_NAMES)}")
    unknown = [k for k in changes if k not in CONTROL_NAMES]
    if unknown:
        raise ValueError(f"set: unknown control(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(CONTROL_NAMES)}")
    out: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "lr":
            out[name] = check_number("lr", value, positive=True)
        elif name == "batch_size":
            out[name] = check_int("batch_size", value, minimum=1, maximum=n_train)
        elif name == "precision":
            p = resolve_precision(device, check_choice("precision", value, PRECISIONS))
            problem = precision_problem(device, p)
            if problem:
                raise ValueError(f"precision: got {value!r}, which this device cannot run ({problem}); "
                                 f"allowed here: {', '.join(q for q in ('fp32', 'bf16', 'fp16') if not precision_problem(device, q))}")
            out[name] = p
        elif name == "grad_clip":
            out[name] = check_number("grad_clip", value, positive=True, allow_none=True)
        elif name == "accumulate":
            out[name] = check_int("accumulate", value, minimum=1, maximum=1024)
        elif name == "weight_decay":
            out[name] = check_number("weight_decay", value, minimum=0.0)
    return out


@dataclass
class Controls:
    """The controls in force. ``lr`` is the base (peak) LR that the schedule multiplies."""

    lr: float
    batch_size: int
    precision: str
    grad_clip: float | None
    accumulate: int
    weight_decay: float

    def state_dict(self) -> dict[str, Any]:
        # the fields are plain values: a shallow dict (dataclasses.asdict deep-copies, ~40 us)
        return {k: getattr(self, k) for k in CONTROL_NAMES}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in CONTROL_NAMES:
            setattr(self, k, state[k])


_ids = itertools.count(1)


@dataclass
class Request:
    """A queued change or command. ``wait()`` blocks until the trainer applied or refused it."""

    action: str
    controls: dict[str, Any] = field(default_factory=dict)
    source: str = "api"
    n: int = 1
    tag: str | None = None
    inbox_id: int | None = None     # id in the run's SQLite inbox when it came from another process
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.time)
    status: str = "pending"         # pending, applied, refused
    step: int | None = None         # the first step that runs with the change
    message: str = ""
    result: Any = None
    on_done: Callable[["Request"], None] | None = field(default=None, repr=False, compare=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def resolve(self, status: str, step: int | None, message: str = "", result: Any = None) -> None:
        self.status, self.step, self.message, self.result = status, step, message, result
        self._done.set()
        if self.on_done is not None:
            self.on_done(self)

    def wait(self, timeout: float | None = None) -> "Request":
        """Block until the trainer has handled the request (or ``timeout`` seconds pass)."""
        self._done.wait(timeout)
        return self

    @property
    def done(self) -> bool:
        return self._done.is_set()


def check_source(source: str) -> str:
    """Sources name who asked for a change in the event log."""
    return check_choice("source", source, SOURCES)


def same_value(a: Any, b: Any) -> bool:
    """Equality that treats two NaNs as equal (for "did this control change")."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b
