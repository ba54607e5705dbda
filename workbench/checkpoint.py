"""Checkpoints: one dict with constant keys, written atomically, loaded without unpickling code.

Layout of a checkpoint (``FORMAT_VERSION`` 1)::

    {"format_version": 1, "versions": {...}, "config": {...}, "step": int, "epoch": int,
     "state": {"model": ..., "optimizer": ..., "schedule": ..., "scaler": ..., "controls": ...,
               "sampler": ..., "rng": ..., "early_stopping": ..., "detectors": ...}}

Every entry of ``state`` is the ``state_dict()`` of a registered component; nothing is special-cased.
Only tensors, numbers, strings, None, lists, tuples and dicts are stored, so ``torch.load`` with
``weights_only=True`` reads it back and a file carrying a pickled object is refused, never run.
"""
from __future__ import annotations

import ctypes
import functools
import os
import pickle
import random
import re
import sys
import tempfile
import threading
import types
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch

from .pacing import Pacer

FORMAT_VERSION = 1
TOP_KEYS = ("format_version", "versions", "config", "step", "epoch", "state")
STATE_KEYS = ("model", "optimizer", "schedule", "scaler", "controls", "sampler", "rng", "early_stopping",
              "detectors")
CKPT_RE = re.compile(r"^step-(\d+)(?:-([A-Za-z0-9_.-]+))?\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"checkpoint {os.fspath(path)}: {reason}")
        self.path, self.reason = Path(path), reason


def library_versions() -> dict[str, str]:
    """Versions that matter for reading a run back (saved in configs and checkpoints). A new dict each
    call; the versions themselves are looked up once per process."""
    return dict(_library_versions())


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str]:
    import pandas

    from .version import __version__

    return {"workbench": __version__, "torch": str(torch.__version__), "numpy": np.__version__,
            "pandas": pandas.__version__, "python": sys.version.split()[0]}


