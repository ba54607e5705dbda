"""workbench.ckptproc: the checkpoint writer process.

It writes the same bytes a thread writes, reports a failed write with the process's error, writes in this
process when no shared memory can be had, is replaced by the thread when it is lost (with an event, and
every file still loads), leaves nothing in any folder (its arenas have no name), ends when its parent is
killed, and keeps a save's write off the CPU of the trainer thread.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from workbench import Trainer
from workbench import ckptproc
from workbench.checkpoint import AsyncWriter, atomic_save, load_checkpoint
from workbench.checkpointing import host_copy

pytestmark = pytest.mark.skipif(ckptproc.unsupported() is not None, reason=str(ckptproc.unsupported()))


def _state() -> dict:
    w = torch.randn(6, 4)
    return {"model": {"enc": w, "dec": w,  # tied: one storage in the file
                      "t": torch.randn(5, 3).t(),  # not contiguous: the copy keeps its strides
                      "half": torch.randn(7, dtype=torch.bfloat16), "mask": torch.tensor([True, False, True]),
                      "empty": torch.zeros(0, 4), "count": torch.tensor(3, dtype=torch.int64)},
            "opt": [{"m": torch.ones(3), "lr": 0.1}, (1, "x", None)], "rng": torch.get_rng_state(), "n": 7}


class Errors(list):
    """A writer's ``on_error``: collects the errors of its writes."""

    def __call__(self, path: Path, e: BaseException) -> None:
        self.append(e)


def _write(writer, errors: Errors, state: dict, buffers, path: Path) -> list:
    """Write ``state`` with ``writer`` (made with ``on_error=errors``): the errors of this write, else [path]."""
    done = []
    errors.clear()
    copy = host_copy(state, buffers)
    writer.submit(copy, path, done.append, buffers)
    writer.wait()
    return list(errors) or done


def _arena_files() -> list[str]:
    """Shared-memory files this process left in /dev/shm or the temp folder (arenas must leave none)."""
    import tempfile
    return [p for d in ("/dev/shm", tempfile.gettempdir()) if os.path.isdir(d) for p in os.listdir(d)
            if p.startswith(f"workbench-{os.getpid()}-")]


def test_the_process_writes_the_bytes_a_thread_writes(tmp_path):
    state = _state()
    errors, thread_errors = Errors(), Errors()
    proc = ckptproc.ProcessWriter(errors)
    proc.start()
    assert ckptproc.client().ready.wait(60) and proc.mode == "process"
    buffers = proc.take_buffers()
    assert _write(proc, errors, state, buffers, tmp_path / "p.pt") == [tmp_path / "p.pt"]
    assert _write(AsyncWriter(thread_errors), thread_errors, state, {}, tmp_path / "t.pt") == [tmp_path / "t.pt"]
    assert (tmp_path / "p.pt").read_bytes() == (tmp_path / "t.pt").read_bytes()
    # what this process writes when the writer process is lost: the same bytes again
    atomic_save(buffers.materialize(host_copy(state, buffers)), tmp_path / "m.pt")
    assert (tmp_path / "m.pt").read_bytes() == (tmp_path / "t.pt").read_bytes()
    back = torch.load(tmp_path / "p.pt", weights_only=True)
    assert back["model"]["enc"] is back["model"]["dec"] or \
        back["model"]["enc"].untyped_storage().data_ptr() == back["model"]["dec"].untyped_storage().data_ptr()
    assert back["model"]["t"].stride() == state["model"]["t"].stride()
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v) and back["model"][k].dtype == v.dtype
    # the buffers are reused: a changed state is copied into the same arena and written again
    proc.recycle(buffers)
    state["model"]["enc"].add_(1)
    again = proc.take_buffers()
    assert again is buffers
    arenas = [a.key for a in again.arenas]
    assert _arena_files() == []  # anonymous memory: nothing in any folder, even while it is in use
    assert _write(proc, errors, state, again, tmp_path / "p2.pt") == [tmp_path / "p2.pt"]
    assert [a.key for a in again.arenas] == arenas
    assert torch.equal(torch.load(tmp_path / "p2.pt", weights_only=True)["model"]["dec"], state["model"]["enc"])
    proc.recycle(again)
    proc.close()
    assert not again.arenas  # close() freed the kept buffers


def test_a_failed_write_is_reported_with_the_process_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    reported = Errors()
    proc = ckptproc.ProcessWriter(reported)
    errors = _write(proc, reported, _state(), proc.take_buffers(), tmp_path / "file" / "x.pt")
    assert len(errors) == 1 and isinstance(errors[0], ckptproc.WriteFailed)
    assert "FileExistsError" in str(errors[0]) or "NotADirectoryError" in str(errors[0])
    assert proc.mode == "process"  # a failed write is not a lost process


def test_without_shared_memory_the_save_is_written_here(tmp_path, monkeypatch):
    """No shared memory to be had (here: memfd_create refuses; on a host, a memory limit): the host copy
    stays in private memory and this process writes the file, the same bytes."""
    state = _state()

    def refuse(name: str) -> int:
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(ckptproc, "new_arena_fd", refuse)
    errors, thread_errors = Errors(), Errors()
    proc = ckptproc.ProcessWriter(errors)
    buffers = proc.take_buffers()
    assert _write(proc, errors, state, buffers, tmp_path / "p.pt") == [tmp_path / "p.pt"]
    assert not buffers.complete and not buffers.arenas
    assert _write(AsyncWriter(thread_errors), thread_errors, state, {}, tmp_path / "t.pt") == [tmp_path / "t.pt"]
    assert (tmp_path / "p.pt").read_bytes() == (tmp_path / "t.pt").read_bytes()
    assert proc.mode == "process"  # the next save may find room again


