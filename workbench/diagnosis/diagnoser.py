"""The diagnoser: runs the detectors on schedule, keeps one alert per episode, honours dismissals."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .alert import Alert, health_of, reserve_ids
from .base import UNCHANGED, Detector, LossTrack, Signals
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


@dataclass
class Changes:
    """What one round of checks did to the alerts: the ones it opened, updated and closed."""

    opened: list[Alert] = field(default_factory=list)
    updated: list[Alert] = field(default_factory=list)
    closed: list[Alert] = field(default_factory=list)


class Diagnoser:
    """Runs detectors and keeps each alert's lifetime.

    A detector that finds its condition opens an alert; while the condition holds, each check updates that
    same alert (its evidence and actions, with the values in force); after ``cooldown`` quiet checks in a
    row the alert closes. A detector re-opens at the earliest ``reopen_after`` steps after its last alert
    closed, a span that grows ``reopen_growth`` times with every episode it had already opened (so a
    condition that comes and goes over a long run is a few alerts, not a storm). A dismissed alert mutes
    its detector for the rest of the run. ``track`` follows the run's loss for the detectors (first loss,
    peak, the low before it)."""

    def __init__(self, detectors: Mapping[str, Detector], cooldown: int = 3, reopen_after: int = 250,
                 reopen_growth: int = 4) -> None:
        self.detectors = dict(detectors)
        self.cooldown = cooldown
        self.reopen_after, self.reopen_growth = reopen_after, reopen_growth
        self.reset()

    def reset(self) -> None:
        self.alerts: list[Alert] = []
        self.open: dict[str, Alert] = {}          # detector -> its open alert
        self.quiet: dict[str, int] = {n: 0 for n in self.detectors}
        self.episodes: dict[str, int] = {n: 0 for n in self.detectors}
        self.closed_at: dict[str, int] = {}       # detector -> step its last alert closed
        self.muted: set[str] = set()
        self.preflight_done = False
        self.owed: int | None = None  # the step of a scheduled check put off to a later boundary
        self.track = LossTrack()

    @property
    def active(self) -> dict[str, bool]:
        """Detector -> whether it has an open alert."""
        return {n: n in self.open for n in self.detectors}

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

    def cooling(self, name: str, step: int) -> bool:
        """The detector's last alert closed too recently for a new one to open."""
        closed = self.closed_at.get(name)
        if closed is None:
            return False
        own = self.detectors[name].reopen_after
        base = self.reopen_after if own is None else own
        wait = base * self.reopen_growth ** max(0, self.episodes.get(name, 1) - 1)
        return step < closed + wait

    def run(self, names: list[str], signals: Signals) -> Changes:
        """Run the named detectors; open, update and close their alerts."""
        signals.track = self.track
        dead = self.detectors.get("dead_units")
        signals.extra.setdefault("dead_fraction", getattr(dead, "worst", 0.0))
        out = Changes()
        for name in names:
            alert = self.detectors[name].check(signals)
            if alert is UNCHANGED:
                continue
            current = self.open.get(name)
            if alert is None:
                self.quiet[name] += 1
                if current is not None and self.quiet[name] >= self.cooldown:
                    current.closed_step = signals.step
                    self.closed_at[name] = signals.step
                    del self.open[name]
                    out.closed.append(current)
                continue
            self.quiet[name] = 0
            if current is not None:
                current.update_from(alert)
                out.updated.append(current)
            elif not self.cooling(name, signals.step):
                alert.detector = name
                self.open[name] = alert
                self.episodes[name] = self.episodes.get(name, 0) + 1
                self.alerts.append(alert)
                out.opened.append(alert)
        return out

    def dismiss(self, alert_id: int) -> Alert:
        """Mark an alert a false alarm; its detector backs off (is muted) for this run."""
        for a in self.alerts:
            if a.id == alert_id:
                a.dismissed = True
                self.muted.add(a.detector or a.kind)
                if self.open.get(a.detector) is a:
                    del self.open[a.detector]
                return a
        raise ValueError(f"alert_id: got {alert_id!r}; allowed: {', '.join(str(a.id) for a in self.alerts) or 'none yet'}")

    def find(self, alert_id: int) -> Alert:
        for a in self.alerts:
            if a.id == alert_id:
                return a
        raise ValueError(f"alert_id: got {alert_id!r}; allowed: {', '.join(str(a.id) for a in self.alerts) or 'none yet'}")

    def current(self) -> list[Alert]:
        """The open alerts: not dismissed, condition not cleared (pre-flight alerts stay until dismissed)."""
        return [a for a in self.alerts if a.open]

    def summary(self) -> dict[str, Any]:
        """Health in one word plus counts: critical > warning > healthy."""
        cur = self.current()
        return {"health": health_of(a.severity for a in cur), "open": len(cur), "total": len(self.alerts),
                "dismissed": sum(a.dismissed for a in self.alerts), "muted": sorted(self.muted)}

    def state_dict(self) -> dict[str, Any]:
        return {"detectors": {n: d.state_dict() for n, d in self.detectors.items()},
                "alerts": [a.to_dict() for a in self.alerts], "open": {n: a.id for n, a in self.open.items()},
                "quiet": dict(self.quiet), "episodes": dict(self.episodes), "closed_at": dict(self.closed_at),
                "muted": sorted(self.muted), "preflight_done": self.preflight_done, "owed": self.owed,
                "track": self.track.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        for n, s in state["detectors"].items():
            if n in self.detectors:
                self.detectors[n].load_state_dict(s)
        self.alerts = [Alert.from_dict(a) for a in state["alerts"]]
        reserve_ids(max((a.id for a in self.alerts), default=0))
        by_id = {a.id: a for a in self.alerts}
        self.open = {n: by_id[i] for n, i in state.get("open", {}).items() if i in by_id}
        self.quiet.update(state["quiet"])
        self.episodes.update(state.get("episodes", {}))
        self.closed_at.update(state.get("closed_at", {}))
        self.track.load_state_dict(state.get("track", {}))
        self.muted = set(state["muted"])
        self.preflight_done = bool(state["preflight_done"])
        self.owed = state.get("owed")  # absent in checkpoints of earlier versions
