"""A checkpoint writer in a process of its own, reading the host copy from shared memory.

Why a process: the trainer thread and a writer thread share one GIL. ``torch.save`` pickles the
state and frames the file in code that holds it, so every millisecond of writing is a millisecond the
trainer may wait at its next Python line; pacing the thread (``workbench.pacing``) spreads that cost
over many steps but cannot remove it. A separate process has a GIL of its own, so the trainer's share
of a save is the copy of the state into host memory at a step boundary and nothing else.

How the state travels: the trainer copies each tensor into an *arena*, a file in a memory-backed
folder (``/dev/shm``) that both processes map. The writer gets a small message per save: the file to
write and the state's structure with every tensor replaced by a :class:`TensorRef` (arena, offset,
dtype, shape, strides). It wraps those bytes as tensors without copying them, writes the file with
:func:`workbench.checkpoint.atomic_save` (the same bytes a thread would write) and answers; only
then may the trainer copy a later save into the same arena. The writer unlinks an arena's file as
soon as it has mapped it, so nothing is left in ``/dev/shm`` when either process dies.

The process is started with ``python -c`` (never ``multiprocessing``'s spawn, which would import
the user's ``__main__`` again and re-run a script without a ``__main__`` guard), one per Python
process, shared by every trainer in it, and ends when its parent closes the pipe (exit or crash).
If it cannot start or dies, :class:`ProcessWriter` writes on its own thread instead and says why.
"""
from __future__ import annotations

import atexit
import itertools
import mmap
import os
import pickle
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from .checkpoint import AsyncWriter, atomic_save
from .cputhreads import cpu_count
from .pacing import Pacer

ALIGN = 64          # arena offsets are multiples of this (any dtype's alignment)
MIN_ARENA = 1 << 16
NICE = 10           # the writer process's niceness, relative to its parent
_LOST = object()    # a job whose answer will never come (the process ended)


def unsupported() -> str | None:
    """Why the writer process cannot run here, or None when it can."""
    if os.name != "posix":
        return "the writer process needs a POSIX system (arenas are shared by path)"
    if not sys.executable:
        return "no Python executable to start the writer process with"
    return None


def arena_dirs() -> list[str]:
    """Where arenas may go, best first: /dev/shm (memory-backed on Linux), then the temp folder (the page
    cache keeps a file that is written and read at once in memory). An arena is made in the first of them
    with room; when none has any, the save is written by this process from private memory instead.

    Arena files are named ``workbench-<pid>-<n>.buf`` (``pid``: the trainer's process); the writer process
    unlinks each one as soon as it has mapped it, so none outlives a save's buffers."""
    shm = "/dev/shm"
    first = [shm] if os.path.isdir(shm) and os.access(shm, os.W_OK) else []
    return first + [tempfile.gettempdir()]


class TensorRef(NamedTuple):
    """Where a host copy lies: ``nbytes`` at ``offset`` of the arena file ``path``, as dtype/shape/stride.

    In a message it travels as a plain tuple tagged with ``REF_TAG`` (:meth:`wire`): the pickler writes a
    plain tuple without calling back into Python, and every such call would let the trainer thread and
    the thread sending the message hand the GIL back and forth (~27 times for a small model's state)."""
    path: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple
    stride: tuple

    def wire(self) -> tuple:
        return (REF_TAG, *self)

    @classmethod
    def from_wire(cls, obj: Any) -> "TensorRef | None":
        """The TensorRef a message's tuple stands for, or None when it is plain data."""
        if type(obj) is tuple and len(obj) == 7 and obj[0] == REF_TAG:
            return cls(*obj[1:])
        return None


REF_TAG = "\x00workbench.TensorRef"


# ----------------------------------------------------------------------------- the trainer's side
_unlinked_at_exit: set[str] = set()  # arena files of this process the writer may not have unlinked yet


@atexit.register
def _remove_arena_files() -> None:
    for path in list(_unlinked_at_exit):
        _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
    _unlinked_at_exit.discard(path)