def test_a_lost_writer_process_is_replaced_by_the_thread(tmp_path):
    """The process is killed during a run: later saves are written in-process, an event says why, and
    every checkpoint file loads."""
    tr = Trainer(dataset="digits", model="mlp", model_options={"width": 32}, max_steps=400, max_epochs=None,
                 batch_size=32, eval_every=0, seed=3, run_dir=str(tmp_path / "run"), tensorboard=False,
                 checkpoint_every=20, keep_checkpoints=1000)
    assert tr.checkpointer.mode == "process"
    killed = threading.Event()

    def kill(ctx):
        if ctx.step == 150 and not killed.is_set():
            os.kill(ckptproc.client().pid, signal.SIGKILL)
            killed.set()
    tr.on("step_end", kill)
    tr.run()
    assert killed.is_set() and tr.status == "finished"
    ev = tr.events
    fell = ev[ev["kind"] == "checkpoint_writer"]
    assert len(fell) == 1 and fell.iloc[0]["data"]["mode"] == "thread"
    assert "ended" in fell.iloc[0]["data"]["why"]
    assert ev[ev["kind"] == "checkpoint_failed"].empty
    files = sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))
    steps = [load_checkpoint(p)["step"] for p in files]
    replaced = {int(Path(d["path"]).name[5:13]) for d in ev[ev["kind"] == "checkpoint_skipped"]["data"]}
    assert set(range(20, 401, 20)) - replaced <= set(steps) and 400 in steps  # only a waiting save gave way
    assert _arena_files() == []
    # a new trainer gets a new writer process
    tr2 = Trainer(dataset="digits", model="mlp", model_options={"width": 32}, max_steps=30, max_epochs=None,
                  batch_size=32, eval_every=0, seed=3, run_dir=str(tmp_path / "run2"), tensorboard=False,
                  checkpoint_every=10)
    tr2.run()
    assert tr2.checkpointer.mode == "process" and not ckptproc.client().ended
    ev2 = tr2.events
    assert ev2[ev2["kind"] == "checkpoint_writer"].empty


def test_resume_from_a_process_written_checkpoint_matches_a_thread_written_one(tmp_path):
    common = dict(dataset="digits", model="mlp", model_options={"width": 32}, max_steps=60, max_epochs=None,
                  batch_size=32, eval_every=0, seed=5, tensorboard=False, checkpoint_every=30,
                  keep_checkpoints=100)
    a = Trainer(run_dir=str(tmp_path / "a"), checkpoint_writer="process", **common).run()
    b = Trainer(run_dir=str(tmp_path / "b"), checkpoint_writer="thread", **common).run()
    assert a.checkpointer.mode == "process" and b.checkpointer.mode == "thread"
    ca = load_checkpoint(tmp_path / "a" / "checkpoints" / "step-00000030.pt")
    cb = load_checkpoint(tmp_path / "b" / "checkpoints" / "step-00000030.pt")
    for k in ca["state"]["model"]:
        assert torch.equal(ca["state"]["model"][k], cb["state"]["model"][k])
    ra = Trainer.from_checkpoint(tmp_path / "a" / "checkpoints" / "step-00000030.pt", run_dir=tmp_path / "ra").run()
    rb = Trainer.from_checkpoint(tmp_path / "b" / "checkpoints" / "step-00000030.pt", run_dir=tmp_path / "rb").run()
    last = [t.history["train_loss"].tolist()[-30:] for t in (ra, rb, a)]
    assert last[0] == last[1] == last[2] and ra.step_count == 60


@pytest.mark.skipif(len(ckptproc.allowed_cpus()) < 2 or not os.path.exists("/proc/self/task"),
                    reason="needs Linux and two allowed CPUs")
def test_the_write_keeps_off_the_cpu_of_the_trainer_thread():
    """The writer process runs a save on a CPU other than the one the trainer thread last ran on, and on
    any allowed CPU when the trainer's team fills them all (no trainer thread named)."""
    cpus = ckptproc.allowed_cpus()
    trainer_cpu = min(cpus)
    pinned, done = threading.Event(), threading.Event()
    seen: list[set[int]] = []

    def trainer() -> None:  # stands for the trainer thread: it runs on one CPU
        os.sched_setaffinity(0, {trainer_cpu})
        pinned.set()
        done.wait(30)

    def writer(tid: int) -> None:  # stands for the process's writing thread
        ckptproc.keep_off(os.getpid(), tid, cpus)
        seen.append(os.sched_getaffinity(0))
        ckptproc.keep_off(os.getpid(), None, cpus)
        seen.append(os.sched_getaffinity(0))

    t = threading.Thread(target=trainer)
    t.start()
    try:
        assert pinned.wait(30)
        time.sleep(0.05)  # it has been scheduled on its CPU since
        w = threading.Thread(target=writer, args=(t.native_id,))
        w.start()
        w.join(30)
    finally:
        done.set()
        t.join(30)
    assert seen == [cpus - {trainer_cpu}, cpus]
