"""CPU thread hygiene for a trainer whose torch work runs on its own thread.

Why this exists (measured on a 2-core machine, torch CPU build with GNU OpenMP; see bench/RESULTS.md):
libgomp gives every OS thread that opens a parallel region its *own* pool of worker threads, and the
pool lives as long as that thread. After a notebook's main thread has run torch work it owns an idle
pool; when the trainer thread then opens regions it gets a second pool. libgomp counts every thread it
manages, and once that count exceeds the available CPUs it cuts the time a waiting worker spins
before it sleeps on a futex from ~300,000 iterations to 100 (``do_spin`` / ``gomp_throttled_spin_count_var``
in libgomp). From then on every parallel region of the trainer pays a futex wake-up of its worker:
~19 sleeps per step of a small MLP, 0.5 -> 1.9 ms/step. Nothing in torch is wrong; it is two teams on
few cores.

The remedy is to keep one team at a time: a thread that hands work to the trainer (``start``,
``resume``, ``step``) first gives back its own idle pool, and the trainer thread gives back its pool
when it goes idle (paused, finished). ``release_idle_workers`` does that for the calling thread through
the OpenMP 5.0 call ``omp_pause_resource_all``, which libgomp implements per thread: it ends that
thread's idle workers and lowers the managed-thread count. It never touches another thread's pool,
changes no thread count and no numerics; the next parallel region on that thread simply starts new
workers (tens of microseconds, once).

How many intra-op threads the trainer thread uses is its own choice (``torch.set_num_threads`` on a
thread sets that thread's count; threads that already ran torch work keep theirs, threads that start
later begin with the count last set): ``choose_threads`` gives a step that does little work one thread.
Below ~2e6 multiply-adds per step (parameters x batch size) no parallel region pays for its fork and
join: on this 2-core machine a 64-64-64-10 MLP at batch 64 steps in 0.50 ms on one thread and 0.52 on
two, a 128-wide one 0.61 on both, a 256-wide one 0.94 vs 0.82 (bench/RESULTS.md).
One thread also leaves the other cores to the engine's own threads (recorder, checkpoint writer):
with a team on every core, any of them that runs makes each of the step's parallel regions wait for
the worker it displaced, and a tiny run's slowest steps came from exactly that.

A larger step never gets a team on every core either: one core stays free for whoever watches the run
(the dashboard's server and the browser that draws it, a notebook kernel) and the engine's threads. A
team that spans every core falls off a cliff as soon as anything else runs: each parallel region
waits for the worker the scheduler took away, for a whole time slice. On a loaded 2-core machine a
digits MLP at batch 256 made 14-16 steps/s on two threads and 333 on one, while two
threads gain at most ~1.3x on an idle machine. The count still depends on sizes and the CPUs this
process may use only, never on timings, so a run and its resumed copy on the same machine agree.

Only GNU libgomp is handled (the runtime of the Linux pip wheels of torch). With LLVM/Intel OpenMP
(conda, macOS) the pause call is process-wide, so it is not used; every function here is then a no-op.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from typing import Any

import torch

_OMP_PAUSE_SOFT = 1
_lock = threading.Lock()
_libs: list[Any] | None = None


def _loaded_libgomps() -> list[Any]:
    """Every GNU OpenMP runtime mapped into this process (torch's, and e.g. scikit-learn's own copy)."""
    global _libs
    with _lock:
        if _libs is not None:
            return _libs
        libs: list[Any] = []
        if sys.platform.startswith("linux"):
            paths: list[str] = []
            try:
                with open("/proc/self/maps") as f:
                    for line in f:
                        path = line.rstrip("\n").split(maxsplit=5)[-1]
                        if os.path.basename(path).startswith("libgomp") and path not in paths:
                            paths.append(path)
            except OSError:
                paths = []
            for path in paths:
                try:
                    lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # the copy already loaded
                    fn = lib.omp_pause_resource_all
                except (OSError, AttributeError):
                    continue  # an old libgomp without OpenMP 5.0 pause: nothing to do
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                libs.append(fn)
        _libs = libs
        return libs


def openmp_backend() -> str:
    """``gnu`` when torch's intra-op pool is GNU OpenMP (the case handled here), else a short name."""
    info = torch.__config__.parallel_info()
    if "ATen parallel backend: OpenMP" not in info:
        return "native" if "native thread pool" in info else "other"
    return "gnu" if _loaded_libgomps() else "openmp-other"


def release_idle_workers() -> bool:
    """Give back the calling thread's idle OpenMP worker pool(s). Returns True when a runtime was asked.

    Safe at any point outside a parallel region (it is never called inside one: the engine calls it
    from Python between steps). Other threads' pools are untouched; results do not change.
    """
    if os.environ.get("WORKBENCH_CPU_HANDOVER", "1") == "0":  # opt-out (and what a bench compares against)
        return False
    fns = _loaded_libgomps()
    for fn in fns:
        fn(_OMP_PAUSE_SOFT)
    return bool(fns)


#: Multiply-adds per step (parameters x batch size) below which ``choose_threads`` picks one thread.
SMALL_STEP_WORK = 2_000_000


def choose_threads(requested: int | None, n_params: int, batch_size: int, default: int,
                   cpus: int | None = None) -> tuple[int, str]:
    """Intra-op threads for a trainer thread, and why: ``requested`` (the ``cpu_threads`` setting)
    when given, else one thread for a step under SMALL_STEP_WORK multiply-adds, else ``default``
    (the count of the thread that started the run) capped at one less than ``cpus`` (default: the CPUs
    this process may use), so that a watching view never takes a core from the team. Deterministic: it
    reads sizes and the CPU count, never timings, so a run and its resumed copy pick the same count (the
    count can change a float reduction's order)."""
    if requested is not None:
        return requested, f"cpu_threads={requested}"
    work = n_params * batch_size
    if work < SMALL_STEP_WORK:
        return 1, (f"auto: {work:.2g} multiply-adds per step (parameters x batch size) < {SMALL_STEP_WORK:.0e}, "
                   f"too little to share; one thread leaves the other cores to the engine's own threads")
    cpus = cpu_count() if cpus is None else cpus
    n = max(1, min(default, cpus - 1))
    why = (f"auto: {work:.2g} multiply-adds per step >= {SMALL_STEP_WORK:.0e}: the count of the thread that "
           f"started the run")
    if n < default:
        why += (f" ({default}) less one of the {cpus} CPUs, left to the views watching the run and the engine's "
                f"threads")
    return n, why


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def describe() -> dict[str, Any]:
    """What the trainer logs once per run: backend, intra-op threads, CPUs this process may use."""
    return {"backend": openmp_backend(), "intra_op_threads": torch.get_num_threads(), "cpus": cpu_count(),
            "policy": "one OpenMP team at a time (idle pools released at hand-over)"}
