"""Overfitting: validation loss climbs while training loss keeps falling."""
from __future__ import annotations

import numpy as np

from .alert import Action, Alert
from .base import Detector, Signals, fmt, median


class Overfitting(Detector):
    """Val loss rose ``patience`` evals in a row, ends ``min_rise`` above its best, while the train loss fell
    over the same evals — the model memorises the training set (the signal early stopping acts on,
    Prechelt 1998).
    """

    kind = "overfitting"
    on_eval = True
    patience = 4
    min_rise = 0.1

    def reset(self) -> None:
        super().reset()
        self.open = False   # once opened, the episode lasts while val loss stays min_rise above its best

    def check(self, s: Signals) -> Alert | None:
        v, vs = s.evals["val_loss"], s.evals["step"]
        if len(v) < self.patience + 2 or not np.isfinite(v[-self.patience - 1:]).all():
            return None
        tail = v[-self.patience - 1:]
        rising = bool(np.all(np.diff(tail) > 0))
        best = float(np.nanmin(v))
        above = tail[-1] >= best * (1 + self.min_rise)
        if not above:
            self.open = False
            return None
        if not (rising or self.open):
            return None
        h, hs = s.history["train_loss"], s.history["step"]
        start_step = vs[-self.patience - 1]
        before = h[(hs > start_step - 20) & (hs <= start_step)]
        after = h[-20:]
        if len(before) == 0 or not np.isfinite(after).all():
            return None
        t0, t1 = median(before), median(after)
        if t1 >= t0 and not self.open:
            return None
        self.open = True
        best_step = int(vs[int(np.nanargmin(v))])
        wd = s.controls.get("weight_decay", 0.0)
        return Alert(self.kind, "warning", s.step,
                     "The model is memorising the training set: it keeps getting better on data it has seen and "
                     "worse on data it has not. Too little data for the model's size, training too long or "
                     "too little regularisation are the usual causes.",
                     f"val_loss rose {self.patience} evals in a row, {fmt(float(tail[0]))} -> {fmt(float(tail[-1]))} "
                     f"(best {fmt(best)} at step {best_step}), while train_loss fell {fmt(t0)} -> {fmt(t1)}",
                     confidence=min(1.0, 0.5 + (tail[-1] / best - 1)),
                     actions=[Action("Add weight decay", {"weight_decay": max(wd * 10, 0.01)}),
                              Action(f"Go back to the best checkpoint (step {best_step})",
                                     hint="resume or fork from the checkpoint tagged best"),
                              Action("Stop early on val_loss", hint="early_stopping_patience=5"),
                              Action("Add dropout", hint="model_options.dropout=0.2")])
