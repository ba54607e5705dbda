"""Two sections of the notebook panel: the diagnosis (open alerts and their one-click actions) and the
checkpoint browser (resume from, fork with changes).

Each is a VBox made once on the caller's thread; the panel's poller only changes values. A section talks to
its panel (``owner``) for the run shown, for reporting an outcome (``_post``/``_say``) and for attaching a
new run after a resume or a fork.
"""
from __future__ import annotations

import ast
import html
import math
from typing import Any

import ipywidgets as widgets

ALERT_SLOTS = 5            # open alerts shown at once (newest first); the rest are counted
ACTION_BUTTONS = 4         # suggested actions shown per alert
SEVERITY_COLORS = {"info": "#1f77b4", "warning": "#ff7f0e", "critical": "#d62728", "healthy": "#2ca02c"}


class AlertsBox(widgets.VBox):
    """The health line and a fixed number of alert slots (message, evidence, action buttons, dismiss)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.health = widgets.HTML()
        self.slots: list[dict[str, Any]] = []
        boxes = []
        for i in range(ALERT_SLOTS):
            text = widgets.HTML()
            actions = []
            for j in range(ACTION_BUTTONS):
                b = widgets.Button(layout=widgets.Layout(width="auto", display="none"))
                b.on_click(lambda _b, i=i, j=j: owner._guard("action", lambda: self.apply_action(i, j)))
                actions.append(b)
            dismiss = widgets.Button(description="dismiss (false alarm)", icon="times",
                                     layout=widgets.Layout(width="auto"))
            dismiss.on_click(lambda _b, i=i: owner._guard("dismiss", lambda: self.dismiss(i)))
            box = widgets.VBox([text, widgets.HBox(actions + [dismiss], layout=widgets.Layout(flex_flow="row wrap"))],
                               layout=widgets.Layout(display="none"))
            self.slots.append({"alert_id": None, "text": text, "actions": actions, "dismiss": dismiss, "box": box})
            boxes.append(box)
        super().__init__([widgets.HTML("<b>Diagnosis</b>"), self.health] + boxes)

    def update(self, report: dict[str, Any]) -> None:
        """Show ``Trainer.diagnose()``'s open alerts, newest first."""
        current = sorted(report["alerts"], key=lambda a: (a.step, a.id), reverse=True)
        color = SEVERITY_COLORS.get(report["health"], "#2ca02c")
        more = len(current) - ALERT_SLOTS
        self.health.value = (f"health: <b style='color:{color}'>{html.escape(report['health'])}</b> — "
                             f"{html.escape(report['summary'])}" + (f" ({more} more in <code>tr.alerts</code>)"
                                                                    if more > 0 else ""))
        for slot, alert in zip(self.slots, current + [None] * ALERT_SLOTS):
            if alert is None:
                slot["alert_id"] = None
                slot["box"].layout.display = "none"
                continue
            slot["alert_id"] = alert.id
            slot["text"].value = (
                f"<div style='border-left:4px solid {SEVERITY_COLORS.get(alert.severity, '#999')};padding:2px 8px'>"
                f"<b>{html.escape(alert.severity)} · {html.escape(alert.kind)}</b> at step {alert.step} "
                f"(confidence {alert.confidence:.0%})<br>{html.escape(alert.message)}<br>"
                f"<small><b>Evidence:</b> {html.escape(alert.evidence)}</small></div>")
            for j, b in enumerate(slot["actions"]):
                action = alert.actions[j] if j < len(alert.actions) else None
                if action is None:
                    b.layout.display = "none"
                    continue
                b.description = action.label
                b.disabled = not action.applicable
                b.tooltip = action.hint or action.label
                b.button_style = "warning" if action.rollback else "info"
                b.layout.display = ""
            slot["box"].layout.display = ""

    def _alert_id(self, i: int) -> int:
        alert_id = self.slots[i]["alert_id"]
        if alert_id is None:
            raise ValueError("this alert is no longer open")
        return alert_id

    def apply_action(self, i: int, j: int) -> None:
        tr, owner = self.owner.trainer, self.owner
        alert_id = self._alert_id(i)
        alert = next((a for a in tr.alerts if a.id == alert_id), None)
        label = alert.actions[j].label if alert is not None and j < len(alert.actions) else f"action {j}"
        req = tr.apply_action(alert_id, j, source="notebook")
        note = "the run is paused: press resume (or step) to continue" if tr.status == "paused" else ""
        owner._post(label, req, note)

    def dismiss(self, i: int) -> None:
        self.owner._post("dismiss", self.owner.trainer.dismiss(self._alert_id(i), source="notebook"))


class CheckpointsBox(widgets.VBox):
    """The run's checkpoints (step · monitored metric · tag), resume from one, or fork from it with changes."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.list = widgets.Select(options=[], rows=6, layout=widgets.Layout(width="100%"))
        self.resume_button = owner.button("resume from", "undo", self.resume_from)
        self.changes = widgets.Text(value="", placeholder="changes, e.g. lr=3e-4, batch_size=32",
                                    layout=widgets.Layout(width="320px"))
        self.fork_button = owner.button("fork with changes", "code-branch", self.fork)
        self._rows: tuple = ()
        super().__init__([widgets.HTML("<b>Checkpoints</b> (step · monitored metric · tag)"), self.list,
                          widgets.HBox([self.resume_button, self.changes, self.fork_button])])

    def reset(self) -> None:
        self._rows = ()

    def update(self, tr: Any) -> None:
        """Show the run's checkpoint table (newest first), keeping the selection when it is still there."""
        table = tr.checkpoints
        rows = tuple((int(r.step), str(r.path), r.metric, str(r.tag)) for r in table.itertuples()) \
            if not table.empty else ()
        if rows == self._rows:
            return
        self._rows = rows
        monitor = tr.cfg.monitor
        options = [(f"step {step:>8,} · {monitor} {_fmt(metric)} · {tag}", path)
                   for step, path, metric, tag in reversed(rows)]
        keep = self.list.value
        self.list.options = options
        paths = [p for _, p in options]
        self.list.value = keep if keep in paths else (paths[0] if paths else None)

    def _selected(self) -> str:
        path = self.list.value
        if not path:
            raise ValueError("select a checkpoint in the list first")
        return path

    def resume_from(self) -> Any:
        """Continue the run from the selected checkpoint (same run directory; later rows are dropped)."""
        new = self.owner.trainer.continue_from(self._selected())
        self.owner.attach(new)
        self.owner._say(f"resumed from step {new.step_count}: press start to continue (panel.trainer is the new run)")
        return new

    def fork(self) -> Any:
        """A new run from the selected checkpoint with the changes typed next to the button."""
        changes = parse_changes(self.changes.value)
        child = self.owner.trainer.fork(checkpoint=self._selected(), source="notebook", **changes)
        self.owner.attach(child)
        self.owner._say(f"forked at step {child.step_count} into {child.run_dir} with {changes or 'no changes'}: "
                        f"press start (panel.trainer is the fork; panel.trainers[-2] the parent)")
        return child


def parse_changes(text: str) -> dict[str, Any]:
    """``"lr=3e-4, batch_size=32"`` -> ``{"lr": 0.0003, "batch_size": 32}`` (values are Python literals;
    a bare word such as ``bf16`` is taken as a string). Raises ValueError on a malformed item."""
    out: dict[str, Any] = {}
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"changes: got {item!r}; allowed: name=value items separated by commas, "
                             f"e.g. lr=3e-4, batch_size=32")
        name, value = (p.strip() for p in item.split("=", 1))
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name] = value
    return out


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return format(f, spec) if math.isfinite(f) else str(f)
