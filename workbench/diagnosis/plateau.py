"""Plateau: the training loss has stopped improving while still well above zero."""
from __future__ import annotations

import numpy as np

from .alert import Action, Alert
from .base import Detector, Signals, ema, fmt


class Plateau(Detector):
    """Smoothed train loss improved less than ``min_improve`` (relative) over the last ``window`` steps, while
    still above ``floor`` × the starting loss (a converged run is not a plateau). Information only:
    a plateau is often where a schedule should lower the lr (ReduceLROnPlateau).
    """

    kind = "plateau"
    every = 50
    window = 200
    min_improve = 0.01
    floor = 0.1
    min_step = 300

    def check(self, s: Signals) -> Alert | None:
        loss = s.history["train_loss"]
        if len(loss) < self.window or not np.isfinite(loss[-self.window:]).all() or s.initial_loss is None:
            return None
        sm = ema(loss[-self.window:], 0.95)
        a, b = float(sm[len(sm) // 4]), float(sm[-1])
        if b < self.floor * s.initial_loss or (a - b) / max(abs(a), 1e-12) >= self.min_improve:
            return None
        lr = s.base_lr
        return Alert(self.kind, "info", s.step,
                     "The training loss has stopped going down. Lowering the learning rate often lets the model "
                     "settle into a better minimum; if the loss is still high, the model may be too small.",
                     f"smoothed train_loss {fmt(a)} -> {fmt(b)} over the last {int(self.window * 0.75)} steps "
                     f"({(a - b) / max(abs(a), 1e-12):+.1%})", confidence=0.5,
                     actions=[Action("Lower the lr 3x", {"lr": lr / 3}),
                              Action("Reduce the lr on plateau automatically", hint="schedule=plateau")])
