"""Vanishing gradients: the first layers get almost no gradient compared with the last."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .alert import Action, Alert
from .base import LayerDetector, Signals, fmt


class VanishingGradients(LayerDetector):
    """Ratio of the first to the last weight matrix's gradient norm below ``ratio`` for ``patience``
    layer-stat checks (the first/last-layer gradient ratio used by AutoTrainer and Cockpit; saturating
    sigmoid/tanh stacks shrink it geometrically with depth, Glorot & Bengio 2010). The weight matrices are
    those of ``Signals.flow``: embeddings, normalisation layers and a module's own tensors (a learned
    positional embedding) are not steps of depth.
    """

    kind = "vanishing_gradients"
    every = 10
    ratio = 1e-3
    patience = 2
    min_step = 10

    def judge(self, s: Signals, weights: Mapping[str, np.ndarray]) -> Alert | None:
        g, names = weights["grad_norm"], weights["name"]
        if len(g) < 3 or not np.isfinite(g).all() or g[-1] <= 1e-12:
            return None   # no gradient at the last layer either: nothing flows at all (dead units say why)
        r = float(g[0] / max(g[-1], 1e-30))
        if not self.count(r < self.ratio):
            return None
        return Alert(self.kind, "warning", s.step,
                     "The first layers receive almost no gradient, so they barely learn while the last layers do "
                     "all the work. Deep stacks of sigmoid or tanh squash the gradient a little at every layer; "
                     "ReLU-family activations, batch/layer normalisation or residual connections fix this.",
                     f"grad norm of {names[0]} is {fmt(float(g[0]))} vs {fmt(float(g[-1]))} for {names[-1]} "
                     f"(ratio {fmt(r)}, threshold {fmt(self.ratio)}) across {len(g)} weight matrices",
                     confidence=min(1.0, 0.6 + 0.1 * np.log10(self.ratio / max(r, 1e-30))),
                     actions=[Action("Use ReLU activations", hint="model_options.activation=relu"),
                              Action("Add batch normalisation", hint="model_options.norm=batch"),
                              Action("Use fewer layers", hint="model_options.depth=3")])
