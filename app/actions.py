"""What the dashboard's buttons do, without drawing anything: read form values, and make one call on the
engine's run handle (workbench.handle) for each click.

A run this process trains and a run another process trains (the CLI, a notebook) are steered the same way:
``open_run(run_dir).ask(action, args)``; the handle checks the request and says when the trainer applied it,
or why it refused. Bad input raises the engine's ``ValueError``/``TypeError``, which the page shows.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from workbench import handle
from workbench.config import TrainConfig, parse_override
from workbench.controls import CONTROL_NAMES, CONTROLS

from . import settings

WAIT_S = 0.5          # how long a click waits for the trainer before showing "pending" (a fragment follows it)


@dataclass
class Outcome:
    """A request the dashboard sent: what it asked, in words, and its ticket (workbench.handle.Ticket)."""

    run_dir: str
    what: str
    ticket: Any
    created: float = field(default_factory=time.time)
    message_is_path: bool = False   # the trainer answers with a file's path; the page shows its name

    def state(self) -> dict[str, Any]:
        """``{"status": pending | applied | refused | unknown, "step": int | None, "message": str}``."""
        try:
            return self.ticket.state()
        except Exception as e:  # noqa: BLE001 - the run folder may have gone since
            return {"status": "unknown", "step": None, "message": str(e)}

    def text(self) -> str:
        """One line for the page: what, and its fate."""
        s = self.state()
        if s["status"] == "applied":
            where = f" at step {s['step']}" if s["step"] is not None else ""
            message = Path(s["message"]).name if self.message_is_path else s["message"]
            extra = f" ({message})" if message else ""
            return f"{self.what}: applied{where}{extra}"
        if s["status"] == "refused":
            return f"{self.what}: refused — {s['message']}"
        return f"{self.what}: {s['status']} (waiting for the trainer)"


# ---------------------------------------------------------------------------- parsing form values
def parse_value(name: str, text: Any) -> Any:
    """A form field's text read like ``--set`` does (YAML: 3e-4, none, true); empty means None."""
    if not isinstance(text, str):
        return text
    if not text.strip():
        return None
    try:
        return parse_override(f"{name}={text}")[1]
    except yaml.YAMLError:
        raise ValueError(f"{name}: got {text!r}, which is not a value; allowed: a number, e.g. 3e-4") from None


