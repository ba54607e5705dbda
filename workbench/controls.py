"""Live controls: what each one is, how its value is checked, and the values in force.

``CONTROLS`` is the one list the views build their control forms from (the notebook panel, the dashboard
and the CLI offer the same ones); ``validate_controls`` checks values in the caller's thread, so bad input
never reaches the training loop (see workbench.requests for the path a change travels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .config import PRECISIONS, check_choice, check_int, check_number


@dataclass(frozen=True)
class ControlSpec:
    """One live control: how a view shows it, how a value is checked, and what changing it does.

    ``check(value, n_train, device)`` returns the value normalised or raises naming the field and what is
    allowed (``n_train`` and ``device`` may be None for a run in another process: its trainer checks again).
    ``apply(trainer, value)`` is what the change does beside storing the value in ``Trainer.controls``; the
    loop reads the stored value at every step, so most controls need nothing more. Its starting value is the
    ``TrainConfig`` field of the same name.
    """

    name: str
    label: str
    kind: str                      # number, integer, choice or optional number (empty: off)
    help: str
    check: Callable[[Any, "int | None", "torch.device | None"], Any]
    apply: Callable[[Any, Any], None] | None = None
    choices: tuple[str, ...] = ()


def _check_lr(value: Any, n_train: int | None, device: torch.device | None) -> float:
    return check_number("lr", value, positive=True)


def _check_batch_size(value: Any, n_train: int | None, device: torch.device | None) -> int:
    return check_int("batch_size", value, minimum=1, maximum=n_train)


def _check_accumulate(value: Any, n_train: int | None, device: torch.device | None) -> int:
    return check_int("accumulate", value, minimum=1, maximum=1024)


def _check_precision(value: Any, n_train: int | None, device: torch.device | None) -> str:
    p = check_choice("precision", value, PRECISIONS)
    if device is None:
        return p
    p = resolve_precision(device, p)
    problem = precision_problem(device, p)
    if problem:
        runnable = ", ".join(q for q in ("fp32", "bf16", "fp16") if not precision_problem(device, q))
        raise ValueError(f"precision: got {value!r}, which this device cannot run ({problem}); allowed here: "
                         f"{runnable}")
    return p


def _check_grad_clip(value: Any, n_train: int | None, device: torch.device | None) -> float | None:
    return check_number("grad_clip", value, positive=True, allow_none=True)


def _check_weight_decay(value: Any, n_train: int | None, device: torch.device | None) -> float:
    return check_number("weight_decay", value, minimum=0.0)


def _apply_precision(tr: Any, value: str) -> None:
    tr.scaler.use(value)  # a GradScaler for fp16 only


def _apply_lr(tr: Any, value: float) -> None:
    tr.lr_control.set_base(value)  # every param group in proportion; a user's scheduler rescaled (workbench.optim)


def _apply_weight_decay(tr: Any, value: float) -> None:
    tr.lr_control.set_weight_decay(value)  # groups made without decay beside decaying ones stay at 0


CONTROLS: tuple[ControlSpec, ...] = (
    ControlSpec("lr", "Learning rate (base)", "number", "The base (peak) learning rate; the schedule multiplies it",
                _check_lr, _apply_lr),
    ControlSpec("batch_size", "Batch size", "integer", "Samples per micro-batch; every sample is still seen once "
                                                       "per epoch", _check_batch_size),
    ControlSpec("accumulate", "Accumulate", "integer", "Micro-batches per optimizer step", _check_accumulate),
    ControlSpec("precision", "Precision", "choice", "Autocast dtype of the forward pass", _check_precision,
                _apply_precision, ("fp32", "bf16", "fp16")),
    ControlSpec("grad_clip", "Grad clip", "optional number", "Max global grad norm; empty = off", _check_grad_clip),
    ControlSpec("weight_decay", "Weight decay", "number", "The optimizer's weight decay (decoupled for adamw)",
                _check_weight_decay, _apply_weight_decay),
)
SPECS: dict[str, ControlSpec] = {c.name: c for c in CONTROLS}
CONTROL_NAMES: tuple[str, ...] = tuple(SPECS)

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


def validate_controls(changes: Mapping[str, Any], *, n_train: int | None,
                      device: torch.device | None) -> dict[str, Any]:
    """Check live-control values; return them normalised. Raises ValueError/TypeError naming the field.

    Called in the caller's thread, so bad input never reaches the training loop. ``n_train`` bounds the
    batch size; ``device`` decides which precisions run (None: any precision name passes, and the trainer
    of a run in another process decides).
    """
    if not changes:
        raise ValueError(f"set: no control given; allowed: {', '.join(CONTROL_NAMES)}")
    unknown = [k for k in changes if k not in SPECS]
    if unknown:
        raise ValueError(f"set: unknown control(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(CONTROL_NAMES)}")
    return {name: SPECS[name].check(value, n_train, device) for name, value in changes.items()}


class Controls:
    """The controls in force, one attribute per row of ``CONTROLS`` (``lr`` is the base LR that the schedule
    multiplies); a checkpoint holds them all."""

    def __init__(self, **values: Any) -> None:
        missing = [n for n in CONTROL_NAMES if n not in values]
        unknown = [n for n in values if n not in SPECS]
        if missing or unknown:
            raise TypeError(f"Controls: missing {missing}, unknown {unknown}; allowed: {', '.join(CONTROL_NAMES)}")
        for name in CONTROL_NAMES:
            setattr(self, name, values[name])

    @classmethod
    def from_config(cls, cfg: Any, **resolved: Any) -> "Controls":
        """The starting controls: each one's config field, or the value in ``resolved`` (a precision the
        device resolved from ``auto``)."""
        return cls(**{n: resolved[n] if n in resolved else getattr(cfg, n) for n in CONTROL_NAMES})

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in CONTROL_NAMES}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in CONTROL_NAMES:
            setattr(self, k, state[k])

    def __repr__(self) -> str:
        return "Controls(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in CONTROL_NAMES) + ")"


def same_value(a: Any, b: Any) -> bool:
    """Equality that treats two NaNs as equal (for "did this control change")."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b
