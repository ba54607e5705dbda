"""Loss spikes: one step's loss far above the recent typical loss."""
from __future__ import annotations

import numpy as np

from .alert import Action, Alert
from .base import Detector, Signals, fmt, median


class LossSpike(Detector):
    """A step whose loss exceeds ``factor`` × the median of the previous ``window`` steps and sits more than
    ``mad_z`` robust standard deviations (1.4826 × MAD) above it (Lightning's SpikeDetection uses 2× the mean
    of the last 10 steps; the median/MAD form ignores ordinary mini-batch noise). Spikes smaller than
    ``min_excess`` × the starting loss are ignored, so a near-zero late loss doubling is not a spike.
    Severity is info, or warning when the spike is ``big_factor`` × the median and above the starting loss.
    """

    kind = "loss_spike"
    every = 10
    window = 50
    factor = 3.0
    mad_z = 8.0
    min_excess = 0.25
    big_factor = 10.0
    min_step = 60

    def reset(self) -> None:
        super().reset()
        self.checked_to = -1  # the last step an earlier check examined

    def check(self, s: Signals) -> Alert | None:
        loss = s.history["train_loss"]
        steps = s.history["step"]
        # every step since the last check, not just the last ``every``: a check put off by a step (its
        # boundary saved a checkpoint) must still see the step right after the previous check
        k = max(self.every, len(steps) - int(np.searchsorted(steps, self.checked_to, side="right")))
        k = min(k, len(loss) - self.window)
        if k < self.every:
            return None
        self.checked_to = int(steps[-1])
        base = loss[-(self.window + k):-k]
        base = base[np.isfinite(base)]
        if len(base) < self.window // 2:
            return None
        med = median(base)
        mad = 1.4826 * median(np.abs(base - med)) + 1e-12
        recent, rsteps = loss[-k:], steps[-k:]
        ok = np.isfinite(recent)
        floor = self.min_excess * (s.initial_loss or med)
        spikes = ok & (recent > self.factor * med) & (recent > med + self.mad_z * mad) & (recent - med > floor)
        if not spikes.any():
            return None
        i = int(np.argmax(np.where(spikes, recent, -np.inf)))
        peak, at = float(recent[i]), int(rsteps[i])
        ratio = peak / max(med, 1e-12)
        # a spike that takes the loss above where training started is a warning; smaller ones are info
        severity = "warning" if ratio >= self.big_factor and peak > (s.initial_loss or np.inf) else "info"
        lr = s.base_lr
        return Alert(self.kind, severity, s.step,
                     "The loss jumped far above its recent level for a step. Isolated spikes often come from an "
                     "unusual batch or a learning rate near the edge of stability; repeated ones usually come "
                     "before divergence.",
                     f"loss {fmt(peak)} at step {at}, {ratio:.1f}x the median {fmt(med)} of the previous "
                     f"{self.window} steps", confidence=min(1.0, 0.4 + ratio / 20),
                     actions=[Action("Clip gradients at norm 1.0", {"grad_clip": 1.0}),
                              Action("Lower the lr 3x", {"lr": lr / 3})])
