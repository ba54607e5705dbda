"""The learning-rate pair's shared reading: lr_too_high and lr_too_low judge the same signals, so that one
run never gets both verdicts, nor the advice its own evidence contradicts.

The signals: the median update/weight ratio ||dW||/||W|| (Karpathy: about 1e-3 is healthy), the smoothed
loss trend over the detector's window, the fraction of dead ReLU units (the dead-unit probe's last
reading), and the whole run's loss track (its first loss, its peak, the low before that peak).

A run an lr *killed* shows a low update ratio and a flat loss, just like a too-low lr, which is why the
ratio alone misleads: the difference is its history. Its loss blew up (the peak rose at least
``KILL_BLOWUP`` first-losses above the low before it), it never came back under that low, and it has
stopped improving — typically because the blow-up pushed ReLUs into the region where they never fire
again, so their weights get no gradient (Lu et al. 2019, "Dying ReLU and initialization"). Such a run is
lr_too_high; raising its lr makes it worse.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .base import Signals, ema, fmt, median

KILL_BLOWUP = 1.0       # peak - low before it, in first losses (a loss that at least doubled from its low)
KILL_STALL = 0.05       # the smoothed loss improved less than this (relative) over the window


@dataclass
class LRReading:
    """What both lr detectors read at one check."""

    ratio: float                 # median update/weight ratio over the weight matrices (nan: none finite)
    loss: np.ndarray             # the last ``window`` train losses
    smooth: np.ndarray           # their bias-corrected EMA (beta 0.9)
    improve: float               # relative fall of the smoothed loss over the window (< 0: it rose)
    killed: bool                 # an lr blow-up the run has not recovered from
    dead: float                  # fraction of units dead in the worst ReLU layer (0 without a probe)
    lr_now: float                # the scheduled lr in force
    base_lr: float               # the base lr the schedule multiplies

    def kill_evidence(self, s: Signals) -> str:
        t = s.track
        parts = [f"the loss blew up from {fmt(t.low_before_peak)} to {fmt(t.peak)} at step {t.peak_step}",
                 f"now {fmt(float(self.smooth[-1]))} (smoothed), {self.improve:+.1%} over the last "
                 f"{len(self.loss)} steps"]
        if self.dead >= 0.2:
            parts.append(f"{self.dead:.0%} of a ReLU layer's units dead")
        if np.isfinite(self.ratio):
            parts.append(f"median update/weight ratio {fmt(self.ratio)}")
        return "; ".join(parts) + f"; lr {fmt(self.lr_now)}"


def read_lr(s: Signals, weights: Mapping[str, np.ndarray], window: int) -> LRReading | None:
    """The shared reading, or None while there is too little to judge (fewer than window/2 losses, or a
    non-finite one: divergence speaks then)."""
    loss = s.history["train_loss"][-window:]
    if len(loss) < window // 2 or not np.isfinite(loss).all():
        return None
    u = weights["update_ratio"]
    u = u[np.isfinite(u)]
    ratio = median(u) if len(u) else float("nan")
    sm = ema(loss, 0.9)
    improve = (float(sm[0]) - float(sm[-1])) / max(abs(float(sm[0])), 1e-12)
    dead = float(s.extra.get("dead_fraction", 0.0) or 0.0)
    return LRReading(ratio, loss, sm, improve, killed_by_lr(s, sm, improve), dead, s.lr_now, s.base_lr)


def killed_by_lr(s: Signals, smooth: np.ndarray, improve: float) -> bool:
    """The loss blew up, is still at or above the low it had before, and has stopped improving."""
    t = s.track
    if t is None or t.blowup() < KILL_BLOWUP:
        return False
    return float(smooth[-1]) >= 0.9 * t.low_before_peak and improve < KILL_STALL


def loss_rose(s: Signals, window: int = 50) -> bool:
    """The recent loss sits well above the run's low: advice to raise the lr would contradict it."""
    t = s.track
    loss = s.history["train_loss"][-window:]
    if t is None or t.first is None or not len(loss) or not np.isfinite(loss).all():
        return False
    now = median(loss)
    return now > 1.5 * t.low and now - t.low > 0.1 * abs(t.first)
