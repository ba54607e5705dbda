"""Overfitting: validation loss has climbed well above its best while training loss kept falling, or the
model has memorised its training set and the gap to validation is wide and not closing."""
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
    stopping acts on). The rise must also be material: ``min_rise`` is 20% (Prechelt's GL criterion), and at
    least ``min_excess`` x the reference loss (log(C) for a classifier, the starting loss otherwise) — a val
    loss of 0.143 drifting to 0.165 at the end of a long cosine run is a converged model, not a memorising one.

    The train loss at the best eval and at the latest is the median of ``train_window`` steps: on a noisy
    problem (two moons whose classes overlap) a 20-step median swings 10-20% from one eval to the next, as much
    as the fall being judged.

    A median and a rank trend, rather than "rose N evals in a row", keep one eval that happens to dip from
    hiding a climb that doubles the val loss (such a dip depends on the run's exact float trajectory), while
    a val loss that only wobbles above its best, or drifts up while the train loss stands still, stays quiet.

    The generalisation gap is the second reading, for a model that memorised its data while the val loss
    merely stalls: the train loss (median of its last 20 steps) has fallen below ``memorised`` x the val
    loss (median of the last ``smooth`` evals), the gap val - train is at least ``min_gap`` x the reference
    loss (log(C) for a classifier, the starting loss otherwise), the gap has not closed by ``stall``
    (relative) or more over the last ``patience`` evals and the val loss improved less than that; once open, the
    alert stays open while the train loss stays memorised and the gap wide. A long healthy run, whose val
    loss sits a little above a near-zero train loss, has a small gap against log(C).
    """

    kind = "overfitting"
    on_eval = True
    patience = 4
    smooth = 3
    min_rise = 0.2
    min_fall = 0.2
    min_trend = 0.5
    big_rise = 0.5
    trend_window = 40   # evals since the best that the trend reads (bounds its O(n^2) cost)
    min_excess = 0.01   # the rise above the best, in reference losses (log(C) or the starting loss)
    memorised = 0.25
    min_gap = 0.15
    stall = 0.05
    train_window = 100  # steps whose median is "the train loss" at the best eval and at the latest

    def reset(self) -> None:
        super().reset()
        self.open = False   # once opened, the episode lasts while val loss stays min_rise above its best
        self.gap_open = False  # likewise while the gap stays wide
        self.best_step, self.best_train = -1, 0.0  # the train loss at the best eval (it leaves the window)

    def check(self, s: Signals) -> Alert | None:
        v, vs = s.evals["val_loss"], s.evals["step"]
        recent = v[-self.smooth:]
        if len(v) < self.patience + 2 or not np.isfinite(recent).all():
            return None
        h, hs = s.history["train_loss"], s.history["step"]
        after = h[-self.train_window:]
        if not len(after) or not np.isfinite(after).all():
            return None
        b = int(np.nanargmin(v))
        best = float(v[b])
        now, t1 = median(recent), median(after)
        best_step = int(vs[b])
        before = h[(hs > best_step - self.train_window) & (hs <= best_step)]
        if len(before):   # read while it is in the history window: a climb can outlast the window
            self.best_step, self.best_train = best_step, median(before)
        rise = self._rise(s, v, vs, b, best, now, h, hs, t1)
        if rise is not None:
            self.open = True
            return rise
        self.open = False
        gap = self._gap(s, v, vs, now, t1)
        self.gap_open = gap is not None
        return gap

    def _rise(self, s: Signals, v: np.ndarray, vs: np.ndarray, b: int, best: float, now: float,
              h: np.ndarray, hs: np.ndarray, t1: float) -> Alert | None:
        """Prechelt's reading: the val loss climbed above its best while the train loss fell."""
        ref = s.chance_loss if s.chance_loss is not None else s.initial_loss
        if now < best * (1 + self.min_rise) or (ref is not None and now - best < self.min_excess * ref):
            return None
        tau = kendall_tau(v[b:][-self.trend_window:])
        climbed = tau >= self.min_trend or now >= best * (1 + self.big_rise)
        if not self.open and (len(v) - 1 - b < self.patience or not climbed):
            return None
        best_step = int(vs[b])
        if self.best_step != best_step:   # the best eval's train loss was never in the history window
            return None
        t0 = self.best_train
        if t1 > (1 - self.min_fall) * t0 and not self.open:
            return None
        return self._alert(s, f"val_loss {fmt(now)} (median of the last {self.smooth} evals), "
                              f"{100 * (now / best - 1):.0f}% above its best {fmt(best)} at step {best_step}, "
                              f"{len(v) - 1 - b} evals ago (trend since, Kendall tau: {tau:+.2f}); train_loss fell "
                              f"{fmt(t0)} -> {fmt(t1)}", best_step, min(1.0, 0.5 + (now / best - 1)))

    def _gap(self, s: Signals, v: np.ndarray, vs: np.ndarray, now: float, t1: float) -> Alert | None:
        """The generalisation gap: train memorised, val stalled far above it, the gap not closing."""
        ref = s.chance_loss if s.chance_loss is not None else s.initial_loss
        k = len(v) - 1 - self.patience
        if ref is None or ref <= 0 or k < self.smooth - 1:
            return None
        gap = now - t1
        then = median(v[k - self.smooth + 1:k + 1])
        h, hs = s.history["train_loss"], s.history["step"]
        before = h[(hs > int(vs[k]) - self.train_window) & (hs <= int(vs[k]))]
        if not len(before) or not np.isfinite(before).all():
            return None
        gap_then = then - median(before)
        stalled = now > (1 - self.stall) * then
        wide = t1 < self.memorised * now and gap >= self.min_gap * ref
        if not (wide and (self.gap_open or (gap >= (1 - self.stall) * gap_then and stalled))):
            return None
        acc = s.evals.get("val_acc") if hasattr(s.evals, "get") else None
        acc_text = ""
        if acc is not None and len(acc) > k and np.isfinite(acc[-1]) and np.isfinite(acc[k]):
            acc_text = f"; val accuracy {float(acc[k]):.1%} -> {float(acc[-1]):.1%}"
        b = int(np.nanargmin(v))
        return self._alert(s, f"generalisation gap {fmt(gap)} (val_loss {fmt(now)}, median of the last {self.smooth} "
                              f"evals, vs train_loss {fmt(t1)}), {gap / ref:.2f}x the reference loss {fmt(ref)}; "
                              f"{self.patience} evals ago the gap was {fmt(gap_then)} and val_loss {fmt(then)}"
                              + acc_text, int(vs[b]), min(1.0, 0.5 + 0.5 * gap / ref))

    def _alert(self, s: Signals, evidence: str, best_step: int, confidence: float) -> Alert:
        wd = s.controls.get("weight_decay", 0.0)
        return Alert(self.kind, "warning", s.step,
                     "The model is memorising the training set: it keeps getting better on data it has seen and "
                     "no better, or worse, on data it has not. Too little data for the model's size, training "
                     "too long or too little regularisation are the usual causes.",
                     evidence, confidence=confidence,
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
