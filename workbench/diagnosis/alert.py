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
    """One diagnosis: kind, severity, the step it fired at, a plain-language message, the evidence (numbers),
    suggested actions, and a confidence in [0, 1]."""

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
        return f"[{self.severity}] {self.kind} at step {self.step}: {self.message} ({self.evidence})"


def reserve_ids(up_to: int) -> None:
    """Make new alert ids start above ``up_to`` (after alerts were restored from a checkpoint)."""
    global _ids
    current = next(_ids)
    _ids = itertools.count(max(current, up_to + 1))


def health_of(severities: Iterable[str]) -> str:
    """A run's health in one word from the severities of its open alerts: critical > warning > healthy."""
    sev = set(severities)
    return "critical" if "critical" in sev else "warning" if "warning" in sev else "healthy"
