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
from .rundir.tb import PRECISION_CODES
from .rundir.lock import is_storage_error

TB_STEP_TAGS = {"train_loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                "batch_size": "train/batch_size", "samples_per_s": "train/samples_per_s",
                "precision": "train/precision"}
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
        self.eval_metrics: collections.deque = collections.deque()   # (step, name, value): metrics beyond loss/acc
        self.layers: collections.deque = collections.deque()
        self.events: collections.deque = collections.deque()
        self.outcomes: collections.deque = collections.deque()
        self.meta: collections.deque = collections.deque()
        self._on_inbox = on_inbox
        self._on_error = on_error
        self._seen_inbox: set[int] = set()
        self.failure: BaseException | None = None  # the disk refused the record (full, read-only): the run ends
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
            for job in (lambda: self.flush(paced=True), self.poll_inbox):
                try:
                    job()
                except Exception as e:  # noqa: BLE001 - recording trouble must not kill training
                    if is_storage_error(e) and self.failure is None:
                        self.failure = e  # the record would have holes from here on: the trainer ends the run
                    if self._on_error:
                        self._on_error(e, traceback.format_exc())

    def check(self) -> None:
        """Raise the disk's refusal of the record, if it refused (the loop ends the run with it)."""
        if self.failure is not None:
            raise self.failure

    def poll_inbox(self) -> None:
        """Hand new requests from the SQLite inbox to the trainer, each once and one by one: a row that
        cannot be read or handled is refused on its own and never holds up the rows after it."""
        if self._on_inbox is None:
            return
        for req in self.db.pending_controls():
            if req["id"] in self._seen_inbox:
                continue
            self._seen_inbox.add(req["id"])
            try:
                self._on_inbox(req)
            except Exception as e:  # noqa: BLE001 - a poisoned row is refused, the next one still goes
                self.outcomes.append((req["id"], "refused", None, f"the request could not be handled "
                                                                   f"({type(e).__name__}: {e})"))

    def flush(self, paced: bool = False) -> None:
        """Write everything queued so far (safe to call from any thread). ``paced``: the recorder's own
        periodic flush, or the one before a checkpoint file, which let the pacer pause between pieces; any
        other flush is done at full speed, and one already under way stops pausing while this one waits."""
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
        extra = _drain(self.eval_metrics)
        try:
            self._write(pacer, steps, evals, layers, events, outcomes, meta)
            self._write_eval_metrics(extra)
        except BaseException:
            # Nothing is lost to a failed write: what was drained goes back in front, to be written by the next
            # flush (metric rows are keyed by step, so one written twice is written once; events and
            # outcomes are removed from their lists as they are written).
            for dq, rows in ((self.steps, steps), (self.evals, evals), (self.layers, layers),
                             (self.events, events), (self.outcomes, outcomes), (self.meta, meta),
                             (self.eval_metrics, extra)):
                dq.extendleft(reversed(rows))
            raise

    def _write(self, pacer: Pacer | None, steps: list, evals: list, layers: list, events: list, outcomes: list,
               meta: list) -> None:
        tb_events = list(events)   # the event list empties as its rows reach SQLite
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
        while events:
            self.db.log_event(**events[0])
            events.pop(0)
        while outcomes:
            inbox_id, status, step, message = outcomes[0]
            try:
                self.db.resolve_control(inbox_id, status=status, step=step, message=message)
            except (KeyError, ValueError):  # the row is gone, or was resolved already: nothing to write
                pass
            outcomes.pop(0)
        while meta:
            self.db.set_meta(**meta[0])
            meta.pop(0)
        if self.tb is not None and (steps or evals or layers or events):
            if evals:
                self.tb.write(_tb_records(evals, TB_EVAL_TAGS))
            self.tb.write_layers(layers)
            self.tb.write_events(tb_events)
            self.tb.flush()

    def _write_eval_metrics(self, rows: list) -> None:
        """Metrics beyond loss and accuracy (step, name, value): SQLite, and TensorBoard as val/<name>."""
        if not rows:
            return
        self.db.insert_eval_metrics(rows)
        if self.tb is not None:
            self.tb.write([(f"val/{name[4:] if name.startswith('val_') else name}", step, value, None)
                           for step, name, value in rows if value is not None])
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
    return [(tag, int(r["step"]), float(PRECISION_CODES[r[key]] if key == "precision" else r[key]),
             float(r["time"])) for r in rows for key, tag in tags.items() if r.get(key) is not None]


def _drain(dq: collections.deque) -> list[Any]:
    out = []
    while True:
        try:
            out.append(dq.popleft())
        except IndexError:
            return out