def changed_controls(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The controls in ``wanted`` whose parsed values differ from those in force (``current``)."""
    out: dict[str, Any] = {}
    for name, raw in wanted.items():
        value = parse_value(name, raw)
        if name in ("lr", "weight_decay") and value is None:
            value = raw  # an empty number is an error the engine names, not "no change"
        if not _same(current.get(name), value):
            out[name] = value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _describe(changes: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in changes.items())


# ---------------------------------------------------------------------------- steering
@dataclass
class Refused:
    """The ticket of a request the engine refused before queueing it (bad input, a run nobody trains)."""

    message: str

    def state(self) -> dict[str, Any]:
        return {"status": "refused", "step": None, "message": self.message}

    def wait(self, timeout: float | None = None) -> "Refused":
        return self


def ask(run_dir: str, action: str, args: Mapping[str, Any] | None, what: str, wait: float = WAIT_S) -> Outcome:
    """Post one request of the engine's vocabulary to the run and wait up to ``wait`` s for its fate. A
    request the engine refuses at once is an outcome too (refused, with the engine's reason), so every
    click is listed with its answer."""
    try:
        ticket = handle.open_run(run_dir).ask(action, args, source="dashboard")
    except (ValueError, TypeError, RuntimeError) as e:
        return Outcome(run_dir, what, Refused(str(e)))
    return Outcome(run_dir, what, ticket.wait(wait), message_is_path=action == "checkpoint")


def apply_controls(run_dir: str, changes: Mapping[str, Any], wait: float = WAIT_S) -> Outcome:
    """Change live controls of a run."""
    if not changes:
        raise ValueError(f"set: no control changed; allowed: {', '.join(CONTROL_NAMES)}")
    return ask(run_dir, "set", changes, _describe(changes), wait)


def command(run_dir: str, action: str, n: int = 1, tag: str | None = None, wait: float = WAIT_S) -> Outcome:
    """pause, resume, step (n), stop or checkpoint (tag) a run."""
    args: dict[str, Any] = {"n": n} if action == "step" else {"tag": tag} if action == "checkpoint" and tag else {}
    what = f"step {n}" if action == "step" else "save checkpoint" if action == "checkpoint" else action
    return ask(run_dir, action, args, what, wait)


def apply_alert_action(run_dir: str, alert: Mapping[str, Any], index: int, wait: float = WAIT_S) -> Outcome:
    """One click on an alert's suggested action (a rollback included); the trainer checks that the alert and
    the action exist and says why it refuses."""
    actions = alert.get("actions") or []
    label = actions[index]["label"] if 0 <= index < len(actions) else f"action {index}"
    return ask(run_dir, "alert_action", {"alert": int(alert["id"]), "index": index}, f"{alert['kind']}: {label}",
               wait)


def dismiss_alert(run_dir: str, alert_id: int, wait: float = WAIT_S) -> Outcome:
    """Mark an alert a false alarm."""
    return ask(run_dir, "dismiss", {"alert": int(alert_id)}, f"dismiss alert {alert_id}", wait)


def checkpoint_controls(run: Any, path: str) -> dict[str, Any]:
    """The live controls in force when ``path`` was saved: what a fork from it starts with.

    Read from the run's event log: the checkpoint's own event names them; a run that logged none there is
    replayed (its config's values, then every control change logged before that checkpoint). Falls back to
    the run's controls in force when the log does not mention the file."""
    events = run.events
    rows = events.to_dict("records") if len(events) else []
    at = next((i for i in range(len(rows) - 1, -1, -1) if rows[i]["kind"] == "checkpoint"
               and str((rows[i]["data"] or {}).get("path")) == str(path)), None)
    current = dict(run.snapshot().get("controls") or {})
    if at is None:
        return current
    saved = (rows[at]["data"] or {}).get("controls")
    if saved:
        return {spec.name: saved.get(spec.name, current.get(spec.name)) for spec in CONTROLS}
    config = run.config or {}
    out = {spec.name: config.get(spec.name, current.get(spec.name)) for spec in CONTROLS}
    for row in rows[:at]:
        d = row["data"] or {}
        if row["kind"] == "control" and d.get("field") in out:
            out[d["field"]] = d.get("new")
    return out


# ---------------------------------------------------------------------------- launching
def base_config(kind: str, yaml_path: str | None = None, scenario: str | None = None) -> TrainConfig:
    """The config a launch starts from: built-in defaults, a YAML file, or a teaching scenario."""
    if kind == "YAML config":
        if not yaml_path or not str(yaml_path).strip():
            raise ValueError("config: no YAML file given; allowed: a path such as configs/demo.yaml")
        path = Path(yaml_path).expanduser()
        if not path.is_absolute() and not path.exists() and (settings.REPO / path).exists():
            path = settings.REPO / path
        path = settings.confine(path, "config")  # before anything is read: no content of a refused file is shown
        if not path.is_file():
            raise ValueError(f"config: {yaml_path!r} is not a file; allowed: a YAML file of config fields")
        return TrainConfig.from_yaml(path)
    if kind == "Scenario":
        from workbench.scenarios import scenario_config

        return scenario_config(scenario or "")
    return TrainConfig()


def build_config(base: TrainConfig, fields: Mapping[str, Any], overrides: str = "",
                 runs_root: str | None = None) -> TrainConfig:
    """``base`` with the form's fields, then ``key=value`` override lines (as ``--set``), validated by the engine."""
    values = base.to_dict()
    names = TrainConfig.field_names()
    for key, raw in fields.items():
        values[key] = parse_value(key, raw) if key not in ("dataset", "model", "name") else (raw or None)
    for line in (overrides or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, value = parse_override(line)
        if key not in names:
            raise ValueError(f"override {line!r}: unknown key {key!r}; valid keys: {', '.join(names)}")
        if "." in line.partition("=")[0]:
            if not isinstance(values[key], dict):
                raise ValueError(f"override {line!r}: {key!r} is not a mapping, so it takes no dotted key")
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    values["run_dir"] = None
    if runs_root is not None:
        values["runs_root"] = runs_root
    values["runs_root"] = str(settings.confine(values["runs_root"], "runs_root"))
    dataset = values.get("dataset")
    if isinstance(dataset, str) and dataset.strip().lower().startswith("csv:"):  # every spelling the loader reads
        values["dataset"] = "csv:" + str(settings.confine(dataset.strip()[4:].strip(), "dataset"))
    return TrainConfig.from_dict(values)


def start_demo(runs_root: str) -> Any:
    """The demo run (configs/demo.yaml: digits, MLP, Adam, warmup-cosine) under ``runs_root``."""
    return handle.launch(TrainConfig.from_yaml(settings.DEMO_CONFIG).replace(runs_root=runs_root, run_dir=None))
