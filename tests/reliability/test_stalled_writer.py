"""A stalled checkpoint writer (its process stopped with SIGSTOP while a run saves every few steps).

While it is stopped, training goes on (also once a save that may not give way, a best, waits), and the host
memory held for saves stays at most one save in flight plus one waiting (the shared-memory arenas do not grow, and neither does the trainer's RSS by anything like
a queue of saves); every save made meanwhile is either the one in flight, the one waiting, a periodic one that
a newer one replaced, or a periodic one skipped while a best waited (an event says which). After SIGCONT the run finishes with every other checkpoint
on disk, loadable and in the checkpoint table, and the writer is still the process (no fallback, no error).
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from workbench import Trainer, ckptproc
from workbench.checkpoint import checkpoint_files, load_checkpoint

from conftest import cfg_for, wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(ckptproc.unsupported() is not None or not os.path.isdir("/proc/self/fd"),
                                 reason="a writer process and /proc to count its shared memory")]

EVERY = 2
STALLED_STEPS = 400  # per measurement: 200 saves made while the writer is stopped


def _arena_bytes() -> int:
    """Bytes of this process's shared-memory arenas (memfd descriptors named workbench-PID-N)."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:workbench-{os.getpid()}-"):
                total += os.fstat(int(fd)).st_size
        except OSError:  # closed meanwhile
            pass
    return total


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_a_stopped_writer_holds_two_saves_at_most_and_loses_only_replaced_ones(tmp_path):
    tr = Trainer(cfg_for(tmp_path / "run", max_steps=10_000_000, eval_every=0, checkpoint_every=EVERY,
                         keep_checkpoints=1_000_000, model_options={"width": 512, "dropout": 0.1})).start()
    pid = None
    try:
        # the writer process is up (until it has imported torch, saves are written in this process) and writing
        wait_for(ckptproc.client().ready.is_set, timeout=120)
        written = len(tr.checkpoints)
        wait_for(lambda: len(tr.checkpoints) >= written + 3, timeout=120)
        assert tr.checkpointer.mode == "process"
        state_bytes = sum(t.numel() * t.element_size() for t in tr.model.state_dict().values()) * 3  # + Adam
        pid = ckptproc.client().pid
        os.kill(pid, signal.SIGSTOP)
        s0 = tr.step_count
        wait_for(lambda: tr.step_count >= s0 + STALLED_STEPS, timeout=300)  # training goes on
        arenas, rss = _arena_bytes(), _rss()
        wait_for(lambda: tr.step_count >= s0 + 2 * STALLED_STEPS, timeout=300)
        # no growth from a queue: another 200 saves later, the same arenas; 100 queued saves would be ~100x
        assert _arena_bytes() == arenas
        assert arenas <= 8 * state_bytes, (arenas, state_bytes)  # two sets of buffers, each grown geometrically
        assert _rss() - rss < 20 * state_bytes, (_rss() - rss, state_bytes)
        stalled_at = tr.step_count
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: tr.step_count >= stalled_at + 50, timeout=120)
    tr.stop()
    tr.join(120)
    assert tr.status == "stopped"
    assert tr.checkpointer.mode == "process" and pid == ckptproc.client().pid  # the same process wrote on
    ev = tr.events
    assert ev[ev["kind"].isin(["checkpoint_failed", "checkpoint_writer"])].empty
    saves: dict[str, list[str]] = {}
    for d in ev[ev["kind"] == "checkpoint"]["data"]:
        saves.setdefault(Path(d["path"]).name, []).append(d["reason"])
    gave_way = [d for d in ev[ev["kind"] == "checkpoint_skipped"]["data"] if "path" in d]
    # a waiting save replaced by a newer one (a periodic one, or a best by a newer best)
    replaced = [Path(d["path"]).name for d in gave_way if "replaced" in d["reason"]]
    # a periodic save not made at all: the waiting slot held a save that may not give way (a best)
    skipped = [Path(d["path"]).name for d in gave_way if "replaced" not in d["reason"]]
    assert len(replaced) + len(skipped) == len(gave_way)
    table = {Path(p).name for p in tr.checkpoints["path"]}
    on_disk = {p.name for _, p in checkpoint_files(tr.checkpoint_dir)}
    assert table == on_disk
    assert all(saves[n][0] in ("periodic", "best") for n in replaced)  # only these give way
    assert all(saves[n][0] == "periodic" for n in replaced if "best" not in n)
    assert all(int(n[5:13]) % EVERY == 0 and "-" not in n[5:] for n in skipped)
    # a replaced or skipped file is on disk only when a later save of the same step (the stop's) wrote it
    assert all(len(saves[n]) > 1 for n in set(replaced) & on_disk)
    assert all(n in saves and saves[n][-1] == "stopped" for n in set(skipped) & on_disk)
    assert set(saves) - set(replaced) <= on_disk  # every other save reached the disk and the table
    assert len(replaced) + len(skipped) >= 2 * STALLED_STEPS // EVERY - 4  # the stall really held saves back
    for name in on_disk:
        load_checkpoint(tr.checkpoint_dir / name)
