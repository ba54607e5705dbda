"""Learning rate too low: the weights hardly move, so the loss falls very slowly (read with lr_too_high from
the same signals: ``lr_pair``)."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .alert import Action, Alert
from .base import LayerDetector, Signals, fmt
from .lr_pair import loss_rose, read_lr


class LRTooLow(LayerDetector):
    """Median update/weight ratio below ``ratio`` (Karpathy: about 1e-3 is healthy; 1e-5 and below means the
    weights barely change) for ``patience`` layer checks, while the smoothed loss improved by less than
    ``min_improve`` (relative) over the last ``window`` steps — but neither rose nor blew up.

    Tiny updates have other causes, and raising the lr is wrong advice for each, so the detector stays quiet:
    * the loss climbs, or blew up and never recovered (an lr that killed the run: lr_too_high's case);
    * the loss is near zero (``converged`` x the starting loss): a memorised training set gives tiny
      gradients, the run is done, not slow;
    * the schedule has lowered the lr in force below ``scheduled`` x its base (a cosine's tail, a step
      decay, a warm-up): small steps are what the schedule asks for there.
    """

    kind = "lr_too_low"
    every = 10
    ratio = 1e-5
    patience = 3
    window = 100
    min_improve = 0.05
    converged = 0.1
    scheduled = 0.5
    min_step = 50

    def judge(self, s: Signals, weights: Mapping[str, np.ndarray]) -> Alert | None:
        r = read_lr(s, weights, self.window)
        if r is None or not np.isfinite(r.ratio):
            return None
        now = float(r.smooth[-1])
        converged = s.initial_loss is not None and now < self.converged * abs(s.initial_loss)
        scheduled_down = r.lr_now < self.scheduled * r.base_lr
        bad = (r.ratio < self.ratio and -0.02 <= r.improve < self.min_improve and not r.killed
               and not converged and not scheduled_down and not loss_rose(s))
        if not self.count(bad):
            return None
        return Alert(self.kind, "warning", s.step,
                     "The learning rate looks too low: each step changes the weights by a tiny fraction, so "
                     "training crawls. Raising it (or running the lr finder) usually speeds learning up a lot.",
                     f"median update/weight ratio {fmt(r.ratio)} (healthy is about 1e-3); smoothed loss improved "
                     f"{r.improve:.1%} over the last {len(r.loss)} steps; lr {fmt(r.lr_now)}",
                     confidence=min(1.0, 0.5 + 0.15 * np.log10(self.ratio / max(r.ratio, 1e-30))),
                     actions=[Action("Raise the lr 10x", {"lr": r.base_lr * 10}),
                              Action("Find a good lr", hint="tr.lr_find()")])
