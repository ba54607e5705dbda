"""Overfitting: validation loss has climbed well above its best while training loss kept falling."""
from __future__ import annotations

import numpy as np

from .alert import Action, Alert
from .base import Detector, Signals, fmt, median


class Overfitting(Detector):
    """Prechelt's generalisation loss (1998), read robustly: the best val loss is at least ``patience`` evals
    old, the median of the last ``smooth`` evals sits ``min_rise`` above it, the evals since the best trend
    upwards (Kendall's tau at least ``min_trend``, the Mann-Kendall trend statistic) or that median is
    ``big_rise`` above the best whatever the path (a jump, then a slow drift back), and the train loss fell
    by ``min_fall`` or more since the best eval — the model memorises the training set (the signal early
    stopping acts on).

    A median and a rank trend, rather than "rose N evals in a row", keep one eval that happens to dip from
    hiding a climb that doubles the val loss (such a dip depends on the run's exact float trajectory), while
    a val loss that only wobbles above its best, or drifts up while the train loss stands still, stays quiet.
    """

    kind = "overfitting"
    on_eval = True
    patience = 4
    smooth = 3
    min_rise = 0.1
    min_fall = 0.2
    min_trend = 0.5
    big_rise = 0.5
    trend_window = 40   # evals since the best that the trend reads (bounds its O(n^2) cost)

    def reset(self) -> None:
        super().reset()
        self.open = False   # once opened, the episode lasts while val loss stays min_rise above its best

    def check(self, s: Signals) -> Alert | None:
        v, vs = s.evals["val_loss"], s.evals["step"]
        recent = v[-self.smooth:]
        if len(v) < self.patience + 2 or not np.isfinite(recent).all():
            return None
        b = int(np.nanargmin(v))
        best, now = float(v[b]), median(recent)
        if now < best * (1 + self.min_rise):
            self.open = False
            return None
        tau = kendall_tau(v[b:][-self.trend_window:])
        climbed = tau >= self.min_trend or now >= best * (1 + self.big_rise)
        if not self.open and (len(v) - 1 - b < self.patience or not climbed):
            return None
        h, hs = s.history["train_loss"], s.history["step"]
        best_step = int(vs[b])
        before = h[(hs > best_step - 20) & (hs <= best_step)]
        after = h[-20:]
        if len(before) == 0 or not np.isfinite(after).all():
            return None
        t0, t1 = median(before), median(after)
        if t1 > (1 - self.min_fall) * t0 and not self.open:
            return None
        self.open = True
        wd = s.controls.get("weight_decay", 0.0)
        return Alert(self.kind, "warning", s.step,
                     "The model is memorising the training set: it keeps getting better on data it has seen and "
                     "worse on data it has not. Too little data for the model's size, training too long or "
                     "too little regularisation are the usual causes.",
                     f"val_loss {fmt(now)} (median of the last {len(recent)} evals), {100 * (now / best - 1):.0f}% "
                     f"above its best {fmt(best)} at step {best_step}, {len(v) - 1 - b} evals ago (trend since, "
                     f"Kendall tau: {tau:+.2f}); train_loss fell {fmt(t0)} -> {fmt(t1)}",
                     confidence=min(1.0, 0.5 + (now / best - 1)),
                     actions=[Action("Add weight decay", {"weight_decay": max(wd * 10, 0.01)}),
                              Action(f"Go back to the best checkpoint (step {best_step})",
                                     hint="resume or fork from the checkpoint tagged best"),
                              Action("Stop early on val_loss", hint="early_stopping_patience=5"),
                              Action("Add dropout", hint="model_options.dropout=0.2")])


def kendall_tau(x: np.ndarray) -> float:
    """Kendall's tau of ``x`` against its order: +1 for a strictly rising series, -1 for a falling one,
    near 0 for noise (ties and non-finite values count as neither)."""
    x = x[np.isfinite(x)]
    n = len(x)
    if n < 2:
        return 0.0
    d = np.sign(np.subtract.outer(x, x))       # d[i, j] = sign(x[i] - x[j]); j < i is the later-minus-earlier pair
    return float(np.tril(d, -1).sum() / (n * (n - 1) / 2))
