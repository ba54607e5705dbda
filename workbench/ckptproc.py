"""A checkpoint writer in a process of its own, reading the host copy from shared memory.

Why a process: the trainer thread and a writer thread share one GIL. ``torch.save`` pickles the
state and frames the file in code that holds it, so every millisecond of writing is a millisecond the
trainer may wait at its next Python line; pacing the thread (``workbench.pacing``) spreads that cost
over many steps but cannot remove it. A separate process has a GIL of its own, so the trainer's share
of a save is the copy of the state into host memory at a step boundary and nothing else.

How the state travels: the trainer copies each tensor into an *arena*, anonymous shared memory
(``memfd_create``: no name in any folder) whose descriptor goes to the writer over a Unix socket
(``SCM_RIGHTS``) once. The writer gets a small message per save: the file to write and the state's
structure with every tensor replaced by a :class:`TensorRef` (arena, offset, dtype, shape, strides). It
wraps those bytes as tensors without copying them, writes the file with
:func:`workbench.checkpoint.atomic_save` (the same bytes a thread would write) and answers; only then may
the trainer copy a later save into the same arena. The kernel frees an arena when the last process
holding it ends, so a killed trainer or writer leaves no shared memory behind.

The process is started with ``python -c`` (never ``multiprocessing``'s spawn, which would import
the user's ``__main__`` again and re-run a script without a ``__main__`` guard), one per Python
process, shared by every trainer in it. When its parent ends (exit, crash, SIGKILL) its socket closes and
it exits at once, abandoning a write under way (a temp file, removed at the run's next start), so no file
lands after its trainer is gone. If it cannot start or dies, :class:`ProcessWriter` writes on its own
thread instead and says why. Memory is bounded as for any writer (:class:`workbench.checkpoint.AsyncWriter`):
one save written, one waiting, each with its own set of arenas.
"""
from __future__ import annotations

import itertools
import mmap
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from .checkpoint import AsyncWriter, SaveJob, atomic_save
from .cputhreads import cpu_count
from .pacing import Pacer

ALIGN = 64          # arena offsets are multiples of this (any dtype's alignment)
MIN_ARENA = 1 << 16
NICE = 0            # the writer process's niceness, relative to its parent: not lowered, since a process cannot
                    # raise it back when it falls behind, and a starved writer (nice 10 beside a busy trainer on a
                    # loaded machine) took 10 s a save, so that every waiting save was replaced
_LOST = object()    # a job whose answer will never come (the process ended)


def unsupported() -> str | None:
    """Why the writer process cannot run here, or None when it can."""
    if os.name != "posix" or not hasattr(socket, "send_fds"):
        return "the writer process needs a POSIX system (arenas are passed over a Unix socket)"
    if not hasattr(os, "memfd_create"):
        return "the writer process needs memfd_create (Linux) for its shared memory"
    if not sys.executable:
        return "no Python executable to start the writer process with"
    return None


def new_arena_fd(name: str) -> int:
    """A descriptor of anonymous shared memory (no name in any folder; freed with its last holder)."""
    return os.memfd_create(name, getattr(os, "MFD_CLOEXEC", 1))


