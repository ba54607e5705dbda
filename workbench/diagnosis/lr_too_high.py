"""Learning rate too high: big updates that do not lower the loss, a loss climbing back, or a blow-up that
killed the run (read with lr_too_low from the same signals: ``lr_pair``)."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .alert import Action, Alert
from .base import LayerDetector, Signals, fmt
from .lr_pair import LRReading, read_lr


class LRTooHigh(LayerDetector):
    """Three ways a too-high lr shows, for ``patience`` layer checks:

    * the median update/weight ratio ||dW||/||W|| over the weight matrices above ``ratio`` (Karpathy's rule
      of thumb: about 1e-3 is healthy) while the smoothed loss over the last ``window`` steps is not falling
      (or swings with a coefficient of variation above ``swing``);
    * the smoothed loss climbed ``rise`` x above its recent low while updates stay above ``healthy_ratio``
      (Adam's normalised steps keep the ratio moderate while it overshoots);
    * the run was killed: its loss blew up, never came back under the low before, and stopped improving
      (``lr_pair.killed_by_lr``) — the updates are tiny then, because dead units get no gradient, which is
      why the ratio alone would read "too low".
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
        r = read_lr(s, weights, self.window)
        if r is None:
            return None
        loss, sm, med = r.loss, r.smooth, r.ratio
        half = len(sm) // 2
        low = float(np.min(sm[: max(1, 3 * len(sm) // 4)]))
        not_falling = float(sm[-1]) >= 0.95 * float(np.min(sm[:half]))
        cv = float(np.std(loss[half:]) / max(np.mean(loss[half:]), 1e-12))
        rising = float(sm[-1]) > self.rise * low and float(sm[-1]) - low > 0.1 * (s.initial_loss or low)
        big = np.isfinite(med) and med > self.ratio and (not_falling or cv > self.swing)
        bad = big or (rising and np.isfinite(med) and med > self.healthy_ratio) or r.killed
        if not self.count(bad):
            return None
        if r.killed:
            return self._killed(s, r)
        return Alert(self.kind, "warning", s.step,
                     "The learning rate looks too high: every step moves the weights a lot, but the loss is not "
                     "improving for it — it bounces around instead of settling. Lowering the learning rate "
                     "usually makes the loss fall steadily again.",
                     f"median update/weight ratio {fmt(med)} (healthy is about 1e-3), smoothed loss low "
                     f"{fmt(low)} -> now {fmt(float(sm[-1]))}, loss swing (CV) {cv:.2f}, lr {fmt(r.lr_now)}",
                     confidence=min(1.0, 0.5 + 0.2 * np.log10(max(med, self.ratio) / self.ratio + 1)),
                     actions=[Action("Lower the lr 10x", {"lr": r.base_lr / 10}),
                              Action("Lower the lr 3x", {"lr": r.base_lr / 3})])

    def _killed(self, s: Signals, r: LRReading) -> Alert:
        return Alert(self.kind, "warning", s.step,
                     "The learning rate was too high: a few large steps blew the loss up, and the run has not "
                     "recovered — the weights were thrown where many units never fire, so they get no gradient "
                     "and nothing learns. Raising the lr would make it worse; go back to a state from before "
                     "the blow-up and train on with a lower lr (or restart with one).",
                     r.kill_evidence(s), confidence=min(1.0, 0.6 + 0.4 * max(r.dead, 0.0)),
                     actions=[Action("Roll back and lower the lr 10x", {"lr": r.base_lr / 10}, rollback=True),
                              Action("Lower the lr 10x", {"lr": r.base_lr / 10}),
                              Action("Restart with the lr finder's suggestion", hint="tr.lr_find()")])
