"""A throttled poller: calls one function at most ``1 / interval`` times per second until stopped.

In a live Jupyter kernel the cell code runs on the kernel's asyncio loop, so the poller is an asyncio
task on that loop (``mode="asyncio"``): the refresh then runs on the kernel's main thread, between the
messages it handles, exactly like a button callback. Elsewhere (a plain Python process, a test, a
kernel without a running loop) it is a daemon thread (``mode="thread"``), which only assigns widget
values and figure data — allowed from a thread in ipywidgets 8, where the kernel sends the comm
messages. The poller never calls ``display()`` and never prints: output from a thread lands in
whatever cell runs at that moment (ipywidgets#1794, #4001).

A blocking cell (``tr.run()``, ``tr.join()``, ``req.wait()``) holds the asyncio loop, so in that mode the
charts catch up when the cell ends. To watch a run live, ``start()`` it and wait with ``await watch(tr)``
(or ``await watch(tr, until=...)``): the cell waits on the loop, and the poller draws meanwhile.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

MODES = ("auto", "asyncio", "thread")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Poller:
    """Call ``tick()`` every ``interval`` seconds (after the previous call returned) until :meth:`stop`.

    ``tick`` must not raise (the panel's tick catches and shows its own errors); an exception that gets
    through is kept on :attr:`error` and the poller goes on.
    """

    def __init__(self, tick: Callable[[], object], interval: float = 0.2, mode: str = "auto") -> None:
        if mode not in MODES:
            raise ValueError(f"mode: got {mode!r}; allowed: {', '.join(MODES)}")
        if not interval > 0:
            raise ValueError(f"interval: got {interval!r}; allowed: a number of seconds > 0")
        self.tick = tick
        self.interval = float(interval)
        self.requested = mode
        self.mode: str | None = None          # the mode in use once started
        self.error: BaseException | None = None
        self.ticks = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        if self._task is not None:
            return not self._task.done()
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Poller":
        """Start (again); a no-op while running."""
        if self.running:
            return self
        self._stop.clear()
        loop = _running_loop() if self.requested in ("auto", "asyncio") else None
        if loop is not None:
            self.mode = "asyncio"
            self._task = loop.create_task(self._run_async())
        elif self.requested == "asyncio":
            raise RuntimeError("poll='asyncio': no asyncio loop runs in this thread; allowed here: 'thread'")
        else:
            self.mode = "thread"
            self._task = None
            self._thread = threading.Thread(target=self._run_thread, name="workbench-panel-poller", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop and (for a thread) wait for it to finish its current tick."""
        self._stop.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _call(self) -> None:
        try:
            self.tick()
        except Exception as e:  # noqa: BLE001 - a failing refresh must not end the poller
            self.error = e
        self.ticks += 1

    async def _run_async(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(self.interval)
            if not self._stop.is_set():
                self._call()

    def _run_thread(self) -> None:
        while not self._stop.wait(self.interval):
            self._call()


async def watch(trainer: Any, until: Callable[[], object] | None = None, timeout: float | None = None,
                poll: float = 0.1) -> str:
    """Wait in a notebook cell, without blocking the kernel, until ``until()`` is true (default: the run
    ended); returns the run's status. ``await watch(tr)`` is the live counterpart of ``tr.join()``: the
    panel's poller keeps drawing while the cell waits. A run that fails re-raises as in ``join()``; a
    ``timeout`` (seconds) that passes first raises TimeoutError."""
    done = until or (lambda: not trainer.is_alive)
    end = None if timeout is None else time.monotonic() + timeout
    while not done():
        if until is not None and not trainer.is_alive:
            break                      # the run ended first: the condition can no longer come true
        if end is not None and time.monotonic() > end:
            raise TimeoutError(f"watch: not done after {timeout} s (run status {trainer.status}, "
                               f"step {trainer.step_count})")
        await asyncio.sleep(poll)
    if not trainer.is_alive:
        trainer.join(0)                # a failed run raises here, as join() does
    return trainer.status