class TensorRef(NamedTuple):
    """Where a host copy lies: ``nbytes`` at ``offset`` of the arena ``arena``, as dtype/shape/stride.

    In a message it travels as a plain tuple tagged with ``REF_TAG`` (:meth:`wire`): the pickler writes a
    plain tuple without calling back into Python, and every such call would let the trainer thread and
    the thread sending the message hand the GIL back and forth (~27 times for a small model's state)."""
    arena: str
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
class Arena:
    """A block of host memory the writer process can map: an anonymous shared-memory descriptor."""

    _names = itertools.count()

    def __init__(self, nbytes: int) -> None:
        self.size = max(int(nbytes), MIN_ARENA)
        self.key = f"workbench-{os.getpid()}-{next(Arena._names)}"
        fd = new_arena_fd(self.key)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, self.size)  # room reserved now: a write to the map can never fail
            else:
                os.ftruncate(fd, self.size)
            self._map: mmap.mmap | None = mmap.mmap(fd, self.size)
        except BaseException:
            os.close(fd)
            raise
        self.fd: int | None = fd  # kept until close: a writer process started later gets it too
        self.bytes: torch.Tensor | None = torch.frombuffer(self._map, dtype=torch.uint8)
        self.used = 0

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
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


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
        ref = TensorRef(arena.key, offset, nbytes, str(layout.dtype).removeprefix("torch."), tuple(layout.shape),
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
        arenas = {a.key: a for a in self.arenas}

        def copy(ref: TensorRef) -> torch.Tensor:
            src = arenas[ref.arena].bytes[ref.offset:ref.offset + ref.nbytes].view(getattr(torch, ref.dtype))
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
    """This process's connection to its writer process (one, shared by every trainer): a Unix socket, over
    which arenas' descriptors travel once each and every save is a small message."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        root = str(Path(__file__).resolve().parent.parent)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        code = (f"import sys; sys.path.insert(0, {root!r}); from workbench.ckptproc import main; "
                f"main({theirs.fileno()})")
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                          pass_fds=(theirs.fileno(),), close_fds=True)
        finally:
            theirs.close()
        self._sock, self._conn = mine, Connection(os.dup(mine.fileno()))
        self._send_lock, self._lock = threading.Lock(), threading.Lock()
        self._jobs: dict[int, list] = {}  # job -> [event, answer]
        self._sent: set[str] = set()      # arenas the process has
        self._ids = itertools.count()
        self.ended: str | None = None  # why the process is gone
        self._hurried = False  # a hurry is on its way for the save being written
        self.ready = threading.Event()  # the process has imported torch and reads messages (or has ended)
        threading.Thread(target=self._read, name="workbench-ckpt-process-reader", daemon=True).start()

    @property
    def pid(self) -> int:
        """The writer process's id (to watch it, or to end it and see the thread take over)."""
        return self._proc.pid

    def _read(self) -> None:
        try:
            while True:
                msg = pickle.loads(self._conn.recv_bytes())
                if msg[0] == "ready":
                    self.ready.set()
                elif msg[0] == "done":
                    with self._lock:
                        job = self._jobs.pop(msg[1], None)
                        self._hurried = False
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
        self._conn.close()
        self._sock.close()

    def _send(self, msg: tuple, arenas: list[Arena] = ()) -> bool:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)  # plain data: plain pickle, not ForkingPickler
        try:
            with self._send_lock:
                for arena in arenas:  # descriptors first, each once: the message may refer to them
                    if arena.key not in self._sent and arena.fd is not None:
                        self._conn.send_bytes(pickle.dumps(("arena", arena.key, arena.size)))
                        socket.send_fds(self._sock, [b"F"], [arena.fd])
                        self._sent.add(arena.key)
                self._conn.send_bytes(data)
            return True
        except (OSError, ValueError):
            return False

    def save(self, path: Path, skeleton: Any, arenas: list[Arena], pace: bool, trainer: int | None = None
             ) -> list | None:
        """Send one checkpoint to the process; returns at once with the job, ``[event, answer]``: once
        the event is set, the answer is None (written), the error ``(errno, text)``, or ``_LOST`` (the
        process ended first). None when the message could not be sent (the process has ended). ``pace``:
        the trainer's team fills every core; ``trainer``: its thread's native id (see :func:`keep_off`)."""
        job = [threading.Event(), _LOST]
        with self._lock:
            if self.ended:
                return None
            n = next(self._ids)
            self._jobs[n] = job
        if not self._send(("save", n, str(path), skeleton, pace, trainer), arenas):
            with self._lock:
                self._jobs.pop(n, None)
            return None
        return job

    def hurry(self) -> None:
        """Someone waits for the files: the process stops pacing the save it is writing. Once per save: more
        messages to a stalled process would fill the socket and block the trainer thread that sends them."""
        with self._lock:
            hurried, self._hurried = self._hurried, True
        if not hurried:
            self._send(("hurry",))

    def release(self, key: str) -> None:
        with self._send_lock:
            known = key in self._sent
            self._sent.discard(key)
        if known:
            self._send(("release", key))


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
    """A checkpoint write that failed in the writer process; the message is that process's error, ``errno``
    the OSError's number when it was one (ENOSPC: the disk is full)."""

    def __init__(self, text: str, errno: int | None = None) -> None:
        super().__init__(text)
        self.errno = errno


