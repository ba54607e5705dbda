"""The recorder: a background thread that carries the trainer's records to disk and brings requests in.

The trainer thread only appends plain rows to deques (cheap and thread-safe); every ``interval``
seconds the recorder writes them to the run's SQLite file and TensorBoard in batches, and polls the
SQLite control inbox for requests posted by other processes (e.g. the dashboard), handing them to
the trainer and writing each outcome back once the trainer has decided.
"""
from __future__ import annotations

import collections
import threading
import traceback
from typing import Any, Callable

from .pacing import Pacer
from .rundir import RunDB, TBWriter

TB_STEP_TAGS = {"train_loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                "batch_size": "train/batch_size", "samples_per_s": "train/samples_per_s"}
TB_EVAL_TAGS = {"val_loss": "val/loss", "val_acc": "val/acc"}


#: Step rows converted and encoded between two of the pacer's chances to pause (~0.2 ms of Python).
ROWS_PER_PIECE = 8
#: More queued step rows than this (about a second of a fast run) and the recorder is behind: no pauses.
BACKLOG_ROWS = 2_000


class Recorder:
    """Batches metric rows, events and inbox outcomes to SQLite/TensorBoard off the training thread.

    With a ``pacer`` (see :mod:`workbench.pacing`), the thread's own flushes convert and encode the step
    rows a few at a time with pauses between them: done in one go, a quarter second's rows of a fast run
    (~9 ms of Python under the GIL for ~350 rows) stalled the training step it overlapped by as much. A
    flush called from elsewhere (the end of a run, a checkpoint) lifts the pauses: someone waits for it.
    """

    def __init__(self, db: RunDB, tb: TBWriter | None, *, interval: float = 0.25,
                 on_inbox: Callable[[dict], None] | None = None,
                 on_error: Callable[[BaseException, str], None] | None = None,
                 pacer: Pacer | None = None) -> None:
        self.db, self.tb, self.interval = db, tb, interval
        self._pacer = pacer
        if pacer is not None and pacer.behind is None:
            pacer.behind = lambda: len(self.steps) > BACKLOG_ROWS
        self.steps: collections.deque = collections.deque()
        self.evals: collections.deque = collections.deque()
        self.layers: collections.deque = collections.deque()
        self.events: collections.deque = collections.deque()
        self.outcomes: collections.deque = collections.deque()
        self.meta: collections.deque = collections.deque()
        self._on_inbox = on_inbox
        self._on_error = on_error
        self._seen_inbox: set[int] = set()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="workbench-recorder", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush(paced=True)
                self.poll_inbox()
            except Exception as e:  # noqa: BLE001 - recording trouble must not kill training
                if self._on_error:
                    self._on_error(e, traceback.format_exc())

    def poll_inbox(self) -> None:
        """Hand new requests from the SQLite inbox to the trainer (each once)."""
        if self._on_inbox is None:
            return
        for req in self.db.pending_controls():
            if req["id"] not in self._seen_inbox:
                self._seen_inbox.add(req["id"])
                self._on_inbox(req)

    def flush(self, paced: bool = False) -> None:
        """Write everything queued so far (safe to call from any thread). ``paced``: the recorder's own
        periodic flush, which lets the pacer pause between pieces; any other flush is done at full
        speed, and one already under way on the recorder thread stops pausing while this one waits."""
        pacer = self._pacer if paced else None
        hurry = self._pacer is not None and not paced
        if hurry:
            self._pacer.hurry(True)
        try:
            with self._flush_lock:
                self._flush(pacer)
        finally:
            if hurry:
                self._pacer.hurry(False)

    def _flush(self, pacer: Pacer | None) -> None:
        steps, evals, layers = _drain(self.steps), _drain(self.evals), _drain(self.layers)
        events, outcomes, meta = _drain(self.events), _drain(self.outcomes), _drain(self.meta)
        if pacer is not None:
            pacer.start(rest=False)
        tuples: list[tuple] = []
        for i in range(0, len(steps), ROWS_PER_PIECE):  # the Python-heavy part, a few rows at a time
            piece = steps[i:i + ROWS_PER_PIECE]
            tuples += self.db.step_tuples(piece)
            if self.tb is not None:
                self.tb.write(_tb_records(piece, TB_STEP_TAGS))
            if pacer is not None:
                pacer.pause()
        if tuples:
            self.db.insert_step_tuples(tuples)  # one transaction; sqlite lets go of the GIL per row
        if evals:
            self.db.insert_evals(evals)
        if layers:
            self.db.insert_layers(layers)
        for ev in events:
            self.db.log_event(**ev)
        for inbox_id, status, step, message in outcomes:
            self.db.resolve_control(inbox_id, status=status, step=step, message=message)
        for values in meta:
            self.db.set_meta(**values)
        if self.tb is not None and (steps or evals):
            if evals:
                self.tb.write(_tb_records(evals, TB_EVAL_TAGS))
            self.tb.flush()

    def close(self) -> None:
        """Stop the thread after a last flush (everything queued reaches disk)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()
        if self.tb is not None:
            self.tb.close()


def _tb_records(rows: list[dict], tags: dict[str, str]) -> list[tuple[str, int, float, float]]:
    return [(tag, int(r["step"]), float(r[key]), float(r["time"]))
            for r in rows for key, tag in tags.items() if r.get(key) is not None]


def _drain(dq: collections.deque) -> list[Any]:
    out = []
    while True:
        try:
            out.append(dq.popleft())
        except IndexError:
            return out
