"""Alerts: what a detector says, with the numbers behind it and the fixes a view can apply in one click."""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

KINDS = ("divergence", "loss_spike", "exploding_gradients", "vanishing_gradients", "overfitting", "underfitting",
         "plateau", "lr_too_high", "lr_too_low", "dead_units", "data_leakage", "class_imbalance",
         "unnormalized_inputs", "nan_inputs")
SEVERITIES = ("info", "warning", "critical")

_ids = itertools.count(1)


@dataclass
class Action:
    """A suggested fix. ``controls`` go through ``Trainer.set``; ``rollback`` rewinds to the last good state
    first. An action with neither is advice for the next run (``hint``), shown but not clickable."""

    label: str
    controls: dict[str, Any] = field(default_factory=dict)
    rollback: bool = False
    hint: str | None = None

    @property
    def applicable(self) -> bool:
        return bool(self.controls) or self.rollback


@dataclass
class Alert:
    """One diagnosis: kind, severity, the step it opened at, a plain-language message, the evidence (numbers),
    suggested actions, and a confidence in [0, 1].

    An alert lives as long as its condition: it opens at ``step``, stays one alert while the condition holds
    (each check that still finds it rewrites ``message``, ``evidence`` and ``actions`` with the values in
    force and sets ``last_step``; ``updates`` counts those checks) and closes at ``closed_step`` when the
    condition has cleared. Pre-flight data alerts describe the data and stay open until dismissed."""

    kind: str
    severity: str
    step: int
    message: str
    evidence: str
    actions: list[Action] = field(default_factory=list)
    confidence: float = 0.5
    detector: str = ""
    id: int = field(default_factory=lambda: next(_ids))
    time: float = field(default_factory=time.time)
    dismissed: bool = False
    last_step: int | None = None      # the step of the newest evidence (None: only the opening one)
    updates: int = 0                  # checks since opening that found the condition still there
    closed_step: int | None = None    # the step the condition was found cleared (None: still open)

    @property
    def open(self) -> bool:
        """Its condition still holds and nobody marked it a false alarm."""
        return not self.dismissed and self.closed_step is None

    def update_from(self, newer: "Alert") -> None:
        """Take the newer check's words and numbers; the severity never drops while the alert is open."""
        self.message, self.evidence, self.actions = newer.message, newer.evidence, newer.actions
        self.confidence = max(self.confidence, newer.confidence)
        if SEVERITIES.index(newer.severity) > SEVERITIES.index(self.severity):
            self.severity = newer.severity
        self.last_step = newer.step
        self.updates += 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: got {self.kind!r}; allowed: {', '.join(KINDS)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity: got {self.severity!r}; allowed: {', '.join(SEVERITIES)}")
        self.confidence = float(min(1.0, max(0.0, self.confidence)))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for the event log, checkpoints and views)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Alert":
        d = dict(d)
        d["actions"] = [Action(**a) for a in d.get("actions", [])]
        return cls(**d)

    def __str__(self) -> str:
        span = f"step {self.step}" + (f"-{self.closed_step}" if self.closed_step is not None else "")
        return f"[{self.severity}] {self.kind} at {span}: {self.message} ({self.evidence})"


def reserve_ids(up_to: int) -> None:
    """Make new alert ids start above ``up_to`` (after alerts were restored from a checkpoint)."""
    global _ids
    current = next(_ids)
    _ids = itertools.count(max(current, up_to + 1))


def health_of(severities: Iterable[str]) -> str:
    """A run's health in one word from the severities of its open alerts: critical > warning > healthy."""
    sev = set(severities)
    return "critical" if "critical" in sev else "warning" if "warning" in sev else "healthy"
