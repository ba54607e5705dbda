"""Exploding gradients: the global gradient norm grows far past its early level."""
from __future__ import annotations

import numpy as np

from .alert import Action, Alert
from .base import Detector, Signals, fmt, median


class ExplodingGradients(Detector):
    """The median grad norm of the last ``window`` steps above ``factor`` × a baseline (the median over the
    ``baseline_steps`` steps after warm-up), rising, for ``patience`` checks in a row — or above
    ``absolute`` outright. Gradient clipping at about the baseline norm is the standard remedy
    (Pascanu et al. 2013).
    """

    kind = "exploding_gradients"
    every = 10
    window = 10
    factor = 30.0
    absolute = 1e4
    baseline_steps = 50
    patience = 3
    min_step = 20

    def reset(self) -> None:
        super().reset()
        self.baseline: float | None = None
        self.baseline_n = 0

    def check(self, s: Signals) -> Alert | None:
        gn = s.history["grad_norm"]
        g = gn[np.isfinite(gn)]
        if len(g) < self.window:
            return None
        if self.baseline is None or self.baseline_n < self.baseline_steps:
            self.baseline_n = min(self.baseline_steps, len(g))
            self.baseline = median(g[: self.baseline_n]) if self.baseline is None else self.baseline
            if self.baseline_n < self.baseline_steps:
                self.baseline = median(g[-self.baseline_n:])
                return None
        now = median(g[-self.window:])
        before = median(g[-2 * self.window:-self.window]) if len(g) >= 2 * self.window else now
        high = (now > self.factor * max(self.baseline, 1e-12) and now >= before) or now > self.absolute
        self.streak = self.streak + 1 if high else 0
        if self.streak < self.patience:
            return None
        lr = s.base_lr
        clip = max(self.baseline * 2, 1e-3)
        return Alert(self.kind, "warning", s.step,
                     "The gradients are growing much larger than they were early in training. Large gradients "
                     "make huge weight updates and usually end in divergence; deep nets without normalisation, "
                     "a high learning rate or unscaled targets are the common causes.",
                     f"median grad norm {fmt(now)} over the last {self.window} steps vs a baseline of "
                     f"{fmt(self.baseline)} ({now / max(self.baseline, 1e-12):.0f}x), high for {self.streak} checks",
                     confidence=min(1.0, 0.5 + now / max(self.baseline, 1e-12) / (4 * self.factor)),
                     actions=[Action(f"Clip gradients at norm {fmt(clip)}", {"grad_clip": clip}),
                              Action("Lower the lr 3x", {"lr": lr / 3})])
