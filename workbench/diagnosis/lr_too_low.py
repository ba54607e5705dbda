"""Learning rate too low: the weights hardly move, so the loss falls very slowly."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .alert import Action, Alert
from .base import LayerDetector, Signals, fmt


class LRTooLow(LayerDetector):
    """Median update/weight ratio below ``ratio`` (Karpathy: about 1e-3 is healthy; 1e-5 and below means the
    weights barely change) for ``patience`` layer checks, while the smoothed loss improved less than
    ``min_improve`` (relative) over the last ``window`` steps.
    """

    kind = "lr_too_low"
    every = 10
    ratio = 1e-5
    patience = 3
    window = 100
    min_improve = 0.05
    min_step = 50

    def judge(self, s: Signals, weights: Mapping[str, np.ndarray]) -> Alert | None:
        judged = self.ratio_and_loss(s, weights, self.window)
        if judged is None:
            return None
        med, loss, sm = judged
        improve = (float(sm[0]) - float(sm[-1])) / max(abs(float(sm[0])), 1e-12)
        bad = med < self.ratio and improve < self.min_improve
        if not self.count(bad):
            return None
        lr = s.controls["lr"]
        return Alert(self.kind, "warning", s.step,
                     "The learning rate looks too low: each step changes the weights by a tiny fraction, so "
                     "training crawls. Raising it (or running the lr finder) usually speeds learning up a lot.",
                     f"median update/weight ratio {fmt(med)} (healthy is about 1e-3); smoothed loss improved "
                     f"{improve:.1%} over the last {len(loss)} steps; lr {fmt(lr)}",
                     confidence=min(1.0, 0.5 + 0.15 * np.log10(self.ratio / max(med, 1e-30))),
                     actions=[Action("Raise the lr 10x", {"lr": lr * 10}),
                              Action("Find a good lr", hint="tr.lr_find()")])
