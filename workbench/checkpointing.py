"""Saving a run: the checkpoint's layout around the run's stateful parts, the NaN guard, the host copy made
between two steps, the writer that puts it on disk off the training thread, and retention.

A save has two halves. On the trainer thread, between two steps: the parts' states are walked once and
their tensors copied into host buffers (those of an earlier save when it is on disk: copying into memory
that is already mapped is ~10x faster than fresh allocations). Then a writer (a process of its own, or a
paced thread) pickles, writes, fsyncs and renames the file while training goes on (workbench.checkpoint,
workbench.ckptproc).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from . import checkpoint as ck
from . import ckptproc, pacing
from .config import TrainConfig
from .rundir import RunDB

AUTO_TAGS = ("periodic", "stopped", "finished", "best")  # checkpoints that retention may delete


class Checkpointer:
    """Checkpoints of one run. ``parts`` are its stateful components, in ``ck.STATE_KEYS`` order;
    ``position()`` gives (step, epoch) now; ``flush()`` reads back the steps still on the device (their
    rows reach the log before the checkpoint that follows them); ``event(kind, source, data, step)`` logs;
    ``on_save(path, reason, metric)`` fires the run's checkpoint hook."""

    def __init__(self, cfg: TrainConfig, parts: Mapping[str, Any], db: RunDB, folder: Path, *,
                 position: Callable[[], tuple[int, int]], last_eval: Callable[[], Mapping[str, float]],
                 flush: Callable[[], None], event: Callable[..., None],
                 on_save: Callable[[Path, str, float | None], None],
                 persist: Callable[[], None] | None = None) -> None:
        assert tuple(parts) == ck.STATE_KEYS
        self.cfg, self.parts, self.db, self.folder = cfg, dict(parts), db, folder
        self._position, self._last_eval, self._flush = position, last_eval, flush
        self._event, self._on_save, self._persist = event, on_save, persist
        self.failure: BaseException | None = None  # a save that could not be written: the run must end
        # The config and the library versions are fixed for the run: built once, shared by every save
        # (never changed), so a save walks and copies only the components' states.
        self._config = cfg.to_dict()
        self._versions = ck.library_versions()
        ck.remove_stale_temps(folder)
        self.reconcile()
        self.writer = self._make_writer(cfg.checkpoint_writer)

    def reconcile(self) -> None:
        """Make the checkpoint table and the folder agree (after a crash between a file's rename and its
        record, or between retention's delete and its record): a row whose file is gone is dropped, a
        complete file with no row is recorded (tag from its name), so retention sees every file."""
        rows = self.db.checkpoint_rows()
        on_disk = {p.name: (step, p) for step, p in ck.checkpoint_files(self.folder)}
        known = set()
        for _, path, *_rest in rows:
            name = Path(path).name
            if name in on_disk and Path(path).resolve().parent == self.folder.resolve():
                known.add(name)
            else:
                self.db.remove_checkpoint(path)
        for name, (step, p) in on_disk.items():
            if name not in known:
                tag = ck.CKPT_RE.match(name).group(2) or "periodic"
                self.db.add_checkpoint(step=step, path=str(p), metric=None, tag=tag, time=p.stat().st_mtime)

    # ------------------------------------------------------------------ layout
    def layout(self, states: dict[str, Any], config: dict[str, Any] | None = None,
               versions: dict[str, str] | None = None) -> dict[str, Any]:
        """The checkpoint dict (``workbench.checkpoint``) around the components' ``states``."""
        step, epoch = self._position()
        return {"format_version": ck.FORMAT_VERSION, "versions": versions or ck.library_versions(),
                "config": config or self.cfg.to_dict(), "step": step, "epoch": epoch, "state": states}

    def states(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load(self, ckpt: Mapping[str, Any]) -> int:
        """Restore every component from a checkpoint dict; returns its step."""
        state = ckpt["state"]
        missing = [k for k in self.parts if k not in state]
        if missing:
            raise ValueError(f"checkpoint: missing state for {', '.join(missing)}")
        try:
            self.parts["model"].load_state_dict(state["model"])
        except RuntimeError as e:
            lines = str(e).splitlines()
            raise ValueError(f"checkpoint: the model does not match the checkpoint's weights ({lines[0]}"
                             f"{' ...' if len(lines) > 1 else ''})\n{e}") from None
        for name, part in self.parts.items():
            if name != "model":
                part.load_state_dict(state[name])
        return int(ckpt["step"])

    # ------------------------------------------------------------------ saving (trainer thread)
    def save(self, *, tag: str | None, reason: str, source: str, metric: float | None = None,
             checked: set[tuple] | frozenset = frozenset()) -> Path | None:
        """Copy the state to host memory here; the writer writes it (atomic rename). Returns None (and logs
        why) when the weights are not finite: such a state is never saved. ``checked``: model tensors
        (pointer, shape, stride) known finite now (:func:`finite_params`)."""
        self._flush()
        components = self.states()
        if nonfinite(components["model"], checked):
            self._event("checkpoint_skipped", source, {"reason": "the weights hold NaN/inf; a good checkpoint "
                                                                 "is never overwritten by them"}, None)
            return None
        replaceable, kind = reason == "periodic", ("best" if reason == "best" else None)
        buffers = self.writer.take_buffers(replaceable, kind)
        if buffers is None:  # the writer is stalled behind a save that may not give way: training goes on
            step = self._position()[0]
            self._event("checkpoint_skipped", source, {"path": str(self.folder / ck.checkpoint_name(step, tag)),
                                                       "reason": "the writer is still busy with two earlier saves"},
                        step)
            return None
        state = self.layout(host_copy(components, buffers), self._config, self._versions)
        step = state["step"]
        path = self.folder / ck.checkpoint_name(step, tag)
        if metric is None:
            metric = self._last_eval().get(self.cfg.monitor)
        when = time.time()

        def done(p: Path) -> None:
            self.writer.recycle(buffers)  # written: the next save may reuse them
            self.db.add_checkpoint(step=step, path=str(p), metric=metric, tag=tag or reason, time=when)
            self._apply_retention()

        # Periodic saves may give way to a newer one while the writer is behind (memory stays at two copies);
        # ``persist`` first puts the rows up to this step in run.db, so that no resume finds a hole before it.
        self.writer.submit(state, path, done, buffers, replaceable=replaceable, before=self._persist, kind=kind)
        # the controls in force go in the event too: a view offers a fork of this file with them, no torch.load
        self._event("checkpoint", source, {"path": str(path), "reason": reason, "tag": tag, "metric": metric,
                                           "controls": dict(components.get("controls") or {})}, step)
        self._on_save(path, reason, metric)
        return path

    def _apply_retention(self) -> None:
        """Keep the newest ``keep_checkpoints`` plus the best ``keep_best``; user-tagged ones always stay.

        Plain tuples, not a DataFrame: this runs after every save on the writer thread, and every
        millisecond it holds the GIL there is a millisecond the trainer thread may wait."""
        auto = [r for r in self.db.checkpoint_rows() if r[3] in AUTO_TAGS]  # (step, path, metric, tag, time)
        if not auto:
            return
        k = self.cfg.keep_checkpoints
        keep = {r[1] for r in (sorted(auto, key=lambda r: (r[0], r[4] or 0.0))[-k:] if k > 0 else [])}
        scored = [r for r in auto if r[2] is not None and not math.isnan(r[2])]
        if self.cfg.keep_best and scored:
            sign = 1.0 if self.cfg.monitor_mode == "min" else -1.0
            keep |= {r[1] for r in sorted(scored, key=lambda r: (sign * r[2], -r[0]))[:self.cfg.keep_best]}
        for _, path, *_rest in auto:
            if path not in keep:
                Path(path).unlink(missing_ok=True)
                self.db.remove_checkpoint(path)

    # ------------------------------------------------------------------ the writer
    def _make_writer(self, choice: str) -> "ck.AsyncWriter | ckptproc.ProcessWriter":
        """A process of its own (``checkpoint_writer`` process, or auto where one can run), else a paced
        thread of this process (see workbench.ckptproc)."""
        why_not = ckptproc.unsupported()
        if choice == "process" and why_not:
            raise ValueError(f"checkpoint_writer: got 'process', but {why_not}; allowed here: auto, thread")
        if choice == "thread" or why_not:
            return ck.AsyncWriter(self._failed, pacing.default_pacer(), on_replaced=self._replaced)
        return ckptproc.ProcessWriter(self._failed, pacing.default_pacer(), on_fallback=self._fell_back,
                                      on_replaced=self._replaced)

    def _fell_back(self, why: str) -> None:
        self._event("checkpoint_writer", "trainer", {"mode": "thread", "why": why}, None)

    def _replaced(self, path: Path) -> None:
        self._event("checkpoint_skipped", "trainer", {"path": str(path), "reason": "replaced by a newer save while "
                                                      "the writer was still busy with an earlier one"}, None)

    def _failed(self, path: Path, e: BaseException) -> None:
        text = f"{type(e).__name__}: {e}"
        self._event("checkpoint_failed", "trainer", {"path": str(path), "error": text}, None)
        if self.failure is None:  # training on would make steps no checkpoint can keep: the run ends failed
            err = CheckpointWriteFailed(f"checkpoint {path} could not be written ({text}); the run stops here, "
                                        f"its earlier checkpoints are intact")
            err.errno = getattr(e, "errno", None)
            err.__cause__ = e
            self.failure = err

    def check(self) -> None:
        """Raise the failure of a save, if one could not be written (the loop ends the run with it)."""
        if self.failure is not None:
            raise self.failure

    @property
    def mode(self) -> str:
        """Who writes the files: process or thread."""
        return getattr(self.writer, "mode", "thread")

    def wait(self) -> None:
        """Until every save so far is on disk; raises when one could not be written."""
        self.writer.wait()
        self.check()


class CheckpointWriteFailed(OSError):
    """A checkpoint could not be written (the disk is full, read-only, ...): the run ends ``failed``. The
    message names the file and the cause (``errno`` is the cause's, ENOSPC for a full disk)."""


def finite_params(latest_layers: Mapping[str, Any] | None, step: int, params: list[torch.Tensor]) -> set[tuple]:
    """The parameters that the step just taken found finite: its layer statistics measured every parameter's
    norm after the update, and a finite norm means finite elements. As (pointer, shape, stride); empty
    unless step ``step`` took layer statistics and all were finite. Valid only right after that step: a
    request at the boundary may load other weights."""
    if latest_layers is None or latest_layers["step"] != step or not np.isfinite(latest_layers["param_norm"]).all():
        return set()
    return {(p.data_ptr(), p.shape, p.stride()) for p in params}


def nonfinite(model_state: Mapping[str, Any], checked: set[tuple] | frozenset = frozenset()) -> bool:
    """``ck.has_nonfinite`` for a model state dict, with a fast first pass: one fused norm per tensor.

    NaN/inf anywhere makes a norm NaN/inf; only then (or when a huge finite tensor overflows its norm)
    is the exact element-wise check run, so the answer is always the exact one. The fused pass is
    cheaper than the per-tensor check at every size (21 vs 59 us for the tiny MLP's six tensors).
    Tensors in ``checked`` (pointer, shape, stride: known finite, :func:`finite_params`) are skipped."""
    ts = [t for t in model_state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()
          and not (checked and (t.data_ptr(), t.shape, t.stride()) in checked)]
    if not ts:
        return False
    if bool(torch.stack(torch._foreach_norm(ts)).isfinite().all()):  # stack promotes mixed dtypes
        return False
    return ck.has_nonfinite(ts)


def host_copy(obj: Any, buffers: dict) -> Any:
    """``ck.to_cpu`` into reused host buffers: the structure is rebuilt, every tensor is replaced by a
    host buffer of the same layout, and the copies are done at the end in one fused call.

    ``buffers`` maps a tensor's memory (pointer, shape, stride, dtype, device) to its buffer; it is
    updated in place to hold exactly the buffers this copy used, so the next save of the same state
    (parameters and optimizer state live at fixed addresses) copies into memory that is already
    mapped. Two entries that share memory (tied weights) share one buffer, as torch.save would store
    them. New buffers come from ``buffers.alloc(t)`` when it has one (``ckptproc.HostBuffers``: memory
    the writer process maps), else ``torch.empty_like``; with ``buffers.leaf`` the copy holds
    ``leaf(buffer)`` in each tensor's place (where the buffer lies: the message the writer process gets,
    built in the same walk).

    This runs on the trainer thread between two steps, so it is written for few bytecodes per node:
    plain values (most of a state's leaves) are kept without a call, and the walk is one closure."""
    used: dict = {}
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    off_host: list[tuple[torch.Tensor, torch.Tensor]] = []
    alloc, leaf = getattr(buffers, "alloc", _empty_host), getattr(buffers, "leaf", None)
    plain, tensor_type = _PLAIN, torch.Tensor

    def tensor(t: torch.Tensor) -> Any:
        if t.requires_grad:
            t = t.detach()
        try:
            key = (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)
        except RuntimeError:  # no plain memory (sparse, ...): a buffer of its own each time
            key = (id(t), t.shape, t.dtype, t.device)
        buf = used.get(key)
        if buf is None:
            buf = buffers.pop(key, None)
            if buf is None and len(key) == 5:
                buf = _same_layout(buffers, key)
            if buf is None:
                buf = alloc(t)
            used[key] = buf
            if t.is_cpu:
                dsts.append(buf)
                srcs.append(t)
            else:
                off_host.append((buf, t))
        return buf if leaf is None else leaf(buf)

    def walk(o: Any) -> Any:
        kind = type(o)
        if kind is dict or (kind is not list and kind is not tuple and isinstance(o, dict)):
            return {k: v if type(v) in plain else walk(v) for k, v in o.items()}
        if kind is list or kind is tuple or isinstance(o, (list, tuple)):
            out = [v if type(v) in plain else walk(v) for v in o]
            return out if isinstance(o, list) else tuple(out)
        if isinstance(o, tensor_type):
            return tensor(o)
        return o

    out = walk(obj)
    buffers.clear()
    buffers.update(used)
    if dsts:
        torch._foreach_copy_(dsts, srcs)
    for dst, src in off_host:
        dst.copy_(src)
    return out


def _empty_host(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="cpu")  # the layout .to("cpu", copy=True) gives


_PLAIN = frozenset({int, float, complex, bool, str, bytes, type(None)})  # leaves kept as they are


def _same_layout(old: dict, key: tuple) -> torch.Tensor | None:
    """An earlier buffer of the same layout whose tensor has moved: a state dict that returns a new tensor
    each call (``torch.get_rng_state()``, numpy's key array) refreshes the same host memory each save."""
    for k in old:
        if len(k) == 5 and k[1:] == key[1:]:
            return old.pop(k)
    return None

