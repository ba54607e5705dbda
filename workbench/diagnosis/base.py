"""The detector contract and the read-only signals detectors look at.

A detector is a small class: ``kind``, a schedule (``every`` steps, or ``on_eval``), and ``check(signals)``
that returns an Alert or None. Counters live in the instance and are reset in ``reset()``; everything
that must survive a resume is in ``state_dict()``. Detectors read the metric store, never the model
(the dead-unit instrument is the one exception, through ``Signals.probe_activations``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .alert import Alert


@dataclass
class Signals:
    """What detectors may read at a check: recent history, evals, latest per-layer stats, run facts."""

    step: int
    history: Mapping[str, np.ndarray]          # last W rows: step, train_loss, grad_norm, lr, precision codes
    evals: Mapping[str, np.ndarray]            # all evals so far (few): step, val_loss, val_acc
    layers: Mapping[str, np.ndarray] | None    # latest layer stats: name (array of str), grad_norm, param_norm, update_ratio
    task: str
    n_classes: int | None
    planned_steps: int | None
    controls: Mapping[str, Any]
    initial_loss: float | None                  # the starting loss (baseline; see ``LossTrack.baseline``)
    probe_activations: Callable[..., dict[str, np.ndarray]] | None = None  # (part=0, parts=1)
    extra: dict[str, Any] = field(default_factory=dict)
    track: "LossTrack | None" = None            # the whole run's first loss, peak and the low before it
    flow: frozenset[str] | None = None          # the weight matrices gradient-flow checks compare (None: all)

    @property
    def lr_now(self) -> float:
        """The lr in force: the scheduled lr of the last step (the base lr ``controls["lr"]`` before any)."""
        lr = self.history["lr"] if "lr" in self.history else None
        if lr is not None and len(lr) and math.isfinite(float(lr[-1])):
            return float(lr[-1])
        return float(self.controls["lr"])

    @property
    def base_lr(self) -> float:
        """The base (peak) lr a schedule multiplies: the value an lr action sets."""
        return float(self.controls["lr"])

    @property
    def chance_loss(self) -> float | None:
        """Cross-entropy of a uniform guess, log(C): a classifier stuck there has learnt nothing."""
        return math.log(self.n_classes) if self.task == "classification" and self.n_classes else None


class LossTrack:
    """What the whole run's loss did, kept step by step in O(1): the first finite loss, the highest finite
    loss (the peak) with its step and the lowest loss before it. The detectors' history is a window; an
    early blow-up that killed a run can be thousands of steps older than the check that must name it.

    ``baseline(chance)`` is the starting loss detectors compare with: the median of the first ``first_n``
    finite losses, but never above the first finite loss (or the chance level log(C), where higher) — a
    loss that explodes in the first steps must not raise the bar it is measured against."""

    first_n = 10

    def __init__(self) -> None:
        self.first: float | None = None
        self.firsts: list[float] = []
        self.peak, self.peak_step = -math.inf, -1
        self.low, self.low_before_peak = math.inf, math.inf

    def see(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            return
        if self.first is None:
            self.first = loss
        if len(self.firsts) < self.first_n:
            self.firsts.append(loss)
        if loss > self.peak:
            self.peak, self.peak_step, self.low_before_peak = loss, step, min(self.low, loss)
        self.low = min(self.low, loss)

    def baseline(self, chance: float | None = None) -> float | None:
        if len(self.firsts) < 3 or self.first is None:
            return None
        # statistics-free median of a few floats (same value as np.median)
        return min(median(np.asarray(self.firsts)), max(self.first, chance or 0.0))

    def blowup(self) -> float:
        """How far the peak rose above the lowest loss before it, in units of the first loss (0: never rose)."""
        if self.first is None or self.peak_step < 0 or not math.isfinite(self.low_before_peak):
            return 0.0
        return (self.peak - self.low_before_peak) / max(abs(self.first), 1e-12)

    def state_dict(self) -> dict[str, Any]:
        return {"first": self.first, "firsts": list(self.firsts), "peak": self.peak, "peak_step": self.peak_step,
                "low": self.low, "low_before_peak": self.low_before_peak}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, list(v) if k == "firsts" else v)


UNCHANGED = object()
"""Returned by ``check`` when there is no new evidence (e.g. layer stats not refreshed since the last check):
the episode neither continues nor counts as quiet."""


class Detector:
    """Base class: subclasses set ``kind`` and implement ``check``; ``every``/``on_eval`` schedule them."""

    kind: str = ""
    every: int = 10           # run every N steps (0: never on the step schedule)
    on_eval: bool = False     # run after each evaluation
    min_step: int = 0         # stay quiet before this step (warm-up)
    reopen_after: int | None = None  # steps after an alert closed before another may open (None: the diagnoser's)

    def __init__(self, **options: Any) -> None:
        for k, v in options.items():
            if not hasattr(self, k) or k.startswith("_"):
                raise ValueError(f"{type(self).__name__}: unknown option {k!r}")
            setattr(self, k, v)
        self.reset()

    def reset(self) -> None:
        """Counters in one place."""
        self.streak = 0

    def should_check(self, step: int, after_eval: bool) -> bool:
        if step < self.min_step:
            return False
        return (self.on_eval and after_eval) or (not self.on_eval and self.every > 0 and step % self.every == 0)

    def check(self, s: Signals) -> Any:  # pragma: no cover - abstract (Alert, None or UNCHANGED)
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if isinstance(v, (int, float, str, bool, type(None)))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class LayerDetector(Detector):
    """A detector that reads per-layer stats: it judges each new layer snapshot once.

    ``check`` returns UNCHANGED until the trainer records a newer snapshot (every ``layer_every`` steps),
    then calls ``judge(signals, layers)`` with the weight-matrix rows only.
    """

    def reset(self) -> None:
        super().reset()
        self.last_layer_step = -1

    def check(self, s: Signals) -> Any:
        L = s.layers
        if L is None or int(L["step"]) == self.last_layer_step:
            return UNCHANGED
        self.last_layer_step = int(L["step"])
        m = L["is_matrix"]
        if s.flow is not None:
            flow = m & np.isin(L["name"], list(s.flow))
            m = flow if flow.any() else m
        return self.judge(s, {k: L[k][m] for k in ("name", "grad_norm", "param_norm", "update_ratio")})

    def judge(self, s: Signals, weights: Mapping[str, np.ndarray]) -> Alert | None:  # pragma: no cover
        raise NotImplementedError

    def ratio_and_loss(self, s: Signals, weights: Mapping[str, np.ndarray],
                       window: int) -> tuple[float, np.ndarray, np.ndarray] | None:
        """What the learning-rate detectors judge by: the median update/weight ratio over the weight
        matrices, the last ``window`` train losses and their EMA (beta 0.9). None while there is too
        little to judge (no finite ratio, fewer than window/2 losses, or a non-finite loss)."""
        u = weights["update_ratio"]
        u = u[np.isfinite(u)]
        loss = s.history["train_loss"][-window:]
        if len(u) == 0 or len(loss) < window // 2 or not np.isfinite(loss).all():
            return None
        return median(u), loss, ema(loss, 0.9)

    def count(self, bad: bool) -> bool:
        """Advance the streak; True once the condition has held for ``patience`` snapshots."""
        self.streak = self.streak + 1 if bad else 0
        return self.streak >= getattr(self, "patience", 1)


def median(a: np.ndarray) -> float:
    """``float(np.median(a))`` for a 1-D array, the same value, without numpy's ~10 us of per-call work on
    the short windows detectors look at every few steps (NaN anywhere -> NaN, as numpy)."""
    n = len(a)
    if n == 0 or n > 512:
        return float(np.median(a))
    if not (a == a).all():
        return math.nan
    v = sorted(a.tolist())
    m = n // 2
    return float(v[m]) if n % 2 else (v[m - 1] + v[m]) / 2.0


def finite(a: np.ndarray) -> np.ndarray:
    return a[np.isfinite(a)]


def ema(values: np.ndarray, beta: float = 0.9) -> np.ndarray:
    """Bias-corrected exponential moving average. The recurrence runs on Python floats (a loop over a
    numpy array's elements costs three times as much), the bias correction on the whole array."""
    raw = []
    append = raw.append
    acc, c = 0.0, 1 - beta
    for v in np.asarray(values, dtype=float).tolist():
        acc = beta * acc + c * v
        append(acc)
    return np.asarray(raw, dtype=float) / (1 - beta ** np.arange(1, len(raw) + 1, dtype=float))


def fmt(x: float) -> str:
    """Numbers for evidence strings: short, readable."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return str(x)
    ax = abs(x)
    if ax != 0 and (ax < 1e-3 or ax >= 1e4):
        return f"{x:.2e}"
    return f"{x:.3g}" if ax < 10 else f"{x:.4g}"


_NOT_FLOW = (torch.nn.Embedding, torch.nn.EmbeddingBag, torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm,
             torch.nn.GroupNorm, torch.nn.LocalResponseNorm) + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm")
                                                                 else ())


def gradient_flow_weights(model: torch.nn.Module) -> frozenset[str]:
    """The weight matrices whose gradients show how the signal flows through the depth of ``model``: the
    2-D-or-more parameters of torch's own layers (Linear, convolutions, attention, recurrent layers), in
    model order. Left out: embeddings (a lookup table gets a gradient only on the rows a batch used, so its
    norm reads as vanishing on any token model), normalisation layers (scales and shifts, not depth), and
    tensors a user module holds itself (a learned positional embedding is a 2-D parameter but no layer)."""
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _NOT_FLOW) or not type(mod).__module__.startswith("torch.nn"):
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            if p.dim() >= 2 and p.requires_grad:
                names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return frozenset(names)
