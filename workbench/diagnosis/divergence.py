"""Divergence: the loss or the gradients are no longer finite numbers, or the loss has exploded."""
from __future__ import annotations

import numpy as np

from .alert import Action, Alert
from .base import Detector, Signals, fmt, median


class Divergence(Detector):
    """Non-finite loss/gradients (Keras TerminateOnNaN), or the median of the last ``window`` losses (at least
    ``min_window`` of them, so a blow-up in the first steps counts) above ``explode_factor`` × the starting
    loss (dlib backtracks on such a loss explosion). The starting loss is one an early blow-up cannot raise:
    the first finite loss (or the chance level log(C), where higher), see ``LossTrack.baseline``.

    In fp16 an infinite gradient norm alone is not divergence: the GradScaler skips that step and lowers
    its scale, which is its normal way of working.

    A non-finite value makes the trainer run this detector as soon as the value is read back (every step
    on CPU); the explosion test runs on the ``every`` schedule.
    """

    kind = "divergence"
    every = 10
    explode_factor = 10.0
    window = 5
    min_window = 3
    reopen_after = 0   # every new divergence after a recovery is news: the divergence policy acts on each

    def check(self, s: Signals) -> Alert | None:
        loss = s.history["train_loss"][-self.window:]
        gn = s.history["grad_norm"][-self.window:]
        if len(loss) == 0:
            return None
        fp16 = s.controls.get("precision") == "fp16"
        bad_loss = not np.isfinite(loss[-1])
        bad_grad = not np.isfinite(gn[-1]) and not fp16
        exploded = (s.initial_loss is not None and len(loss) >= self.min_window and np.isfinite(loss).all()
                    and median(loss) > self.explode_factor * max(s.initial_loss, 1e-12))
        if not (bad_loss or bad_grad or exploded):
            return None
        lr, lr_now = s.base_lr, s.lr_now
        if bad_loss or bad_grad:
            what = "loss" if bad_loss else "gradient norm"
            evidence = f"{what} became {fmt(float(loss[-1] if bad_loss else gn[-1]))} at step {s.step}"
            finite = loss[np.isfinite(loss)]
            if len(finite):
                evidence += f"; last finite loss {fmt(float(finite[-1]))}"
            confidence = 1.0
        else:
            evidence = (f"median loss of the last {len(loss)} steps is {fmt(median(loss))}, "
                        f"{median(loss) / s.initial_loss:.0f}x the starting loss {fmt(s.initial_loss)}")
            confidence = 0.9
        evidence += f"; lr {fmt(lr_now)}, last grad norm {fmt(float(gn[-1]))}"
        message = ("Training has diverged: the numbers the model computes have blown up, so every step from here "
                   "makes the weights worse. The usual cause is a learning rate that is too high for this model "
                   "and data (or no gradient clipping); bad inputs (NaN) can do it too.")
        return Alert(self.kind, "critical", s.step, message, evidence, confidence=confidence, actions=[
            Action("Roll back to the last good state and lower the lr 10x", {"lr": lr / 10}, rollback=True),
            Action("Lower the lr 10x", {"lr": lr / 10}),
            Action("Clip gradients at norm 1.0", {"grad_clip": 1.0}),
        ])
