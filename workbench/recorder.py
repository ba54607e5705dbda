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

from .rundir import RunDB, TBWriter

TB_STEP_TAGS = {"train_loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                "batch_size": "train/batch_size", "samples_per_s": "train/samples_per_s"}
TB_EVAL_TAGS = {"val_loss": "val/loss", "val_acc": "val/acc"}


class Recorder:
    """Batches metric rows, events and inbox outcomes to SQLite/TensorBoard off the training thread."""

    def __init__(self, db: RunDB, tb: TBWriter | None, *, interval: float = 0.25,
                 on_inbox: Callable[[dict], None] | None = None,
                 on_error: Callable[[BaseException, str], None] | None = None) -> None:
        self.db, self.tb, self.interval = db, tb, interval
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
                self.flush()
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

    def flush(self) -> None:
        """Write everything queued so far (safe to call from any thread)."""
        with self._flush_lock:
            steps, evals, layers = _drain(self.steps), _drain(self.evals), _drain(self.layers)
            events, outcomes, meta = _drain(self.events), _drain(self.outcomes), _drain(self.meta)
            if steps:
                self.db.insert_steps(steps)
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
                records = [(tag, int(r["step"]), float(r[key]), float(r["time"]))
                           for r in steps for key, tag in TB_STEP_TAGS.items() if r.get(key) is not None]
                records += [(tag, int(r["step"]), float(r[key]), float(r["time"]))
                            for r in evals for key, tag in TB_EVAL_TAGS.items() if r.get(key) is not None]
                self.tb.write(records)
                self.tb.flush()

    def close(self) -> None:
        """Stop the thread after a last flush (everything queued reaches disk)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()
        if self.tb is not None:
            self.tb.close()


def _drain(dq: collections.deque) -> list[Any]:
    out = []
    while True:
        try:
            out.append(dq.popleft())
        except IndexError:
            return out
