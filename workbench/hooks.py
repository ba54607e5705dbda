"""Hooks: user functions called on the trainer thread at named events, with a read-only context.

A hook that raises is reported (event log) and disabled; it never ends the run. Hooks request
changes (``trainer.set``, ``trainer.stop``); the loop applies them at the next step boundary.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

HOOK_EVENTS = ("step_end", "eval_end", "checkpoint", "alert", "status")


@dataclass(frozen=True)
class HookContext:
    """What a hook sees: plain values, never the trainer's internals.

    ``metrics`` holds the event's numbers (for step_end: step, epoch, train_loss, lr, batch_size,
    grad_norm, ...; on CUDA the losses of the last ``sync_every`` steps arrive together, so a
    step_end context carries the newest values read back so far). ``sample_ids`` (step_end) are
    the training-set indices the step used.
    """

    event: str
    step: int
    epoch: int
    status: str
    metrics: Mapping[str, Any] = field(default_factory=dict)
    sample_ids: tuple[int, ...] | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


class HookHandle:
    """Returned by ``Trainer.on``; ``remove()`` unregisters the hook."""

    def __init__(self, registry: "HookRegistry", event: str, fn: Callable) -> None:
        self._registry, self.event, self.fn = registry, event, fn

    def remove(self) -> None:
        self._registry.remove(self)


class HookRegistry:
    """Hooks per event, in registration order; a failing hook is disabled and reported."""

    def __init__(self, report: Callable[[str, Callable, BaseException, str], None]) -> None:
        self._hooks: dict[str, list[HookHandle]] = {e: [] for e in HOOK_EVENTS}
        self._report = report

    def add(self, event: str, fn: Callable) -> HookHandle:
        if event not in HOOK_EVENTS:
            raise ValueError(f"on: unknown event {event!r}; allowed: {', '.join(HOOK_EVENTS)}")
        if not callable(fn):
            raise TypeError(f"on: got {fn!r}; allowed: a callable taking one HookContext")
        handle = HookHandle(self, event, fn)
        self._hooks[event] = self._hooks[event] + [handle]  # copy-on-write: safe while firing
        return handle

    def remove(self, handle: HookHandle) -> None:
        self._hooks[handle.event] = [h for h in self._hooks[handle.event] if h is not handle]

    def has(self, event: str) -> bool:
        return bool(self._hooks[event])

    def fire(self, event: str, make_context: Callable[[], HookContext]) -> None:
        """Call the event's hooks with one context (built only when someone listens)."""
        hooks = self._hooks[event]
        if not hooks:
            return
        ctx = make_context()
        for h in hooks:
            try:
                h.fn(ctx)
            except Exception as e:  # noqa: BLE001 - a broken hook must not end the run
                self.remove(h)
                self._report(event, h.fn, e, traceback.format_exc())


def frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only view of a dict for a hook context."""
    return MappingProxyType(dict(d))
