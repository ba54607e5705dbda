"""What the dashboard's buttons do, without drawing anything: launch, steer, diagnose, resume, fork.

Every function goes through the engine's public API. A run this process trains is steered by calling
its ``Trainer`` (``set``, ``pause``, ``apply_action`` ...); a run trained by another process (the CLI, a
notebook) is steered by posting to its run directory's inbox through ``RunView``. Either way the result is
an :class:`Outcome` that says when the trainer applied the request, or why it refused it. Bad input raises
the engine's ``ValueError``/``TypeError`` (the page shows its text).
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from workbench import registry
from workbench.config import TrainConfig, parse_override
from workbench.controls import CONTROL_NAMES, Request
from workbench.rundir import new_run_dir
from workbench.trainer import Trainer

from . import settings, sources

WAIT_S = 2.0          # how long a click waits for the trainer to apply a request before showing "pending"


@dataclass
class Outcome:
    """A request the dashboard sent, and how to read its fate (in-process Request or inbox id)."""

    run_dir: str
    what: str
    request: Request | None = None
    inbox_id: int | None = None
    created: float = field(default_factory=time.time)

    def state(self) -> dict[str, Any]:
        """``{"status": pending | applied | refused, "step": int | None, "message": str}``."""
        if self.request is not None:
            r = self.request
            return {"status": r.status, "step": r.step, "message": r.message}
        if self.inbox_id is not None:
            try:
                rec = sources.watched(self.run_dir).view.request(self.inbox_id)
            except Exception as e:  # noqa: BLE001 - the run folder may have gone
                return {"status": "unknown", "step": None, "message": str(e)}
            return {"status": rec["status"], "step": rec["step"], "message": rec["message"]}
        return {"status": "applied", "step": None, "message": ""}

    def text(self) -> str:
        """One line for the page: what, and its fate."""
        s = self.state()
        if s["status"] == "applied":
            where = f" at step {s['step']}" if s["step"] is not None else ""
            extra = f" ({s['message']})" if s["message"] else ""
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
        if name == "lr" and value is None:
            value = raw  # an empty lr is an error the engine names, not "no change"
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
def _reachable(run_dir: str) -> sources.WatchedRun:
    """The WatchedRun of a run another process trains, or an error saying why it cannot be steered."""
    w = sources.watched(run_dir)
    w.refresh()
    meta = w.meta
    status = str(meta.get("status", "unknown"))
    if status in sources.ENDED:
        raise RuntimeError(f"the run has ended (status {status}); fork it from a checkpoint to continue with "
                           f"other controls")
    who = sources.owner(run_dir, meta)
    if not who["alive"]:
        raise RuntimeError(f"no process is training this run (its trainer, pid {who['pid']}, is gone); resume it "
                           f"from the Checkpoints tab")
    return w


def apply_controls(run_dir: str, changes: Mapping[str, Any], wait: float = WAIT_S) -> Outcome:
    """Change live controls of a run: ``Trainer.set`` in this process, else the run's inbox."""
    if not changes:
        raise ValueError(f"set: no control changed; allowed: {', '.join(CONTROL_NAMES)}")
    what = _describe(changes)
    tr = registry.get(run_dir)
    if tr is not None:
        req = tr.set(source="dashboard", **changes).wait(wait)
        return Outcome(run_dir, what, request=req)
    w = _reachable(run_dir)
    rid = w.view.set(source="dashboard", **changes)
    w.view.wait(rid, wait)
    return Outcome(run_dir, what, inbox_id=rid)


def command(run_dir: str, action: str, n: int = 1, tag: str | None = None, wait: float = WAIT_S) -> Outcome:
    """pause, resume, step (n), stop or checkpoint (tag) a run, in this process or through its inbox."""
    what = f"step {n}" if action == "step" else "save checkpoint" if action == "checkpoint" else action
    tr = registry.get(run_dir)
    if tr is not None:
        if action == "checkpoint":
            path = tr.save_checkpoint(tag=tag or None, source="dashboard", timeout=30.0)
            req = Request("checkpoint", source="dashboard")
            req.resolve("applied", tr.step_count, Path(path).name)
            return Outcome(run_dir, what, request=req)
        if action == "step":
            req = tr.step(n, source="dashboard")
        elif action in ("pause", "resume", "stop"):
            req = getattr(tr, action)(source="dashboard")
        else:
            raise ValueError(f"action: got {action!r}; allowed: pause, resume, step, stop, checkpoint")
        return Outcome(run_dir, what, request=req.wait(wait))
    w = _reachable(run_dir)
    args: dict[str, Any] = {"n": n} if action == "step" else {"tag": tag} if action == "checkpoint" and tag else {}
    rid = w.view.command(action, source="dashboard", **args)
    w.view.wait(rid, wait)
    return Outcome(run_dir, what, inbox_id=rid)