# ----------------------------------------------------------------------------- components
class RNGState:
    """Python, numpy, torch CPU and every CUDA device's RNG state, as plain data.

    Python's and numpy's global Mersenne Twisters are stored as one int64 tensor of their words each,
    not a list of 625 ints: torch.save pickles (and calls back into Python for) every object, and those
    lists were two thirds of a checkpoint's objects. Reading them is the costly part of this state
    (~35 us for numpy's, which copies its words one Python-level item at a time; ~8 us to build
    Python's 625-int tuple, several times that inside a running loop), and training seldom draws from
    either, so each is read in full only when its words moved (see :class:`_GlobalGenerator`)."""

    def __init__(self) -> None:
        inst = random.getstate.__self__  # the generator behind the random module's functions
        self._python = _GlobalGenerator(
            full=_python_state, words=_python_words, reuse=lambda last: [last[0], last[1], inst.gauss_next],
            locate=lambda: _python_struct(inst))
        self._numpy = _GlobalGenerator(
            full=_numpy_state, words=_numpy_words, reuse=lambda last: list(last) if last[3] == 0 else None,
            locate=_numpy_struct)

    def state_dict(self) -> dict[str, Any]:
        return {"python": self._python.read(), "numpy": self._numpy.read(), "torch": torch.get_rng_state(),
                "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else []}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version, internal, gauss = state["python"]
        words = internal.tolist() if isinstance(internal, torch.Tensor) else internal  # a list in older checkpoints
        random.setstate((version, tuple(words), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


class _GlobalGenerator:
    """A global generator's state, read in full only when the bytes of its C state moved.

    A Mersenne Twister keeps its 624 words and its position in one C struct. Copying those 2,500 bytes
    takes well under a microsecond; when they equal the bytes copied just before the last full read,
    no number has been drawn since, and ``reuse(last)`` gives the state from the last read (None: read
    it in full anyway). Where the struct lies comes from ``locate()`` (address, size), and is trusted
    only once its bytes have matched ``words(state)`` of a full read; otherwise every read is full.

    Python: the words and index of ``random``'s generator follow the object header (CPython's
    ``RandomObject``); ``gauss_next`` is an attribute, read each time. numpy: the legacy generator's
    struct is published as ``bit_generator.ctypes.state_address``; its cached Gaussian is not, so a
    state that holds one (``has_gauss``) is always read in full. A draw always moves the words or the
    position and is the only way to cache a Gaussian, so a reused state is the state now. The one case
    this cannot see: user code that keeps a numpy state holding a cached Gaussian, uses that Gaussian,
    and after a later step restores the kept state (same words and position, a Gaussian again)."""

    def __init__(self, *, full: Callable[[], list], words: Callable[[list], bytes],
                 reuse: Callable[[list], list | None], locate: Callable[[], tuple[int, int] | None]) -> None:
        self._full, self._words, self._reuse, self._locate = full, words, reuse, locate
        self._view: ctypes.Array | None = None
        self._checked = False
        self._last: tuple[bytes, list] | None = None

    def read(self) -> list:
        view, checking = self._view, not self._checked
        if checking:
            self._checked = True
            where = self._locate()
            view = (ctypes.c_char * where[1]).from_address(where[0]) if where else None
        raw = bytes(view) if view is not None else None  # before the full read: a draw in between
        last = self._last                                # leaves stale bytes, which fail the next compare
        if last is not None and raw == last[0]:
            state = self._reuse(last[1])
            if state is not None:
                return state
        state = self._full()
        if checking and raw is not None and raw == self._words(state):
            self._view = view
        self._last = (raw, state) if self._view is not None else None
        return list(state)


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, torch.from_numpy(np.array(internal, dtype=np.int64)), gauss]  # 624 words, then the index


def _python_words(state: list) -> bytes:
    words = state[1].numpy()
    # CPython's RandomObject: int index; uint32_t state[624]
    return words[-1:].astype(np.int32).tobytes() + words[:-1].astype(np.uint32).tobytes()


def _python_struct(inst: random.Random) -> tuple[int, int] | None:
    size = 4 + 624 * 4
    if sys.implementation.name != "cpython" or type(inst).__basicsize__ < object.__basicsize__ + size:
        return None
    return id(inst) + object.__basicsize__, size


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _numpy_words(state: list) -> bytes:
    return state[1].numpy().astype(np.uint32).tobytes() + np.int32(state[2]).tobytes()  # uint32 key[624]; int pos


def _numpy_struct() -> tuple[int, int] | None:
    try:
        bit_generator = np.random.mtrand._rand._bit_generator
        if type(bit_generator).__name__ != "MT19937":
            return None
        return int(bit_generator.ctypes.state_address), 624 * 4 + 4
    except (AttributeError, TypeError, ValueError):
        return None


def to_cpu(obj: Any) -> Any:
    """A deep copy with every tensor cloned to host memory (so training can go on while it is written)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    return obj


def has_nonfinite(state: Any) -> bool:
    """True when any floating tensor in ``state`` holds NaN or inf (such a state must not be saved)."""
    if isinstance(state, torch.Tensor):
        return state.is_floating_point() and not bool(torch.isfinite(state).all())
    if isinstance(state, Mapping):
        return any(has_nonfinite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return any(has_nonfinite(v) for v in state)
    return False


# ----------------------------------------------------------------------------- save and load
def atomic_save(obj: Any, path: str | os.PathLike, pacer: "Pacer | None" = None) -> Path:
    """Write ``obj`` with torch.save so that ``path`` exists only when complete.

    Temp file in the same folder -> flush + fsync -> os.replace -> fsync the folder: a crash leaves
    either the old state or the new one, never a half-written file under the final name. With a
    ``pacer`` the bytes go out in pieces with pauses between them (see :class:`Pacer`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if pacer is not None:
        pacer.start()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb", buffering=0) as raw:
            if pacer is not None:
                pacer.pause()
            out = _PiecewiseFile(raw, pacer)
            try:
                if pacer is None:
                    torch.save(obj, out)
                else:
                    torch.save(obj, out, pickle_module=_paced_pickle(pacer))
                out.flush()
                os.fsync(raw.fileno())
            except (RuntimeError, OSError) as e:
                if out.error is not None:  # torch.save wraps the write's OSError (ENOSPC...) in a RuntimeError
                    raise OSError(out.error.errno, out.error.strerror, tmp) from e
                raise
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _paced_pickle(pacer: Pacer) -> Any:
    """A ``pickle_module`` for torch.save whose pickler lets the pacer pause between objects.

    Pickling holds the GIL, and a state with many tensors takes ~20 us of Python per tensor (0.6 ms
    for the tiny MLP's 27): in one piece that is a step's worth of time the trainer thread cannot run.
    ``reducer_override`` is called for every object that is not a plain builtin (each tensor among them)
    and only pauses; returning NotImplemented leaves the pickling itself to the standard code."""

    class PacedPickler(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            pacer.pause()
            return NotImplemented

    return types.SimpleNamespace(__name__="pickle", Pickler=PacedPickler)


class _PiecewiseFile:
    """The file object torch.save writes into: small writes are gathered, large records (tensor
    storages arrive as one memoryview each) go out in pieces of ``PIECE`` bytes. Each piece is one
    ``write`` system call, during which the GIL is released, and the pacer may pause between pieces."""

    PIECE = 1 << 18

    def __init__(self, raw: Any, pacer: Pacer | None) -> None:
        self._raw, self._pacer = raw, pacer
        self._buf = bytearray()
        self.error: OSError | None = None  # the first failed write (the cause a caller should see)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if len(self._buf) + n < self.PIECE:
            self._buf += view
            if self._pacer is not None:
                self._pacer.pause()  # torch.save's own work between two writes counts too
            return n
        self.flush()
        for i in range(0, n, self.PIECE):
            self._write_all(view[i:i + self.PIECE])
        return n

    def flush(self) -> None:
        if self._buf:
            self._write_all(memoryview(self._buf))
            self._buf = bytearray()

    def _write_all(self, view: memoryview) -> None:
        try:
            while len(view):
                view = view[self._raw.write(view):]
        except OSError as e:
            self.error = self.error or e
            raise
        if self._pacer is not None:
            self._pacer.pause()


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files left by a save that was interrupted (called at start)."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint; raise CheckpointError naming the file and the reason.

    Uses ``weights_only=True``: a file holding pickled objects (code) is refused without running it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "the file is empty (a save was interrupted?)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(path, "it holds objects other than tensors and plain data (a pickle payload?), "
                                    f"so it was refused and nothing in it was run ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(path, f"the file is truncated or corrupt ({_first_line(e)})") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(path, "not a workbench checkpoint (no format_version)")
    version = ckpt["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(path, f"made by a newer workbench (format {version!r}; this version reads up to "
                                    f"{FORMAT_VERSION}); upgrade the workbench to load it")
    missing = [k for k in TOP_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(path, f"missing key(s) {', '.join(missing)}")
    return ckpt


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def checkpoint_files(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint files in a folder, newest step first."""
    found = []
    for p in Path(folder).glob("step-*.pt"):
        m = CKPT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    found.sort(key=lambda t: (t[0], t[1].stat().st_mtime), reverse=True)
    return found


def newest_intact(folder: str | os.PathLike, warn: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """The newest checkpoint in ``folder`` that loads; each broken newer one is reported through ``warn``."""
    problems = []
    for _, p in checkpoint_files(folder):
        try:
            return p, load_checkpoint(p)
        except CheckpointError as e:
            problems.append(str(e))
            if warn:
                warn(f"{e}; falling back to an older checkpoint")
    if problems:
        raise CheckpointError(folder, "no intact checkpoint: " + "; ".join(problems))
    raise CheckpointError(folder, "no checkpoint files (step-*.pt) in this folder")


def checkpoint_name(step: int, tag: str | None = None) -> str:
    """File name for a checkpoint; tags are letters, digits, '_', '.', '-'."""
    if tag is None:
        return f"step-{step:08d}.pt"
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", tag):
        raise ValueError(f"tag: got {tag!r}; allowed: 1-64 letters, digits, '_', '.', '-'")
    return f"step-{step:08d}-{tag}.pt"


class SaveJob(NamedTuple):
    """One save handed to a writer: the host copy, where it goes, what runs once it is on disk."""
    state: Any
    path: Path
    on_done: Callable[[Path], None]
    buffers: Any
    extra: Any = None
    replaceable: bool = False   # a newer save may take its place while it waits (periodic saves)
    before: Callable[[], None] | None = None   # runs on the writer's thread just before the file is written
    kind: str | None = None     # a newer save of the same kind takes its place while it waits (a newer best)


class AsyncWriter:
    """Writes checkpoints on a background thread, one at a time, in order, with bounded memory.

    The trainer thread copies the state to host memory and hands it over; disk latency never stalls
    a step. At most one save is being written and one waits: a newer save takes the place of a waiting
    *replaceable* one, or of a waiting one of its own kind (a newer best; ``on_replaced(path)`` says which;
    its host copy is reused). Behind any other waiting save (a save someone asked for, the last) a
    replaceable save is skipped (:meth:`take_buffers` gives None), so that training goes on however long the
    writer is stalled, and any other save waits for the slot. A writer that falls behind
    holds at most two copies of the state, never a queue of them (torch.distributed.checkpoint's async
    recipe keeps one save in flight for the same reason). ``wait()`` blocks until every save is on disk
    (and lifts the pacer's pauses while it waits); errors are reported to ``on_error``. The thread ends
    when it has nothing to write for a while, or at :meth:`close`, so an ended run's writer holds nothing.
    """

    LINGER_S = 1.0  # an idle thread waits this long for the next save before it ends

    def __init__(self, on_error: Callable[[Path, BaseException], None], pacer: Pacer | None = None,
                 on_replaced: Callable[[Path], None] | None = None) -> None:
        self._cond = threading.Condition()
        self._pending: SaveJob | None = None
        self._busy = False
        self._closing = False
        self._on_error = on_error
        self._on_replaced = on_replaced
        self._pacer = pacer
        if pacer is not None and pacer.behind is None:
            pacer.behind = self.behind  # a newer save waits behind this one
        self._thread: threading.Thread | None = None
        self._pool: list[Any] = []  # host buffers of a written save, for the next one

    mode = "thread"

    def behind(self) -> bool:
        """A save waits behind the one being written."""
        return self._pending is not None

    def start(self) -> None:
        """Nothing to start ahead: the thread starts with the first save."""

    def take_buffers(self, replaceable: bool = False, kind: str | None = None) -> Any:
        """Host buffers for the next save (``workbench.checkpointing.host_copy``): those of a waiting save
        this one replaces, else those of an earlier save once it is on disk (copying into memory that is
        mapped already is ~10x faster than fresh allocations), else new ones. While a save this one may
        not replace holds the waiting slot: None at once for a ``replaceable`` save (skip it), else wait."""
        with self._cond:
            if replaceable and not self._may_replace(kind):
                return None
            replaced = self._claim_slot(kind)
            buffers = replaced.buffers if replaced is not None and replaced.buffers is not None else \
                (self._pool.pop() if self._pool else None)
        if replaced is not None and self._on_replaced is not None:
            self._on_replaced(replaced.path)
        return self._fresh_buffers() if buffers is None else self._prepare(buffers)

    def _fresh_buffers(self) -> Any:
        return {}

    def _prepare(self, buffers: Any) -> Any:
        return buffers

    def _may_replace(self, kind: str | None) -> bool:
        """(Lock held.) The waiting slot is free, or holds a save a newer one of ``kind`` may replace."""
        p = self._pending
        return p is None or p.replaceable or (kind is not None and p.kind == kind)

    def _claim_slot(self, kind: str | None = None) -> SaveJob | None:
        """(Lock held.) Wait until a save of ``kind`` may take the waiting slot; take out the save it replaces."""
        while not self._may_replace(kind):
            self._cond.wait()
        replaced, self._pending = self._pending, None
        return replaced

    def recycle(self, buffers: Any) -> None:
        """A save is on disk: keep its buffers for the next one (one set)."""
        with self._cond:
            if not self._pool:
                self._pool.append(buffers)

    def close(self) -> None:
        """Free the kept buffers (the run has ended); the thread ends once it has written what it has."""
        with self._cond:
            self._pool.clear()
            self._closing = True
            self._cond.notify_all()

    def submit(self, state: dict, path: Path, on_done: Callable[[Path], None], buffers: Any = None, *,
               replaceable: bool = False, before: Callable[[], None] | None = None, kind: str | None = None) -> None:
        """Hand one save over: ``state`` is the host copy (in ``buffers``, from :meth:`take_buffers`);
        ``on_done`` runs on the writer's thread once the file is on disk. Called on the trainer thread."""
        self._enqueue(SaveJob(state, Path(path), on_done, buffers, None, replaceable, before, kind))

    def _enqueue(self, item: SaveJob) -> None:
        with self._cond:
            replaced = self._claim_slot(item.kind)
            self._pending = item
            self._closing = False
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="workbench-ckpt-writer", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        if replaced is not None:
            if self._on_replaced is not None:
                self._on_replaced(replaced.path)
            if replaced.buffers is not None:
                self.recycle(replaced.buffers)

    def _write(self, state: dict, path: Path, buffers: Any, extra: Any) -> None:
        """Write one save (``extra``: what a subclass handed over with it)."""
        atomic_save(state, path, self._pacer)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._pending is None and not self._closing:
                    self._cond.wait(self.LINGER_S)
                item = self._pending
                if item is None:  # idle (or closed): end; the next save starts a thread again
                    self._thread = None
                    self._cond.notify_all()
                    return
                self._pending, self._busy = None, True
                self._cond.notify_all()
            try:
                if item.before is not None:
                    item.before()
                self._write(item.state, item.path, item.buffers, item.extra)
                item.on_done(item.path)
            except BaseException as e:  # noqa: BLE001 - reported; the checkpointer decides what it means
                self._on_error(item.path, e)
            finally:
                item = None
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def wait(self) -> None:
        """Block until all submitted checkpoints are written (at full speed: someone is waiting)."""
        if self._pacer is not None:
            self._pacer.hurry(True)
        try:
            with self._cond:
                while self._pending is not None or self._busy:
                    self._cond.wait()
        finally:
            if self._pacer is not None:
                self._pacer.hurry(False)
