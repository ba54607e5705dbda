"""Requests: the one vocabulary of what a script, a view, a hook or another process may ask of a run, and the
one table that checks and applies each action.

The path of a request::

    caller ──► make_request(action, args)      checked in the caller's thread: bad input raises here,
                    │                          naming the field and what is allowed; the run is untouched
                    ▼
               RequestQueue.post               refused at once when the run has ended
                    │
    trainer thread, between two steps:
               ACTIONS[action].apply(...)      the one place where it takes effect
                    ▼
               event log (who, what, at which step) and the request's outcome: applied at step N, or
               refused with the reason

``Trainer.set()``/``pause()``/... (this process) and the run directory's inbox (another process: the
dashboard, ``RunView``) both go through :func:`make_request`; only the origin differs. Adding an action is
one row of :data:`ACTIONS` plus its two functions here.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from .config import check_choice, check_int
from .controls import CONTROL_NAMES, validate_controls

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

SOURCES = ("api", "notebook", "dashboard", "cli", "policy")
STATUSES = ("idle", "running", "paused", "stopped", "finished", "failed")
ENDED = ("finished", "stopped", "failed")
OUTCOMES = ("applied", "refused")   # what a request resolves to (it starts "pending")


def check_source(source: str) -> str:
    """Sources name who asked for a change in the event log."""
    return check_choice("source", source, SOURCES)


_ids = itertools.count(1)


@dataclass
class Request:
    """A queued change or command. ``wait()`` blocks until the trainer applied or refused it."""

    action: str
    args: dict[str, Any] = field(default_factory=dict)
    source: str = "api"
    inbox_id: int | None = None     # id in the run's SQLite inbox when it came from another process
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.time)
    status: str = "pending"         # pending, applied, refused
    step: int | None = None         # the first step that runs with the change
    message: str = ""
    result: Any = None
    on_done: Callable[["Request"], None] | None = field(default=None, repr=False, compare=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def resolve(self, status: str, step: int | None, message: str = "", result: Any = None) -> None:
        self.status, self.step, self.message, self.result = status, step, message, result
        self._done.set()
        if self.on_done is not None:
            self.on_done(self)

    def wait(self, timeout: float | None = None) -> "Request":
        """Block until the trainer has handled the request (or ``timeout`` seconds pass)."""
        self._done.wait(timeout)
        return self

    @property
    def done(self) -> bool:
        return self._done.is_set()


@dataclass(frozen=True)
class RunFacts:
    """What checking a request needs to know of its run. A run in another process is checked with what its
    run directory says (``device`` and ``find_alert`` None); its trainer checks the rest when it arrives."""

    n_train: int | None = None
    device: "torch.device | None" = None
    find_alert: Callable[[int], Any] | None = None
    fixed: str | None = None          # why the batch size cannot change (data the workbench does not sample)


# ---------------------------------------------------------------------------- checking (caller's thread)
def _no_args(facts: RunFacts, args: Mapping[str, Any]) -> dict[str, Any]:
    if args:
        raise ValueError(f"got argument(s) {', '.join(map(repr, args))}; allowed: none")
    return {}


def _check_set(facts: RunFacts, args: Mapping[str, Any]) -> dict[str, Any]:
    if facts.fixed and isinstance(args, Mapping) and "batch_size" in args:
        raise ValueError(f"batch_size: cannot change in this run: {facts.fixed}")
    return validate_controls(args, n_train=facts.n_train, device=facts.device)


def _check_step(facts: RunFacts, args: Mapping[str, Any]) -> dict[str, Any]:
    _only(args, ("n",))
    return {"n": check_int("n", args.get("n", 1), minimum=1)}


def _check_checkpoint(facts: RunFacts, args: Mapping[str, Any]) -> dict[str, Any]:
    from .checkpoint import checkpoint_name

    _only(args, ("tag",))
    tag = args.get("tag") or None
    if tag is not None:
        checkpoint_name(0, tag)  # the tag becomes part of a file name
    return {"tag": tag}


def _check_dismiss(facts: RunFacts, args: Mapping[str, Any]) -> dict[str, Any]:
    _only(args, ("alert",))
    alert = check_int("alert", args.get("alert"), minimum=0)
    if facts.find_alert is not None:
        facts.find_alert(alert)
    return {"alert": alert}


def _check_rollback(facts: RunFacts, args: Mapping[str, Any]) -> dict[str, Any]:
    return validate_controls(args, n_train=facts.n_train, device=facts.device) if args else {}


def suggested_action(facts: RunFacts, alert_id: int, index: int) -> Any:
    """Suggested action ``index`` of alert ``alert_id``, once both exist and it can be applied."""
    alert = facts.find_alert(alert_id)
    if not 0 <= index < len(alert.actions):
        raise ValueError(f"index: got {index!r}; allowed: 0 to {len(alert.actions) - 1}")
    action = alert.actions[index]
    if not action.applicable:
        raise ValueError(f"action {action.label!r} is advice for the next run ({action.hint}); nothing to apply")
    return action


def _check_alert_action(facts: RunFacts, args: Mapping[str, Any]) -> dict[str, Any]:
    _only(args, ("alert", "index"))
    out = {"alert": check_int("alert", args.get("alert"), minimum=0),
           "index": check_int("index", args.get("index", 0), minimum=0)}
    if facts.find_alert is not None:
        action = suggested_action(facts, out["alert"], out["index"])
        if action.controls:
            validate_controls(action.controls, n_train=facts.n_train, device=facts.device)
    return out


def _only(args: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = [k for k in args if k not in allowed]
    if unknown:
        raise ValueError(f"got argument(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")


# ---------------------------------------------------------------------------- applying (trainer thread)
class Boundary(Protocol):
    """What the handlers below use of a run, on its trainer thread between two steps (``Trainer``)."""

    step_count: int
    paused: bool
    facts: RunFacts

    def apply_controls(self, controls: Mapping[str, Any], source: str) -> dict[str, tuple[Any, Any]]: ...
    def hold(self, paused: bool, source: str) -> None: ...
    def allow_steps(self, req: Request) -> None: ...
    def request_stop(self, req: Request) -> None: ...
    def save_now(self, tag: str, source: str) -> Any: ...           # the checkpoint's path, None if not saved
    def rollback(self, source: str, lr: float | None) -> bool: ...
    def dismiss_alert(self, alert_id: int, source: str) -> None: ...
    def log_event(self, kind: str, source: str, data: Mapping[str, Any] | None = None,
                  step: int | None = None) -> None: ...


# Each returns the message the request resolves with, the step it took effect at and a result (None: it
# resolves later); raising refuses the request with the error's text (the run goes on).
def _apply_set(tr: "Boundary", req: Request) -> tuple[str, int, Any]:
    changes = tr.apply_controls(req.args, req.source)
    return ("" if changes else "no change"), tr.step_count + 1, None


def _apply_pause(tr: "Boundary", req: Request) -> tuple[str, int, Any]:
    tr.hold(True, req.source)
    return "", tr.step_count + 1, None


def _apply_resume(tr: "Boundary", req: Request) -> tuple[str, int, Any]:
    tr.hold(False, req.source)
    return "", tr.step_count + 1, None


def _apply_step(tr: "Boundary", req: Request) -> None:
    if not tr.paused:
        raise ValueError("step(n) runs steps while paused; the run is running")
    tr.allow_steps(req)   # resolved once the steps have run


def _apply_stop(tr: "Boundary", req: Request) -> None:
    tr.request_stop(req)  # resolved when the run has ended


def _apply_checkpoint(tr: "Boundary", req: Request) -> tuple[str, int, Any]:
    path = tr.save_now(req.args.get("tag") or "manual", req.source)
    if path is None:
        raise ValueError("the model's weights are not finite (NaN/inf); a checkpoint was not saved")
    return str(path), tr.step_count, path


def _apply_rollback(tr: "Boundary", req: Request) -> tuple[str, int, Any]:
    if not tr.rollback(req.source, req.args.get("lr")):
        raise ValueError("no good state to roll back to (no finite in-memory state or checkpoint)")
    return "", tr.step_count + 1, None


def _apply_dismiss(tr: "Boundary", req: Request) -> tuple[str, int, Any]:
    tr.dismiss_alert(req.args["alert"], req.source)
    return "", tr.step_count, None


def _apply_alert_action(tr: "Boundary", req: Request) -> tuple[str, int, Any]:
    action = suggested_action(tr.facts, req.args["alert"], req.args["index"])
    if action.rollback:
        return _apply_rollback(tr, Request("rollback", dict(action.controls), req.source))
    return _apply_set(tr, Request("set", dict(action.controls), req.source))


@dataclass(frozen=True)
class Action:
    """One row of the vocabulary: how its arguments are checked, how it takes effect, and whether it is still
    accepted once the run has ended."""

    name: str
    help: str
    check: Callable[[RunFacts, Mapping[str, Any]], dict[str, Any]]
    apply: Callable[["Boundary", Request], Any]
    after_end: bool = False


ACTIONS: dict[str, Action] = {a.name: a for a in [
    Action("set", f"change live controls ({', '.join(CONTROL_NAMES)})", _check_set, _apply_set),
    Action("pause", "pause at the next step boundary", _no_args, _apply_pause),
    Action("resume", "continue a paused run", _no_args, _apply_resume),
    Action("step", "while paused, run n steps, then pause again", _check_step, _apply_step),
    Action("stop", "finish the current step, save a checkpoint and end the run", _no_args, _apply_stop),
    Action("checkpoint", "save a checkpoint now (optional tag)", _check_checkpoint, _apply_checkpoint,
           after_end=True),
    Action("rollback", "go back to the newest good state (optional controls)", _check_rollback, _apply_rollback),
    Action("dismiss", "mark an alert a false alarm; its detector stays quiet", _check_dismiss, _apply_dismiss),
    Action("alert_action", "apply an alert's suggested action (alert, index)", _check_alert_action,
           _apply_alert_action),
]}


def make_request(action: str, args: Mapping[str, Any] | None, facts: RunFacts, source: str = "api") -> Request:
    """A checked request (not yet queued); bad input raises ValueError/TypeError naming what is allowed."""
    row = ACTIONS.get(action) if isinstance(action, str) else None
    if row is None:
        raise ValueError(f"action: got {action!r:.200}; allowed: {', '.join(ACTIONS)}")
    if args is not None and not isinstance(args, Mapping):
        raise TypeError(f"{action}: arguments must be a mapping of name -> value (a JSON object), got "
                        f"{type(args).__name__} {args!r:.200}")
    try:
        checked = row.check(facts, dict(args or {}))
    except (ValueError, TypeError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever a check trips over, the caller gets a refusal it can read
        raise ValueError(f"{action}: arguments {dict(args or {})!r:.200} cannot be used ({type(e).__name__}: "
                         f"{e})") from None
    return Request(action, checked, check_source(source))


class RequestQueue:
    """Requests waiting for the next step boundary; the trainer thread sleeps on it while paused."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()
        self._wake = threading.Condition()

    def put(self, req: Request) -> Request:
        self._queue.append(req)
        with self._wake:
            self._wake.notify_all()
        return req

    def pop(self) -> Request | None:
        return self._queue.popleft() if self._queue else None

    def __bool__(self) -> bool:
        return bool(self._queue)

    def wait(self, timeout: float) -> None:
        """Sleep until a request arrives (or ``timeout``)."""
        with self._wake:
            if not self._queue:
                self._wake.wait(timeout)

    def refuse_all(self, step: int, why: str) -> None:
        while self._queue:
            self._queue.popleft().resolve("refused", step, why)