# ---------------------------------------------------------------------------- diagnosis
def apply_alert_action(run_dir: str, alert: Mapping[str, Any], index: int, wait: float = WAIT_S) -> Outcome:
    """One click on an alert's suggested action (a rollback included): ``apply_action`` in this process, else
    the same through the run's inbox (the trainer checks the alert and the action and says why it refuses)."""
    actions = alert.get("actions") or []
    if not 0 <= index < len(actions):
        raise ValueError(f"index: got {index!r}; allowed: 0 to {len(actions) - 1}")
    what = f"{alert['kind']}: {actions[index]['label']}"
    tr = registry.get(run_dir)
    if tr is not None:
        return Outcome(run_dir, what, request=tr.apply_action(int(alert["id"]), index, source="dashboard").wait(wait))
    w = _reachable(run_dir)
    rid = w.view.apply_action(int(alert["id"]), index, source="dashboard")
    w.view.wait(rid, wait)
    return Outcome(run_dir, what, inbox_id=rid)


def dismiss_alert(run_dir: str, alert_id: int, wait: float = WAIT_S) -> Outcome:
    """Mark an alert a false alarm: ``dismiss`` in this process, else through the run's inbox."""
    what = f"dismiss alert {alert_id}"
    tr = registry.get(run_dir)
    if tr is not None:
        return Outcome(run_dir, what, request=tr.dismiss(int(alert_id), source="dashboard").wait(wait))
    w = _reachable(run_dir)
    rid = w.view.dismiss(int(alert_id), source="dashboard")
    w.view.wait(rid, wait)
    return Outcome(run_dir, what, inbox_id=rid)


# ---------------------------------------------------------------------------- launching
def base_config(kind: str, yaml_path: str | None = None, scenario: str | None = None) -> TrainConfig:
    """The config a launch starts from: built-in defaults, a YAML file, or a teaching scenario."""
    if kind == "YAML config":
        if not yaml_path or not str(yaml_path).strip():
            raise ValueError("config: no YAML file given; allowed: a path such as configs/demo.yaml")
        path = Path(yaml_path).expanduser()
        if not path.is_absolute() and not path.exists() and (settings.REPO / path).exists():
            path = settings.REPO / path
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
    return TrainConfig.from_dict(values)


def launch(cfg: TrainConfig, paused: bool = False) -> Trainer:
    """Create the run (new directory under ``cfg.runs_root``), register it process-wide and start it."""
    tr = Trainer(cfg)
    registry.add(tr)
    tr.start(paused=paused)
    return tr


def start_demo(runs_root: str) -> Trainer:
    """The demo run (configs/demo.yaml: digits, MLP, Adam, warmup-cosine) under ``runs_root``."""
    return launch(TrainConfig.from_yaml(settings.DEMO_CONFIG).replace(runs_root=runs_root, run_dir=None))


# ---------------------------------------------------------------------------- checkpoints: resume and fork
def _not_running(run_dir: str) -> None:
    tr = registry.get(run_dir)
    if tr is not None and tr.is_alive:
        raise ValueError(f"the run is still going in this app (status {tr.status}); stop it first, or fork it")
    if tr is None:
        who = sources.owner(run_dir)
        if who["alive"]:
            raise ValueError(f"the run is still going in another process (pid {who['pid']}); stop it first, "
                             f"or fork it")


def resume(run_dir: str, checkpoint: str | None = None, paused: bool = False) -> Trainer:
    """Continue an ended run in its own directory from ``checkpoint`` (default: its newest intact one)."""
    _not_running(run_dir)
    tr = Trainer.from_checkpoint(checkpoint or run_dir)
    if registry.key(tr.run_dir) != registry.key(run_dir):
        raise ValueError(f"checkpoint {checkpoint} belongs to run {tr.run_dir}, not {run_dir}")
    sources.forget(run_dir)
    registry.add(tr)
    tr.start(paused=paused)
    return tr


def fork(run_dir: str, checkpoint: str, changes: Mapping[str, Any], runs_root: str) -> Trainer:
    """A new run from ``checkpoint`` of ``run_dir`` with changed controls; it records its parent run and step."""
    from workbench.controls import validate_controls
    import torch

    meta = sources.watched(run_dir).meta if registry.get(run_dir) is None else {}
    tr = registry.get(run_dir)
    n_train = len(tr.train_data) if tr is not None else int(meta.get("n_train", 2**62))
    device = tr.device if tr is not None else torch.device("cpu")
    clean = validate_controls(changes, n_train=n_train, device=device) if changes else {}
    target = new_run_dir(runs_root, f"{Path(run_dir).name}-fork")
    try:
        if tr is not None:
            child = tr.fork(checkpoint=checkpoint, run_dir=target, source="dashboard", **clean)
        else:
            child = Trainer.from_checkpoint(checkpoint, run_dir=target)
            if clean:
                child.set(source="dashboard", **clean)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    registry.add(child)
    child.start()
    return child
