"""Pacing for the engine's background threads (checkpoint writer, recorder).

The trainer thread and a background thread share the GIL, and on a machine whose cores all run the
trainer's intra-op team they share the cores too: a background job done in one go is a stall of the
same length on the step it overlaps (the trainer waits for the GIL, or for the core its worker lost).
A :class:`Pacer` cuts such a job into short bursts with sleeps between them, so that each step loses a
little instead of one step losing all of it.
"""
from __future__ import annotations

import threading
import time
from typing import Callable


class Pacer:
    """Spreads a background thread's work over time so that it never takes the GIL or a core from
    training in one burst (the checkpoint writer, the recorder).

    On a machine whose cores are all in the trainer's intra-op (OpenMP) team, a writer that copies a
    checkpoint into the page cache in one go takes a core away from that team for the whole copy, and
    every parallel region of the steps that overlap waits for it (a 13.5 MB save stalled a 10 ms step
    to ~30 ms on 2 cores; bench/checkpoint_stall.py). The pacer lets the writer run in bursts of at most
    ``burst`` seconds and then sleeps long enough that it is busy for at most ``duty`` of the wall time,
    so a step loses at most about ``duty`` of its time instead of the whole copy. The pauses are off
    while someone waits for the result (``hurry()``: a manual save, the end of the run, a flush called
    from another thread) and while ``behind()`` says the work is piling up (a newer save queued behind
    this one, each holding a host copy of the state; thousands of rows waiting for the recorder).
    """

    def __init__(self, duty: float = 0.1, burst: float = 0.00025, longest_pause: float = 0.02,
                 behind: Callable[[], bool] | None = None) -> None:
        if not 0 < duty <= 1:
            raise ValueError(f"duty: got {duty!r}; allowed: a fraction in (0, 1]")
        self.duty, self.burst, self.longest_pause = duty, burst, longest_pause
        self.behind = behind
        self._hurry = 0
        self._lock = threading.Lock()
        self._since = time.perf_counter()
        self.pauses = 0  # how often the thread stopped (for tests and benchmarks)

    def hurry(self, on: bool) -> None:
        with self._lock:
            self._hurry += 1 if on else -1

    def _pacing(self) -> bool:
        return self.duty < 1 and not self._hurry and not (self.behind is not None and self.behind())

    def _rest(self, busy: float) -> bool:
        """Sleep long enough that ``busy`` seconds of work are ``duty`` of the time; False if not pacing."""
        if not self._pacing():
            return False
        time.sleep(min(busy * (1 - self.duty) / self.duty, self.longest_pause))
        return True

    def start(self, rest: bool = True) -> None:
        """A new piece of work (a checkpoint file, a flush). With ``rest`` (a checkpoint: the trainer
        has just spent a step's margin copying the state) the writer first rests as long as after a
        burst; its work counts from then."""
        if rest:
            self._rest(self.burst)
        self._since = time.perf_counter()

    def pause(self) -> None:
        """Called between pieces: sleep when the writer has been busy for a whole burst."""
        busy = time.perf_counter() - self._since
        if busy < self.burst:
            return
        if self._rest(busy):
            self.pauses += 1
        self._since = time.perf_counter()


def default_pacer() -> Pacer:
    """The engine's pacer for a background thread. Always one, whatever the thread count: even when
    the writer has a core of its own (a small model's trainer runs on one thread), it shares the GIL
    with the trainer thread, and a torch.save or a recorder flush done in one go holds it for
    milliseconds (a tiny MLP's save-step went from 0.6 to 3.3 ms unpaced; bench/RESULTS.md)."""
    return Pacer()
