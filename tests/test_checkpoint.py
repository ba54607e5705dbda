"""workbench.checkpoint: the checkpoint file and how it is written and read.

* Loading is safe: a truncated, empty or corrupt file, a pickle that would run code, or a file of a newer
  format is refused with the file's name and what is wrong (a payload never runs); resuming falls back to
  the newest intact checkpoint. The workbench refuses to import with a torch that loads unsafely.
* Saving is atomic (no partial file is ever left), and paced: the writer pauses between pieces unless
  someone waits for the file or a newer save waits behind it; pacing changes no byte.
* The RNG state (python, numpy, torch) is read again only when a generator moved, restores the same draws,
  and loads from earlier checkpoints' layout too.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time

import numpy as np
import pytest
import torch

from workbench import Trainer
from workbench.checkpoint import AsyncWriter, CheckpointError, Pacer, RNGState, atomic_save, load_checkpoint

from conftest import PYTHON, ROOT, saved_run


def test_truncated_checkpoint_is_refused_and_resume_falls_back(tmp_path):
    tr = saved_run(tmp_path)
    ckdir = tr.run_dir / "checkpoints"
    good = ckdir / "step-00000040.pt"
    data = good.read_bytes()
    bad = ckdir / "step-00000050.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"step-00000050\.pt.*truncated or corrupt"):
        load_checkpoint(bad)
    with pytest.warns(UserWarning, match=r"step-00000050\.pt.*falling back"):
        resumed = Trainer.from_checkpoint(tr.run_dir)
    assert resumed.step_count == 40
    empty = ckdir / "step-00000060.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    tr = saved_run(tmp_path, steps=20)
    marker = tmp_path / "PWNED"
    evil = tr.run_dir / "checkpoints" / "step-00000099.pt"
    ckpt = load_checkpoint(tr.run_dir / "checkpoints" / "step-00000020.pt")
    ckpt["state"]["extra"] = _Payload(str(marker))
    with open(evil, "wb") as f:
        torch.save(ckpt, f)
    with pytest.raises(CheckpointError, match=r"step-00000099\.pt.*refused"):
        load_checkpoint(evil)
    assert not marker.exists()
    with pytest.warns(UserWarning, match="step-00000099"):
        resumed = Trainer.from_checkpoint(tr.run_dir)
    assert resumed.step_count == 20 and not marker.exists()
    # the plain pickle module would have run it: the test's payload is real
    with open(evil, "rb") as f:
        raw = f.read()
    assert b"system" in raw


def test_a_checkpoint_of_a_newer_format_is_refused_with_its_path(tmp_path):
    tr = saved_run(tmp_path, steps=20)
    ckpt = load_checkpoint(tr.run_dir / "checkpoints" / "step-00000020.pt")
    ckpt["format_version"] = 99
    newer = tmp_path / "newer.pt"
    atomic_save(ckpt, newer)
    with pytest.raises(CheckpointError, match=r"newer\.pt.*newer workbench \(format 99"):
        load_checkpoint(newer)


def test_a_failed_atomic_save_leaves_no_file(tmp_path):
    target = tmp_path / "ck" / "x.pt"

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")
    with pytest.raises(RuntimeError):
        atomic_save({"a": Unsaveable()}, target)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_a_torch_that_loads_checkpoints_unsafely_is_refused_at_import():
    code = "import torch; torch.__version__ = '2.5.1'; import workbench"
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode != 0 and "CVE-2025-32434" in proc.stderr


def test_paced_write_loads_back_and_pauses_only_when_nobody_waits(tmp_path):
    state = {"big": torch.randn(1024, 1024), "small": [torch.arange(5), {"x": torch.tensor(2.5)}], "n": 3}
    pacer = Pacer(duty=0.5)
    atomic_save(state, tmp_path / "a.pt", pacer)
    assert pacer.pauses > 0  # 4 MB in 256 KB pieces: the writer stopped between them
    back = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.equal(back["big"], state["big"]) and torch.equal(back["small"][0], state["small"][0])
    assert back["small"][1]["x"].item() == 2.5 and back["n"] == 3
    pacer.hurry(True)  # what AsyncWriter.wait() does: someone waits for the file
    before = pacer.pauses
    atomic_save(state, tmp_path / "b.pt", pacer)
    assert pacer.pauses == before
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()  # pacing changes no byte


def test_rng_state_of_earlier_checkpoints_still_loads():
    import random
    random.seed(5)
    rng = RNGState()
    state = rng.state_dict()
    expected = random.random()
    old = dict(state, python=[state["python"][0], state["python"][1].tolist(), state["python"][2]])  # a list then
    rng.load_state_dict(old)
    assert random.random() == expected
    rng.load_state_dict(state)
    assert random.random() == expected


def test_rng_state_reads_numpy_again_exactly_when_its_generator_moved():
    """The numpy part is re-read only when the generator's words or position changed, or a Gaussian was
    cached; whatever the path, it equals np.random.get_state() and restores the same draws."""

    def same(ours, theirs):
        name, keys, pos, has_gauss, cached = theirs
        return (ours[0] == name and np.array_equal(ours[1].numpy(), keys.astype(np.int64)) and ours[2] == pos
                and ours[3] == has_gauss and ours[4] == cached)

    np.random.seed(11)
    rng = RNGState()
    first = rng.state_dict()["numpy"]
    again = rng.state_dict()["numpy"]
    assert again[1] is first[1] and same(again, np.random.get_state())  # unmoved: the last read, no new copy
    np.random.rand(3)
    moved = rng.state_dict()["numpy"]
    assert moved[1] is not first[1] and same(moved, np.random.get_state())
    np.random.standard_normal()  # draws a pair and caches its second Gaussian
    cached = rng.state_dict()["numpy"]
    assert cached[3] == 1 and same(cached, np.random.get_state())
    np.random.standard_normal()  # uses the cached one: the words and position do not move
    used = rng.state_dict()["numpy"]
    assert used[3] == 0 and same(used, np.random.get_state())
    expected = np.random.rand(4)
    rng.load_state_dict(rng_state := {**rng.state_dict(), "numpy": used})
    assert np.array_equal(np.random.rand(4), expected) and rng_state["numpy"] is used
    for _ in range(700):  # past a regeneration of all 624 words
        np.random.randint(0, 10)
    assert same(rng.state_dict()["numpy"], np.random.get_state())


def test_rng_state_reads_python_again_exactly_when_its_generator_moved():
    import random

    random.seed(3)
    rng = RNGState()
    first = rng.state_dict()["python"]
    again = rng.state_dict()["python"]
    assert again[1] is first[1]  # unmoved: the last read's words, no new copy
    random.random()
    moved = rng.state_dict()["python"]
    assert moved[1] is not first[1]
    random.gauss()  # draws two numbers and keeps the second Gaussian in gauss_next
    kept, kept_then = rng.state_dict()["python"], random.getstate()
    random.gauss()  # uses gauss_next: the words do not move
    used, used_then = rng.state_dict()["python"], random.getstate()
    assert used[1] is kept[1] and kept[2] is not None and used[2] is None

    def as_getstate(state):
        return state[0], tuple(state[1].tolist()), state[2]

    assert as_getstate(kept) == kept_then and as_getstate(used) == used_then
    expected = [random.gauss() for _ in range(3)]
    rng.load_state_dict({**rng.state_dict(), "python": used})
    assert [random.gauss() for _ in range(3)] == expected


def test_paced_writer_catches_up_when_a_newer_save_waits_and_a_newer_one_replaces_it(tmp_path):
    """A save waiting behind the one being written makes the writer stop pausing; at most one waits: a newer
    replaceable save takes its place (its buffers are reused), so memory holds two copies at most."""
    pacer = Pacer(duty=0.05)
    replaced = []
    writer = AsyncWriter(lambda p, e: None, pacer, on_replaced=replaced.append)
    state = {"w": torch.randn(512, 1024)}  # 2 MB: several pieces
    release, held = threading.Event(), threading.Event()

    def hold(p):  # the first save's callback keeps the writer busy until the others are handed over
        held.set()
        release.wait(10)
    writer.submit({"x": 1}, tmp_path / "first.pt", hold)
    assert held.wait(10) and not writer.behind()
    writer.submit(state, tmp_path / "a.pt", lambda p: None, replaceable=True)
    assert writer.behind() and not pacer._pacing()  # a newer save waits: no pauses for the one written
    writer.submit(state, tmp_path / "b.pt", lambda p: None, replaceable=True)
    assert replaced == [tmp_path / "a.pt"]
    release.set()
    writer.wait()
    assert not (tmp_path / "a.pt").exists()
    assert torch.equal(torch.load(tmp_path / "b.pt", weights_only=True)["w"], state["w"])
