"""Dead units: ReLU units that output zero for every input, so they never learn again."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .alert import Action, Alert
from .base import UNCHANGED, Detector, Signals


class DeadUnits(Detector):
    """Fraction of ReLU units that are zero on every sample of a fixed probe batch; fires when a layer with at
    least ``min_units`` units has more than ``fraction`` dead. A dead ReLU gets zero gradient, so it
    stays dead (Lu et al. 2019, "Dying ReLU"). This instrument runs the model on the probe batch
    (eval mode, no grad) — the one detector that looks at the model itself.

    The first check (at ``min_step``) runs the whole probe batch at once, for an early answer. After
    that a large model's batch is run a slice at a time, spread over ``span`` steps (the probe's
    ``parts``, up to one slice per check), and the layers are judged once every slice has run: one
    forward pass over the whole batch every 100 steps was half a step's time on one step (4.7 ms on a
    10 ms step of the medium MLP). A unit still counts as dead only if no probe sample made it fire.
    A small model's batch is run whole once per ``span`` steps, as slicing it would cost more.
    """

    kind = "dead_units"
    every = 10
    span = 100
    fraction = 0.5
    min_units = 8
    min_step = 20

    def reset(self) -> None:
        super().reset()
        self.worst = 0.0             # dead fraction of the worst layer at the last judgement (the lr pair reads it)
        self.primed = False          # the first, whole-batch check has run
        self.calls = 0               # checks since then
        self.part = 0                # the next slice of the probe batch
        self._fired: dict[str, np.ndarray] = {}  # units that fired on the slices run so far

    def should_check(self, step: int, after_eval: bool) -> bool:
        return step >= self.min_step and (step == self.min_step or (self.every > 0 and step % self.every == 0))

    def check(self, s: Signals) -> Any:
        probe = s.probe_activations
        if probe is None:
            return None
        if not self.primed:
            self.primed = True
            return self._judge(s, probe())
        checks = max(1, self.span // max(self.every, 1))  # checks per round
        parts = max(1, min(int(getattr(probe, "parts", 1)), checks))
        self.calls += 1
        if self.calls % (checks // parts):
            return UNCHANGED  # not this slice's turn
        for name, alive in probe(self.part, parts).items():
            self._fired[name] = alive | self._fired[name] if name in self._fired else alive
        self.part += 1
        if self.part < parts:
            return UNCHANGED
        fired, self._fired, self.part = self._fired, {}, 0
        return self._judge(s, fired)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fired": {n: torch.from_numpy(a) for n, a in self._fired.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        fired = state.pop("fired", {})
        super().load_state_dict(state)
        self._fired = {n: t.numpy().astype(bool) for n, t in fired.items()}

    def _judge(self, s: Signals, fired: Mapping[str, np.ndarray]) -> Alert | None:
        """``fired``: layer -> bool array (the unit fired on at least one probe sample)."""
        worst, worst_name, worst_units = 0.0, "", 0
        for name, alive in fired.items():
            if alive.size >= self.min_units:
                dead = 1.0 - float(np.mean(alive))
                if dead > worst:
                    worst, worst_name, worst_units = dead, name, alive.size
        self.worst = worst
        if worst <= self.fraction:
            return None
        lr = s.base_lr
        return Alert(self.kind, "warning", s.step,
                     "Many ReLU units are dead: they output zero for every input, get no gradient and so never "
                     "recover. Large negative biases, a learning rate that once pushed weights too far, or a poor "
                     "initialisation cause it.",
                     f"{worst:.0%} of the {worst_units} units after {worst_name} never fire on a probe batch",
                     confidence=min(1.0, worst),
                     actions=[Action("Lower the lr 3x", {"lr": lr / 3}),
                              Action("Use LeakyReLU", hint="model_options.activation=leaky_relu"),
                              Action("Initialise biases at zero", hint="model_options.bias_init=0")])


class ActivationProbe:
    """Records which units of each ReLU module fire on a fixed probe batch (for the dead-unit detector).

    ``parts``: in how many slices the batch is best run, so that one slice costs about
    ``WORK_PER_SLICE`` multiply-adds (parameters x samples, a rough forward cost): 1 for a small model,
    where a slice would cost more in fixed overhead than it saves, up to ``MAX_PARTS`` for a large one.
    Deterministic (no timing), so a resumed run probes exactly as the uninterrupted one."""

    WORK_PER_SLICE = 2e7
    MAX_PARTS = 10

    def __init__(self, model: torch.nn.Module, probe_x: torch.Tensor | None) -> None:
        self.model, self.x = model, probe_x
        self.relus = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ReLU)]
        work = sum(p.numel() for p in model.parameters()) * (len(probe_x) if probe_x is not None else 0)
        self.parts = int(min(self.MAX_PARTS, max(1, math.ceil(work / self.WORK_PER_SLICE))))

    def __call__(self, part: int = 0, parts: int = 1) -> dict[str, np.ndarray]:
        """Which units fired on slice ``part`` of ``parts`` of the probe batch (the whole batch by default)."""
        if self.x is None or not self.relus:
            return {}
        n = len(self.x)
        x = self.x[part * n // parts:(part + 1) * n // parts]
        if not len(x):
            return {}
        fired: dict[str, torch.Tensor] = {}

        def make(name: str) -> Callable:
            def hook(_m: torch.nn.Module, _inp: Any, out: torch.Tensor) -> None:
                a = out.detach().reshape(out.shape[0], -1) if out.dim() > 1 else out.detach()[None]
                fired[name] = (a > 0).any(dim=0)
            return hook
        handles = [m.register_forward_hook(make(n)) for n, m in self.relus]
        was_training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(x)
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        return {n: f.cpu().numpy() for n, f in fired.items()}
