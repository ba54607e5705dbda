"""Underfitting: well into the run, the training loss is still near where a blind guess would be."""
from __future__ import annotations

import numpy as np

from .alert import Action, Alert
from .base import Detector, Signals, ema, fmt, median
from .lr_pair import killed_by_lr, loss_rose


class Underfitting(Detector):
    """After ``progress`` of the planned steps (and at least ``min_step``), the median train loss of the last
    ``window`` steps is above ``near`` × the chance-level loss log(C) for classification (a model that
    predicts uniformly scores exactly log(C)), or above ``near`` × the starting loss for regression.

    The advice follows the evidence: "raise the lr" only while the loss has neither blown up nor climbed
    (a run an lr killed sits at chance level too; there the fix is a lower lr, from before the blow-up).
    """

    kind = "underfitting"
    every = 25
    window = 50
    near = 0.9
    progress = 0.3
    min_step = 150

    def check(self, s: Signals) -> Alert | None:
        planned = s.planned_steps or 0
        if s.step < max(self.min_step, self.progress * planned):
            return None
        loss = s.history["train_loss"][-self.window:]
        if len(loss) < self.window // 2 or not np.isfinite(loss).all():
            return None
        now = median(loss)
        ref = s.chance_loss if s.chance_loss is not None else s.initial_loss
        if ref is None or now < self.near * ref:
            return None
        what = f"chance level log({s.n_classes}) = {fmt(ref)}" if s.chance_loss is not None else \
            f"the starting loss {fmt(ref)}"
        lr = s.base_lr
        sm = ema(loss, 0.9)
        improve = (float(sm[0]) - float(sm[-1])) / max(abs(float(sm[0])), 1e-12)
        if killed_by_lr(s, sm, improve) or loss_rose(s):
            first = [Action("Roll back and lower the lr 10x", {"lr": lr / 10}, rollback=True)]
        else:
            first = [Action("Raise the lr 3x", {"lr": lr * 3})]
        return Alert(self.kind, "warning", s.step,
                     "The model is not learning the training data: after a good part of the run its loss is about "
                     "what a blind guess would give. A learning rate that is too low (or so high that it blew the run "
                     "up), a model too small for the task, or labels that carry no signal (shuffled or wrong "
                     "labels) are the usual causes.",
                     f"median train_loss {fmt(now)} over the last {len(loss)} steps, {now / ref:.2f}x {what}, "
                     f"at step {s.step}", confidence=min(1.0, 0.5 + (now / ref - self.near) * 3),
                     actions=[*first,
                              Action("Use a bigger model", hint="model_options.width=256"),
                              Action("Check the labels", hint="look at a few samples and their labels")])
