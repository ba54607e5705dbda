"""The diagnosis watch: when the detectors run, what they see, and what the run does when one fires.

Detectors read host values only, so they run at read-back boundaries: every step on a CPU, every
``sync_every`` steps on a GPU, and they add no host-device sync of their own. Their schedules are multiples
of ``TICK`` steps; a boundary that already evaluated or copied a checkpoint puts the scheduled check off
to the next one, so those costs never land on one step. A read-back value that is NaN/inf, or a loss above
the divergence detector's own threshold, runs that detector at once. A divergence alert then triggers the
run's ``on_divergence`` policy: pause (explain and wait), rollback, stop, or ignore.

Each alert's lifetime goes to the event log: ``alert`` when it opens (the hook fires then), ``alert_update``
with its newest evidence at the 1st, 2nd, 4th, 8th... check that still finds it (a long episode costs a
few log rows, not one per check), and ``alert_closed`` when its condition clears.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch

from .config import TrainConfig
from .diagnosis import ActivationProbe, Alert, Diagnoser, Signals
from .diagnosis.base import gradient_flow_weights
from .runlog import PRECISION_CODES, RunLog

TICK = 10        # detectors' schedules are multiples of this many steps (fewer ticks: less Python between steps)
WINDOW = 2000    # history rows detectors see


class Policed(Protocol):
    """What the divergence policy does to a run (``Trainer``)."""

    step_count: int
    paused: bool
    rollbacks: int          # rollbacks made so far (the policy gives up at max_rollbacks)

    def hold(self, paused: bool, source: str) -> None: ...
    def stop_by_policy(self) -> bool: ...
    def rollback(self, source: str, lr: float | None) -> bool: ...
    def log_event(self, kind: str, source: str, data: Mapping[str, Any] | None = None,
                  step: int | None = None) -> None: ...


class Watch:
    """Runs the diagnoser on the run's log. ``facts()`` gives what detectors read of the run besides its log
    (task, n_classes, planned_steps, controls); ``probe_batch()`` the inputs the dead-unit probe feeds."""

    def __init__(self, diagnoser: Diagnoser, cfg: TrainConfig, log: RunLog, run: Policed, *,
                 facts: Callable[[], dict[str, Any]], probe_batch: Callable[[], Any],
                 model: torch.nn.Module, on_alert: Callable[[Alert], None]) -> None:
        self.diagnoser, self.cfg, self.log, self.run = diagnoser, cfg, log, run
        self._facts, self._probe_batch, self._model, self._on_alert = facts, probe_batch, model, on_alert
        self.enabled = cfg.diagnose
        self.alarm_loss = math.inf               # a loss above this runs the divergence detector at once
        self.urgent = False                      # a non-finite value arrived: check divergence now
        self.seen = 0                            # losses read back so far (this process)
        self._chance: float | None | bool = False  # log(C) for a classifier, None otherwise (False: not read yet)
        self._flow = gradient_flow_weights(model)
        self._probe: ActivationProbe | None = None
        self._eval_cache: tuple[int, dict[str, np.ndarray]] | None = None

    # ------------------------------------------------------------------ every read-back value
    def see(self, loss: float, grad_norm: float, precision_code: int) -> None:
        """A step's loss and grad norm, as they are read back."""
        self.seen += 1
        track = self.diagnoser.track
        if len(track.firsts) < track.first_n and math.isfinite(loss):
            track.see(self.run.step_count, loss)
            self.alarm_loss = self._divergence_alarm()
        elif loss > track.peak or loss < track.low:
            track.see(self.run.step_count, loss)
        if not (math.isfinite(loss) and (math.isfinite(grad_norm) or precision_code == PRECISION_CODES["fp16"])) \
                or loss > self.alarm_loss:
            self.urgent = True

    def baseline(self, first_losses: list[float]) -> None:
        """The starting losses of a resumed run (from its log), for a run whose checkpoint holds no track."""
        track = self.diagnoser.track
        if track.first is None:
            for i, v in enumerate(first_losses):
                track.see(i + 1, v)
        self.alarm_loss = self._divergence_alarm()

    # ------------------------------------------------------------------ the schedule
    def preflight(self, train: Any, val: Any, task: str) -> None:
        if self.enabled:
            for alert in self.diagnoser.preflight(train, val, task):
                self._raise(alert)

    def tick(self, step: int) -> None:
        """Step ``step`` ended: note the scheduled check it owes (before a save, so a resumed run owes it too)."""
        if self.enabled and step % TICK == 0:
            self.diagnoser.owed = step

    def check_if_due(self, busy: bool) -> None:
        """Run the owed check at a read-back boundary that did no other heavy work; an urgent one at once."""
        if self.enabled and (self.urgent or (self.diagnoser.owed is not None and not self.log.pending and not busy)):
            self.check(after_eval=False)

    def check(self, after_eval: bool) -> None:
        """Run the detectors that are due; raise the alerts that start a new episode."""
        if not self.enabled:
            return
        self.log.flush()
        step = self.run.step_count
        if after_eval:
            names = self.diagnoser.due(step, True)
        else:  # the scheduled check of the step it was due at (this boundary or an earlier one)
            owed, self.diagnoser.owed = self.diagnoser.owed, None
            names = [] if owed is None else self.diagnoser.due(owed, False)
        if self.urgent and "divergence" not in names and "divergence" not in self.diagnoser.muted:
            names.append("divergence")
        self.urgent = False
        if names:
            changes = self.diagnoser.run(names, self._signals())
            for alert in changes.updated:
                if alert.updates & (alert.updates - 1) == 0:   # 1, 2, 4, 8, ...
                    self.run.log_event("alert_update", "trainer", self._lifecycle(alert), step=step)
            for alert in changes.closed:
                self.run.log_event("alert_closed", "trainer", self._lifecycle(alert), step=step)
            for alert in changes.opened:
                self._raise(alert)

    @staticmethod
    def _lifecycle(alert: Alert) -> dict[str, Any]:
        return {"alert": alert.id, "kind": alert.kind, "severity": alert.severity, "message": alert.message,
                "evidence": alert.evidence, "last_step": alert.last_step, "updates": alert.updates,
                "closed_step": alert.closed_step, "actions": [a.__dict__ for a in alert.actions]}

    # ------------------------------------------------------------------ what detectors see
    def _signals(self) -> Signals:
        if self._probe is None:
            x = self._probe_batch()
            self._probe = ActivationProbe(self._model, x if isinstance(x, torch.Tensor) else None)
        facts = self._facts()
        return Signals(step=self.run.step_count,
                       # views, not copies: only this thread appends, and not while detectors run
                       history=self.log.steps.tail(WINDOW, ("step", "train_loss", "grad_norm", "lr"), copy=False),
                       evals=self._eval_tail(), layers=self.log.latest_layers, task=facts["task"],
                       n_classes=facts["n_classes"], planned_steps=facts["planned_steps"],
                       controls=facts["controls"], initial_loss=self.initial_loss(), probe_activations=self._probe,
                       track=self.diagnoser.track, flow=self._flow)

    def initial_loss(self) -> float | None:
        """The starting loss detectors compare with (``LossTrack.baseline``): the median of the first finite
        losses, capped at the first one (or log(C) for a classifier, where higher), so that a loss that blows
        up in the first steps is measured against where it started, not against its own explosion."""
        if self._chance is False:
            facts = self._facts()
            c = facts.get("n_classes")
            self._chance = math.log(c) if facts.get("task") == "classification" and c and c > 1 else None
        return self.diagnoser.track.baseline(self._chance or None)

    def _divergence_alarm(self) -> float:
        """The loss that makes the divergence detector run at the step it is read back rather than on its
        schedule: its own explosion threshold (explode_factor x the starting loss)."""
        det = self.diagnoser.detectors.get("divergence")
        initial = self.initial_loss()
        if not self.enabled or det is None or initial is None:
            return math.inf
        return det.explode_factor * max(initial, 1e-12)

    def _eval_tail(self) -> dict[str, np.ndarray]:
        """The evaluations detectors see, copied again only when a new one was stored."""
        store = self.log.evals_store
        if self._eval_cache is None or self._eval_cache[0] != store.appended:
            self._eval_cache = (store.appended, store.tail(10_000, ("step", "val_loss", "val_acc")))
        return self._eval_cache[1]

    # ------------------------------------------------------------------ alerts and the divergence policy
    def _raise(self, alert: Alert) -> None:
        self.run.log_event("alert", "trainer", alert.to_dict(), step=alert.step)
        self._on_alert(alert)
        if alert.kind == "divergence":
            self._on_divergence(alert)

    def _on_divergence(self, alert: Alert) -> None:
        """The run's divergence policy: pause (explain), rollback (PaLM/OPT), stop, or ignore."""
        run, policy = self.run, self.cfg.on_divergence
        if policy == "rollback":
            if run.rollbacks < self.cfg.max_rollbacks and run.rollback("policy", None):
                return
            policy = "pause"
            run.log_event("policy", "policy", {"policy": "rollback", "outcome": "gave up; pausing",
                                               "rollbacks": run.rollbacks})
        if policy == "pause" and not run.paused:
            run.hold(True, "policy")
            run.log_event("policy", "policy", {"policy": "pause", "alert": alert.id,
                                               "why": "the run diverged; read the alert, then change a control, "
                                                      "roll back, or stop"})
        elif policy == "stop" and run.stop_by_policy():
            run.log_event("policy", "policy", {"policy": "stop", "alert": alert.id})

    def dismiss(self, alert_id: int, source: str) -> None:
        alert = self.diagnoser.dismiss(alert_id)
        self.run.log_event("dismiss", source, {"alert": alert.id, "kind": alert.kind, "muted": alert.detector},
                           step=self.run.step_count)

    def report(self) -> dict[str, Any]:
        """The open alerts plus a short health summary (healthy, warning or critical)."""
        summary = self.diagnoser.summary()
        current = self.diagnoser.current()
        if current:
            text = f"{len(current)} open alert(s): " + ", ".join(f"{a.kind} ({a.severity}, step {a.step})"
                                                                 for a in current)
        else:
            text = f"No problems detected in {self.run.step_count} steps."
        return {**summary, "alerts": current, "summary": text}

    def divergence_open(self) -> bool:
        return bool(self.diagnoser.active.get("divergence"))
