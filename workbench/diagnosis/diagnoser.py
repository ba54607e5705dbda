"""The diagnoser: runs the detectors on schedule, keeps one alert per episode, honours dismissals."""
from __future__ import annotations

from typing import Any, Mapping

from .alert import Alert, health_of, reserve_ids
from .base import UNCHANGED, Detector, Signals
from .data_checks import preflight
from .dead_units import DeadUnits
from .divergence import Divergence
from .exploding_gradients import ExplodingGradients
from .loss_spike import LossSpike
from .lr_too_high import LRTooHigh
from .lr_too_low import LRTooLow
from .overfitting import Overfitting
from .plateau import Plateau
from .underfitting import Underfitting
from .vanishing_gradients import VanishingGradients

DETECTORS: dict[str, type[Detector]] = {
    "divergence": Divergence, "loss_spike": LossSpike, "exploding_gradients": ExplodingGradients,
    "vanishing_gradients": VanishingGradients, "overfitting": Overfitting, "underfitting": Underfitting,
    "plateau": Plateau, "lr_too_high": LRTooHigh, "lr_too_low": LRTooLow, "dead_units": DeadUnits,
}


def default_detectors(options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Detector]:
    """One instance of every detector; ``options`` = {detector name: {option: value}} (validated)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(DETECTORS))
    if unknown:
        raise ValueError(f"diagnosis_options: unknown detector(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(DETECTORS)}")
    return {name: cls(**options.get(name, {})) for name, cls in DETECTORS.items()}


class Diagnoser:
    """Runs detectors; an alert fires once per episode (until its detector has been quiet for ``cooldown``
    checks); a dismissed alert mutes its detector for the rest of the run."""

    def __init__(self, detectors: Mapping[str, Detector], cooldown: int = 3) -> None:
        self.detectors = dict(detectors)
        self.cooldown = cooldown
        self.reset()

    def reset(self) -> None:
        self.alerts: list[Alert] = []
        self.active: dict[str, bool] = {n: False for n in self.detectors}
        self.quiet: dict[str, int] = {n: 0 for n in self.detectors}
        self.muted: set[str] = set()
        self.preflight_done = False
        self.owed: int | None = None  # the step of a scheduled check put off to a later boundary

    def preflight(self, train: Any, val: Any, task: str) -> list[Alert]:
        """Data checks before the first step (once per run, not again on resume)."""
        if self.preflight_done:
            return []
        self.preflight_done = True
        found = [a for a in preflight(train, val, task) if a.kind not in self.muted]
        self.alerts.extend(found)
        return found

    def due(self, step: int, after_eval: bool) -> list[str]:
        return [n for n, d in self.detectors.items() if n not in self.muted and d.should_check(step, after_eval)]

    def run(self, names: list[str], signals: Signals) -> list[Alert]:
        """Run the named detectors; return the alerts that start a new episode."""
        new = []
        for name in names:
            alert = self.detectors[name].check(signals)
            if alert is UNCHANGED:
                continue
            if alert is None:
                self.quiet[name] += 1
                if self.quiet[name] >= self.cooldown:
                    self.active[name] = False
                continue
            self.quiet[name] = 0
            if not self.active[name]:
                self.active[name] = True
                alert.detector = name
                self.alerts.append(alert)
                new.append(alert)
        return new

    def dismiss(self, alert_id: int) -> Alert:
        """Mark an alert a false alarm; its detector backs off (is muted) for this run."""
        for a in self.alerts:
            if a.id == alert_id:
                a.dismissed = True
                self.muted.add(a.detector or a.kind)
                return a
        raise ValueError(f"alert_id: got {alert_id!r}; allowed: {', '.join(str(a.id) for a in self.alerts) or 'none yet'}")

    def find(self, alert_id: int) -> Alert:
        for a in self.alerts:
            if a.id == alert_id:
                return a
        raise ValueError(f"alert_id: got {alert_id!r}; allowed: {', '.join(str(a.id) for a in self.alerts) or 'none yet'}")

    def current(self) -> list[Alert]:
        """Alerts not dismissed whose episode is still open (pre-flight alerts stay until dismissed)."""
        return [a for a in self.alerts if not a.dismissed and (a.detector == "data_checks" or
                                                               self.active.get(a.detector, False))]

    def summary(self) -> dict[str, Any]:
        """Health in one word plus counts: critical > warning > healthy."""
        cur = self.current()
        return {"health": health_of(a.severity for a in cur), "open": len(cur), "total": len(self.alerts),
                "dismissed": sum(a.dismissed for a in self.alerts), "muted": sorted(self.muted)}

    def state_dict(self) -> dict[str, Any]:
        return {"detectors": {n: d.state_dict() for n, d in self.detectors.items()},
                "alerts": [a.to_dict() for a in self.alerts], "active": dict(self.active), "quiet": dict(self.quiet),
                "muted": sorted(self.muted), "preflight_done": self.preflight_done, "owed": self.owed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        for n, s in state["detectors"].items():
            if n in self.detectors:
                self.detectors[n].load_state_dict(s)
        self.alerts = [Alert.from_dict(a) for a in state["alerts"]]
        reserve_ids(max((a.id for a in self.alerts), default=0))
        self.active.update(state["active"])
        self.quiet.update(state["quiet"])
        self.muted = set(state["muted"])
        self.preflight_done = bool(state["preflight_done"])
        self.owed = state.get("owed")  # absent in checkpoints of earlier versions