class ProcessWriter(AsyncWriter):
    """Writes checkpoints in the writer process, one at a time, in order, with bounded memory (see
    :class:`AsyncWriter`: one save written, one waiting).

    ``submit`` is called on the trainer thread with a state copied into :class:`HostBuffers` from
    :meth:`take_buffers`; the writer's thread (see :class:`AsyncWriter`) sends it to the process, waits
    for the answer and then calls ``on_done`` (which gives the buffers back with :meth:`recycle`). The
    process paces its work (short bursts, see :class:`Pacer`) only while the trainer's intra-op team
    fills every core: in its own process the writer takes no GIL from training, only a core.
    ``on_fallback(why)`` is called once if saves have to be written on the thread instead (no process,
    or it ended); the pacer then paces that thread as in :class:`AsyncWriter`.
    """

    def __init__(self, on_error: Callable[[Path, BaseException], None], pacer: Pacer | None = None,
                 on_fallback: Callable[[str], None] | None = None,
                 on_replaced: Callable[[Path], None] | None = None) -> None:
        super().__init__(on_error, pacer, on_replaced)
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

    def _fresh_buffers(self) -> HostBuffers:
        return HostBuffers()

    def _prepare(self, buffers: HostBuffers) -> HostBuffers:
        buffers.complete = True
        return buffers

    def recycle(self, buffers: HostBuffers) -> None:
        """A save is on disk: keep its buffers for the next one (one set; others are freed)."""
        with self._cond:
            keep = not self._pool and buffers.complete and not buffers.wasteful()  # (incomplete: try arenas again)
            if keep:
                self._pool.append(buffers)
        if not keep:
            self._free(buffers)

    def _free(self, buffers: HostBuffers) -> None:
        keys = [a.key for a in buffers.arenas]
        buffers.close()
        if self._client is not None:
            for k in keys:
                self._client.release(k)

    def close(self) -> None:
        """Free the kept buffers (the run has ended); a later save makes new ones."""
        with self._cond:
            pool, self._pool = self._pool, []
        for buffers in pool:
            self._free(buffers)
        super().close()

    def submit(self, state: dict, path: Path, on_done: Callable[[Path], None], buffers: HostBuffers, *,
               replaceable: bool = False, before: Callable[[], None] | None = None, kind: str | None = None) -> None:
        # read on the trainer thread: its intra-op team, and which thread it is
        extra = (torch.get_num_threads() >= self._cpus, threading.get_native_id())
        self._enqueue(SaveJob(state, path, on_done, buffers, extra, replaceable, before, kind))
        if self._busy and self._client is not None:
            self._client.hurry()  # a save now waits behind the one being written: that one stops pacing itself

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
            if self._client is not None and self._client.ready.is_set():  # (still importing torch: written here)
                if self._pacer is not None:
                    self._pacer.start()
                job = self._client.save(path, state, buffers.arenas, *extra)
            elif self._client is not None:
                atomic_save(buffers.materialize(state), path, self._pacer)
                return
        if job is not None:
            job[0].wait()
            if job[1] is None:
                if self._pacer is not None:
                    self._pacer.start()
                return
            if job[1] is not _LOST:
                errno, text = job[1]
                raise WriteFailed(text, errno)
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
        if self._client is not None and (self._pending is not None or self._busy):
            self._client.hurry()
        super().wait()


# ----------------------------------------------------------------------------- the writer's side
def _tensor(ref: TensorRef, maps: dict[str, mmap.mmap]) -> torch.Tensor:
    dtype = getattr(torch, ref.dtype)
    if ref.nbytes == 0:
        return torch.empty_strided(ref.shape, ref.stride, dtype=dtype)
    # A storage of exactly these bytes (not the whole arena, which torch.save would write whole).
    raw = torch.frombuffer(maps[ref.arena], dtype=torch.uint8, count=ref.nbytes, offset=ref.offset)
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


def main(fd: int) -> None:
    """The writer process: read messages from the socket ``fd``, answer on it, until its parent is gone."""
    sock = socket.socket(fileno=fd)
    conn = Connection(os.dup(fd))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; this ends when its socket closes
    torch.set_num_threads(1)
    try:
        if NICE:
            os.nice(NICE)
    except OSError:
        pass
    # Messages are read as they come, so a sender never blocks on a full socket while a save is written.
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                msg = pickle.loads(conn.recv_bytes())
                if msg[0] == "arena":
                    _, fds, _, _ = socket.recv_fds(sock, 1, 1)
                    msg = (*msg, fds[0])
                inbox.put(msg)
        except (EOFError, OSError, IndexError):
            pass
        # The parent is gone: a file written now would land after its trainer, outside its records.
        os._exit(0)

    threading.Thread(target=read, name="workbench-ckpt-inbox", daemon=True).start()
    pacer = Pacer(behind=lambda: not inbox.empty())  # any message waiting (a hurry, a newer save) ends pauses
    cpus = allowed_cpus()
    maps: dict[str, mmap.mmap] = {}

    def answer(*msg: Any) -> bool:
        try:
            conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
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
                error = (getattr(e, "errno", None), f"{type(e).__name__}: {e}")
            state = None
            if not answer("done", job, error):
                break
        elif msg[0] == "arena":
            _, key, size, afd = msg
            try:
                maps[key] = mmap.mmap(afd, size)
            finally:
                os.close(afd)
        elif msg[0] == "release":
            mm = maps.pop(msg[1], None)
            if mm is not None:
                _close_map(mm)
    for mm in maps.values():
        _close_map(mm)
