"""Learning-rate schedules as a multiplier on a base LR.

The trainer sets ``lr = base_lr * schedule.factor(step)`` on every optimizer step. Keeping the shape
(``factor``) apart from the scale (``base_lr``) is what lets a live ``set(lr=...)`` change the peak LR
while the schedule's shape carries on from the same step.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

SCHEDULE_OPTIONS: dict[str, dict[str, Any]] = {
    "constant": {},
    "cosine": {"min_lr_ratio": 0.0},
    "warmup_cosine": {"warmup_steps": None, "min_lr_ratio": 0.0},
    "step": {"step_size": 1000, "gamma": 0.1},
    "plateau": {"factor": 0.5, "patience": 3, "threshold": 1e-4, "min_lr_ratio": 1e-3},
    "onecycle": {"pct_start": 0.3, "div_factor": 25.0, "final_div_factor": 1e4},
}


def check_schedule_options(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Return the options merged over the defaults; unknown or bad options name what is allowed."""
    defaults = SCHEDULE_OPTIONS[kind]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise ValueError(f"schedule_options: unknown option(s) {', '.join(map(repr, unknown))} for schedule "
                         f"{kind!r}; allowed: {allowed}")
    merged = {**defaults, **options}
    for key, value in merged.items():
        if value is None and key == "warmup_steps":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"schedule_options.{key}: got {value!r}; allowed: a finite number >= 0")
    if kind == "onecycle" and not 0 < merged["pct_start"] < 1:
        raise ValueError(f"schedule_options.pct_start: got {merged['pct_start']!r}; allowed: 0 < pct_start < 1")
    if kind in ("step", "plateau") and not 0 < merged.get("gamma", merged.get("factor")) < 1:
        name = "gamma" if kind == "step" else "factor"
        raise ValueError(f"schedule_options.{name}: got {merged[name]!r}; allowed: 0 < {name} < 1")
    return merged


class Schedule:
    """An LR multiplier as a function of the step (0-based: the step about to run).

    ``total_steps`` is the planned run length (needed by cosine, warmup_cosine and onecycle).
    Reduce-on-plateau is the one stateful kind: ``observe(metric)`` after each evaluation.
    """

    def __init__(self, kind: str, options: Mapping[str, Any] | None = None, total_steps: int | None = None,
                 mode: str = "min") -> None:
        self.kind = kind
        self.options = check_schedule_options(kind, options or {})
        self.total_steps = total_steps
        self.mode = mode
        # reduce-on-plateau state (counters reset in one place: _reset_plateau)
        self.plateau_scale = 1.0
        self._reset_plateau()

    def _reset_plateau(self) -> None:
        self.best: float | None = None
        self.bad_evals = 0

    def factor(self, step: int) -> float:
        """Multiplier on the base LR for the (0-based) step about to run."""
        o, kind = self.options, self.kind
        if kind == "constant":
            return 1.0
        if kind == "plateau":
            return self.plateau_scale
        if kind == "step":
            return o["gamma"] ** (step // max(1, int(o["step_size"])))
        total = max(1, self.total_steps or 1)
        if kind == "cosine":
            return _cosine(min(step, total) / total, o["min_lr_ratio"])
        if kind == "warmup_cosine":
            warm = o["warmup_steps"]
            warm = max(1, total // 20) if warm is None else int(warm)
            if step < warm:
                return (step + 1) / warm
            return _cosine(min(step - warm, total - warm) / max(1, total - warm), o["min_lr_ratio"])
        if kind == "onecycle":
            up = max(1, int(o["pct_start"] * total))
            lo = 1.0 / o["div_factor"]
            end = lo / o["final_div_factor"]
            if step < up:
                return lo + (1 - lo) * (1 - math.cos(math.pi * step / up)) / 2
            t = min(step - up, total - up) / max(1, total - up)
            return end + (1 - end) * (1 + math.cos(math.pi * t)) / 2
        raise AssertionError(kind)

    def observe(self, metric: float) -> bool:
        """Feed an eval metric (reduce-on-plateau only). Returns True when the LR was reduced."""
        if self.kind != "plateau" or not math.isfinite(metric):
            return False
        o = self.options
        better = (self.best is None or
                  (metric < self.best - o["threshold"] if self.mode == "min" else metric > self.best + o["threshold"]))
        if better:
            self.best, self.bad_evals = metric, 0
            return False
        self.bad_evals += 1
        if self.bad_evals > o["patience"]:
            new = max(self.plateau_scale * o["factor"], o["min_lr_ratio"])
            reduced = new < self.plateau_scale
            self.plateau_scale = new
            self.bad_evals = 0
            return reduced
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "options": dict(self.options), "total_steps": self.total_steps,
                "plateau_scale": self.plateau_scale, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.kind = state["kind"]
        self.options = dict(state["options"])
        self.total_steps = state["total_steps"]
        self.plateau_scale = float(state["plateau_scale"])
        self.best = state["best"]
        self.bad_evals = int(state["bad_evals"])


def _cosine(progress: float, floor: float) -> float:
    return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2
