"""Dead units: ReLU units that output zero for every input, so they never learn again."""
from __future__ import annotations

import numpy as np

from .alert import Action, Alert
from .base import Detector, Signals


class DeadUnits(Detector):
    """Fraction of ReLU units that are zero on every sample of a fixed probe batch; fires when a layer with at
    least ``min_units`` units has more than ``fraction`` dead. A dead ReLU gets zero gradient, so it
    stays dead (Lu et al. 2019, "Dying ReLU"). This instrument runs the model on the probe batch
    (eval mode, no grad) — the one detector that looks at the model itself.
    """

    kind = "dead_units"
    every = 100
    fraction = 0.5
    min_units = 8
    min_step = 20

    def should_check(self, step: int, after_eval: bool) -> bool:
        return step >= self.min_step and (step == self.min_step or (self.every > 0 and step % self.every == 0))

    def check(self, s: Signals) -> Alert | None:
        if s.probe_activations is None:
            return None
        fired = s.probe_activations()  # layer -> bool array (unit fired on at least one probe sample)
        worst, worst_name, worst_units = 0.0, "", 0
        for name, alive in fired.items():
            if alive.size >= self.min_units:
                dead = 1.0 - float(np.mean(alive))
                if dead > worst:
                    worst, worst_name, worst_units = dead, name, alive.size
        if worst <= self.fraction:
            return None
        lr = s.controls["lr"]
        return Alert(self.kind, "warning", s.step,
                     "Many ReLU units are dead: they output zero for every input, get no gradient and so never "
                     "recover. Large negative biases, a learning rate that once pushed weights too far, or a poor "
                     "initialisation cause it.",
                     f"{worst:.0%} of the {worst_units} units after {worst_name} never fire on a probe batch",
                     confidence=min(1.0, worst),
                     actions=[Action("Lower the lr 3x", {"lr": lr / 3}),
                              Action("Use LeakyReLU", hint="model_options.activation=leaky_relu"),
                              Action("Initialise biases at zero", hint="model_options.bias_init=0")])