class Arena:
    """A block of host memory the writer process can map: a file in a memory-backed folder."""

    _names = itertools.count()

    def __init__(self, nbytes: int) -> None:
        self.size = max(int(nbytes), MIN_ARENA)
        name = f"workbench-{os.getpid()}-{next(Arena._names)}.buf"
        for i, folder in enumerate(dirs := arena_dirs()):
            try:
                self._map: mmap.mmap | None = self._create(os.path.join(folder, name))
                break
            except OSError:  # no room there (a container's /dev/shm is often 64 MB): the next folder
                if i == len(dirs) - 1:
                    raise
        self.bytes: torch.Tensor | None = torch.frombuffer(self._map, dtype=torch.uint8)
        self.used = 0

    def _create(self, path: str) -> mmap.mmap:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.path = path
        _unlinked_at_exit.add(path)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, self.size)  # room reserved now: a write to the map can never fail
            else:
                os.ftruncate(fd, self.size)
            return mmap.mmap(fd, self.size)
        except BaseException:
            _unlink(path)
            raise
        finally:
            os.close(fd)

    def take(self, nbytes: int) -> int | None:
        """The offset of ``nbytes`` more, or None when they do not fit."""
        offset = -(-self.used // ALIGN) * ALIGN
        if offset + nbytes > self.size:
            return None
        self.used = offset + nbytes
        return offset

    def close(self) -> None:
        self.bytes = None
        if self._map is not None:
            _close_map(self._map)
            self._map = None
        _unlink(self.path)


class HostBuffers(dict):
    """One snapshot's host copies (``workbench.checkpointing.host_copy``'s key -> tensor map) placed in arenas.

    ``host_copy`` asks :meth:`alloc` for new buffers and puts :meth:`leaf` of each buffer, its
    :class:`TensorRef`, in the copy's tree: that tree is the message the writer process gets, built
    in the walk that copies the tensors (a second walk on another thread would hold the GIL while
    the trainer runs its next step)."""

    def __init__(self) -> None:
        super().__init__()
        self.arenas: list[Arena] = []
        # id(buffer) -> (the buffer, where it lies, its wire form); holding the buffer keeps its id its own
        self.refs: dict[int, tuple[torch.Tensor, TensorRef, tuple]] = {}
        self.complete = True  # False when a tensor of this save lies outside the arenas

    def alloc(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor with the layout ``t.to("cpu", copy=True)`` would have, in an arena."""
        layout = torch.empty_like(t, device="cpu")
        if layout.layout != torch.strided:
            return layout  # no plain memory (sparse): no ref, so this save is written in this process
        nbytes = layout.untyped_storage().nbytes()
        arena = self.arenas[-1] if self.arenas else None
        offset = arena.take(nbytes) if arena is not None else None
        if arena is None or offset is None:
            try:
                arena = Arena(max(nbytes, 2 * sum(a.size for a in self.arenas)))  # grows geometrically
            except OSError:  # no shared memory to be had: no ref, so this save is written in this process
                return layout
            self.arenas.append(arena)
            offset = arena.take(nbytes)
        buf = arena.bytes[offset:offset + nbytes].view(layout.dtype).as_strided(layout.shape, layout.stride())
        ref = TensorRef(arena.path, offset, nbytes, str(layout.dtype).removeprefix("torch."), tuple(layout.shape),
                        tuple(layout.stride()))
        self.refs[id(buf)] = (buf, ref, ref.wire())
        return buf

    def leaf(self, buf: torch.Tensor) -> Any:
        """What stands for ``buf`` in the message: its TensorRef (the buffer itself when it has none,
        and then the save cannot go to the writer process)."""
        entry = self.refs.get(id(buf))
        if entry is None or entry[0] is not buf:
            self.complete = False
            return buf
        return entry[2]

    def materialize(self, tree: Any) -> Any:
        """The tree with each TensorRef replaced by a copy in memory of its own: for writing in this
        process (torch.save of a view into an arena would write the whole arena)."""
        arenas = {a.path: a for a in self.arenas}

        def copy(ref: TensorRef) -> torch.Tensor:
            src = arenas[ref.path].bytes[ref.offset:ref.offset + ref.nbytes].view(getattr(torch, ref.dtype))
            return torch.empty_strided(ref.shape, ref.stride, dtype=src.dtype).copy_(src.as_strided(ref.shape,
                                                                                                      ref.stride))

        return _with_tensors(tree, copy, lambda t: t.clone(memory_format=torch.preserve_format))

    def wasteful(self) -> bool:
        """True when most of the arenas hold copies no longer used (the state's layout changed). Drops
        the refs of buffers the last copy no longer used, which it counts."""
        self.refs = {id(b): self.refs[id(b)] for b in self.values() if id(b) in self.refs}  # the buffers kept
        return sum(a.used for a in self.arenas) > 2 * sum(r.nbytes for _, r, _ in self.refs.values()) + MIN_ARENA

    def close(self) -> None:
        self.clear()
        self.refs.clear()
        for arena in self.arenas:
            arena.close()
        self.arenas.clear()


def _with_tensors(tree: Any, make: Callable[[TensorRef], torch.Tensor],
                  own: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
    """A message's tree with each TensorRef replaced by ``make(ref)`` and each tensor by ``own(tensor)``,
    once per buffer (tied weights share one buffer, and so one storage in the file; an empty tensor is
    made each time, as it may sit at the offset where the next buffer starts)."""
    made: dict[Any, torch.Tensor] = {}

    def walk(obj: Any) -> Any:
        if (ref := TensorRef.from_wire(obj)) is not None:
            key: Any = ref if ref.nbytes else object()
            if key not in made:
                made[key] = make(ref)
            return made[key]
        if own is not None and isinstance(obj, torch.Tensor):
            if id(obj) not in made:  # (the tree holds the tensor, so its id is not reused meanwhile)
                made[id(obj)] = own(obj)
            return made[id(obj)]
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            out = [walk(v) for v in obj]
            return out if isinstance(obj, list) else tuple(out)
        return obj

    return walk(tree)


class _Client:
    """This process's connection to its writer process (one, shared by every trainer)."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        root = str(Path(__file__).resolve().parent.parent)
        code = f"import sys; sys.path.insert(0, {root!r}); from workbench.ckptproc import main; main()"
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      close_fds=True)
        self._out = Connection(os.dup(self._proc.stdin.fileno()), readable=False)
        self._in = Connection(os.dup(self._proc.stdout.fileno()), writable=False)
        self._proc.stdin.close()
        self._proc.stdout.close()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._jobs: dict[int, list] = {}  # job -> [event, answer]
        self._ids = itertools.count()
        self.ended: str | None = None  # why the process is gone
        self.ready = threading.Event()  # the process has imported torch and reads messages (or has ended)
        threading.Thread(target=self._read, name="workbench-ckpt-process-reader", daemon=True).start()

    @property
    def pid(self) -> int:
        """The writer process's id (to watch it, or to end it and see the thread take over)."""
        return self._proc.pid

    def _read(self) -> None:
        try:
            while True:
                msg = pickle.loads(self._in.recv_bytes())
                if msg[0] == "ready":
                    self.ready.set()
                elif msg[0] == "done":
                    with self._lock:
                        job = self._jobs.pop(msg[1], None)
                    if job is not None:
                        job[1] = msg[2]
                        job[0].set()
        except (EOFError, OSError):
            pass
        code = self._proc.wait()
        with self._lock:
            self.ended = f"the checkpoint writer process (pid {self._proc.pid}) ended with exit code {code}"
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job[1] = _LOST
            job[0].set()
        self.ready.set()

    def _send(self, msg: tuple) -> bool:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)  # plain data: plain pickle, not ForkingPickler
        try:
            with self._send_lock:
                self._out.send_bytes(data)
            return True
        except (OSError, ValueError):
            return False

    def save(self, path: Path, skeleton: Any, pace: bool, trainer: int | None = None) -> list | None:
        """Send one checkpoint to the process; returns at once with the job, ``[event, answer]``: once
        the event is set, the answer is None (written), the error's text, or ``_LOST`` (the process
        ended first). None when the message could not be sent (the process has ended). ``pace``: the
        trainer's team fills every core; ``trainer``: its thread's native id (see :func:`keep_off`)."""
        job = [threading.Event(), _LOST]
        with self._lock:
            if self.ended:
                return None
            n = next(self._ids)
            self._jobs[n] = job
        if not self._send(("save", n, str(path), skeleton, pace, trainer)):
            with self._lock:
                self._jobs.pop(n, None)
            return None
        return job

    def hurry(self) -> None:
        """Someone waits for the files: the process stops pacing the save it is writing."""
        self._send(("hurry",))

    def release(self, path: str) -> None:
        self._send(("release", path))


_client: _Client | None = None
_client_lock = threading.Lock()


def client() -> _Client:
    """The writer process of this Python process, started when first needed (again if it ended)."""
    global _client
    with _client_lock:
        if _client is None or _client.ended or _client.owner != os.getpid():
            _client = _Client()
        return _client


class WriteFailed(Exception):
    """A checkpoint write that failed in the writer process; the message is that process's error."""


class ProcessWriter(AsyncWriter):
    """Writes checkpoints in the writer process, one at a time, in order.

    ``submit`` is called on the trainer thread with a state copied into :class:`HostBuffers` from
    :meth:`take_buffers`; the writer's thread (see :class:`AsyncWriter`) sends it to the process, waits
    for the answer and then calls ``on_done`` (which gives the buffers back with :meth:`recycle`). The
    process paces its work (short bursts, see :class:`Pacer`) only while the trainer's intra-op team
    fills every core: in its own process the writer takes no GIL from training, only a core.
    ``on_fallback(why)`` is called once if saves have to be written on the thread instead (no process,
    or it ended); the pacer then paces that thread as in :class:`AsyncWriter`.
    """

    def __init__(self, on_error: Callable[[Path, BaseException], None], pacer: Pacer | None = None,
                 on_fallback: Callable[[str], None] | None = None) -> None:
        super().__init__(on_error, pacer)
        self._on_fallback = on_fallback
        self._client: _Client | None = None
        self._fell_back: str | None = unsupported()
        self._cpus = cpu_count()

    def start(self) -> None:
        """Start the process now (it imports torch, ~1 s) rather than at the first save."""
        if self._fell_back is None and self._client is None:
            try:
                self._client = client()
            except OSError as e:
                self._fallback(f"the writer process could not start ({e})")

    @property
    def mode(self) -> str:
        return "thread" if self._fell_back else "process"

    def take_buffers(self) -> HostBuffers:
        """Host buffers for the next save: those of an earlier save once it is on disk (copying into
        memory that is mapped already is ~10x faster than fresh allocations), else new ones."""
        buffers = self._pool.pop() if self._pool else HostBuffers()
        buffers.complete = True
        return buffers

    def recycle(self, buffers: HostBuffers) -> None:
        """A save is on disk: keep its buffers for the next one (one set; others are freed)."""
        if self._pool or not buffers.complete or buffers.wasteful():  # (incomplete: try the arenas again)
            self._free(buffers)
        else:
            self._pool.append(buffers)

    def _free(self, buffers: HostBuffers) -> None:
        paths = [a.path for a in buffers.arenas]
        buffers.close()
        if self._client is not None:
            for p in paths:
                self._client.release(p)

    def close(self) -> None:
        """Free the kept buffers (the run has ended); a later save makes new ones."""
        while self._pool:
            self._free(self._pool.pop())

    def submit(self, state: dict, path: Path, on_done: Callable[[Path], None], buffers: HostBuffers) -> None:
        # read on the trainer thread: its intra-op team, and which thread it is
        self._enqueue((state, path, on_done, buffers, (torch.get_num_threads() >= self._cpus,
                                                       threading.get_native_id())))

    def _write(self, state: dict, path: Path, buffers: HostBuffers, extra: tuple[bool, int]) -> None:
        """Send the save to the process and wait for its answer; write here when it cannot (``state``:
        the host copy, with TensorRefs where its tensors were, see HostBuffers.leaf).

        Pickling the message takes the GIL (~0.2 ms for a small model inside a running loop), and so
        does the bookkeeping in ``on_done`` (run.db, retention): the thread rests a few steps' time
        before each, so that neither lands on the step that made the copy or on one another."""
        job = None
        if self._fell_back is None and buffers.complete:
            if self._client is None:
                self.start()
            if self._client is not None:
                if self._pacer is not None:
                    self._pacer.start()
                job = self._client.save(path, state, *extra)
        if job is not None:
            job[0].wait()
            if job[1] is None:
                if self._pacer is not None:
                    self._pacer.start()
                return
            if job[1] is not _LOST:
                raise WriteFailed(job[1])
        if buffers.complete and self._fell_back is None:
            self._fallback((self._client.ended if self._client is not None else None) or "the writer process ended")
        atomic_save(buffers.materialize(state), path, self._pacer)

    def _fallback(self, why: str) -> None:
        if self._fell_back is None:
            self._fell_back = why
            if self._on_fallback is not None:
                self._on_fallback(why)

    def wait(self) -> None:
        """Block until every submitted checkpoint is written (at full speed: someone is waiting)."""
        if self._client is not None and self._queue.unfinished_tasks:
            self._client.hurry()
        super().wait()


# ----------------------------------------------------------------------------- the writer's side
def _tensor(ref: TensorRef, maps: dict[str, mmap.mmap]) -> torch.Tensor:
    dtype = getattr(torch, ref.dtype)
    if ref.nbytes == 0:
        return torch.empty_strided(ref.shape, ref.stride, dtype=dtype)
    mm = maps.get(ref.path)
    if mm is None:
        fd = os.open(ref.path, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        os.unlink(ref.path)  # mapped by both now: nothing is left behind if either process dies
        maps[ref.path] = mm
    # A storage of exactly these bytes (not the whole arena, which torch.save would write whole).
    raw = torch.frombuffer(mm, dtype=torch.uint8, count=ref.nbytes, offset=ref.offset)
    return raw.view(dtype).as_strided(ref.shape, ref.stride)


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask); empty where the system does not say (not
    Linux). The writer process keeps a save's write within them (see :func:`keep_off`)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set()


def keep_off(pid: int, trainer: int | None, cpus: set[int]) -> None:
    """Run the calling thread (the write of a save) on a CPU other than the one the trainer thread
    (native id ``trainer`` in process ``pid``, the parent) is running on; ``trainer`` None: on any of
    ``cpus`` (the trainer's team fills every core, so there is no spare one; the process paces itself
    instead).

    Why: the kernel often wakes this process on the CPU of the thread that woke it, and a small
    model's trainer thread then lost ~2-3 ms (4-5 steps) to the write in about one save in eight, while
    the other core sat idle (bench/RESULTS.md, section 4). Pinned off that CPU, the write runs beside
    training instead. The trainer thread itself is never pinned; it may move, and the next save
    follows it."""
    if len(cpus) < 2:
        return
    target = cpus
    if trainer is not None:
        try:
            with open(f"/proc/{pid}/task/{trainer}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            target = cpus - {int(fields[36])}  # field 39, "processor": the CPU it last ran on
        except (OSError, IndexError, ValueError):
            target = cpus
    try:
        if target and target != os.sched_getaffinity(0):
            os.sched_setaffinity(0, target)
    except OSError:
        pass


def _close_map(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a tensor still views it: the memory goes when that tensor does
        pass


def main() -> None:
    """The writer process: read messages from stdin, answer on stdout, until stdin closes."""
    out = Connection(os.dup(1), readable=False)
    inp = Connection(os.dup(0), writable=False)
    os.dup2(2, 1)  # a stray print goes to stderr, never into the answers
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; this ends when its pipe closes
    torch.set_num_threads(1)
    try:  # when it has to share a core with training, the scheduler gives training the larger part
        os.nice(NICE)
    except OSError:
        pass
    # Messages are read as they come, so a sender never blocks on a full pipe while a save is written.
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                inbox.put(pickle.loads(inp.recv_bytes()))
        except (EOFError, OSError):
            inbox.put(("stop",))

    threading.Thread(target=read, name="workbench-ckpt-inbox", daemon=True).start()
    pacer = Pacer(behind=lambda: not inbox.empty())  # any message waiting (a hurry, a newer save) ends pauses
    cpus = allowed_cpus()
    maps: dict[str, mmap.mmap] = {}

    def answer(*msg: Any) -> bool:
        try:
            out.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
            return True
        except OSError:  # the parent is gone
            return False

    answer("ready", os.getpid())
    while True:
        msg = inbox.get()
        if msg[0] == "save":
            _, job, path, skeleton, pace, trainer = msg
            keep_off(os.getppid(), None if pace else trainer, cpus)
            try:
                state = _with_tensors(skeleton, lambda ref: _tensor(ref, maps))
                atomic_save(state, path, pacer if pace else None)
                error = None
            except BaseException as e:  # noqa: BLE001 - sent back; the parent reports it
                error = f"{type(e).__name__}: {e}"
            state = None
            if not answer("done", job, error):
                break
        elif msg[0] == "release":
            mm = maps.pop(msg[1], None)
            if mm is not None:
                _close_map(mm)
        elif msg[0] == "stop":
            break
    for mm in maps.values():
        _close_map(mm)
