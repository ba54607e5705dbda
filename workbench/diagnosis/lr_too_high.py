"""Learning rate too high: each step changes the weights a lot, and the loss does not go down for it."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .alert import Action, Alert
from .base import LayerDetector, Signals, fmt


class LRTooHigh(LayerDetector):
    """Median update/weight ratio ||dW||/||W|| over the weight matrices above ``ratio`` (Karpathy's rule of
    thumb: about 1e-3 is healthy) while the smoothed loss over the last ``window`` steps is not falling (or
    swings with a coefficient of variation above ``swing``) — or the smoothed loss has climbed ``rise`` ×
    above its recent low while updates stay above ``healthy_ratio``; for ``patience`` layer checks.
    """

    kind = "lr_too_high"
    every = 10
    ratio = 0.03
    healthy_ratio = 3e-3
    rise = 1.5
    patience = 2
    window = 200
    swing = 0.5
    min_step = 50

    def judge(self, s: Signals, weights: Mapping[str, np.ndarray]) -> Alert | None:
        judged = self.ratio_and_loss(s, weights, self.window)
        if judged is None:
            return None
        med, loss, sm = judged
        half = len(sm) // 2
        low = float(np.min(sm[: max(1, 3 * len(sm) // 4)]))
        not_falling = float(sm[-1]) >= 0.95 * float(np.min(sm[:half]))
        cv = float(np.std(loss[half:]) / max(np.mean(loss[half:]), 1e-12))
        # the loss has climbed well above its recent low (an optimiser overshooting: Adam's normalised steps
        # keep the update ratio moderate, so a rising loss with above-healthy updates counts too)
        rising = float(sm[-1]) > self.rise * low and float(sm[-1]) - low > 0.1 * (s.initial_loss or low)
        bad = (med > self.ratio and (not_falling or cv > self.swing)) or (rising and med > self.healthy_ratio)
        if not self.count(bad):
            return None
        lr = s.controls["lr"]
        return Alert(self.kind, "warning", s.step,
                     "The learning rate looks too high: every step moves the weights a lot, but the loss is not "
                     "improving for it — it bounces around instead of settling. Lowering the learning rate "
                     "usually makes the loss fall steadily again.",
                     f"median update/weight ratio {fmt(med)} (healthy is about 1e-3), smoothed loss low "
                     f"{fmt(low)} -> now {fmt(float(sm[-1]))}, loss swing (CV) {cv:.2f}, lr {fmt(lr)}",
                     confidence=min(1.0, 0.5 + 0.2 * np.log10(med / self.ratio + 1)),
                     actions=[Action("Lower the lr 10x", {"lr": lr / 10}), Action("Lower the lr 3x", {"lr": lr / 3})])
