"""A full disk: ``workbench train`` with its run directory on a small tmpfs (mounted here; skipped where mount is
not permitted). The user sees the cause (ENOSPC and the file), the run ends ``failed`` (never ``finished``),
the CLI exits non-zero and does not offer the run as resumable from a step it never saved; the checkpoints
written before the disk filled are intact and in the table, and run.db is readable and tells the truth
(status, the last step, every step's row).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from workbench.checkpoint import checkpoint_files, load_checkpoint
from workbench.rundir import RunDB

from conftest import PYTHON, ROOT, cfg_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name != "posix" or not shutil.which("mount"),
                                                   reason="mounts a tmpfs")]

SIZE = "6m"  # room for run.db and about five checkpoints of ~1 MB


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_fails_the_run_with_the_cause_and_keeps_what_was_written(tmp_path, small_disk):
    run_dir = small_disk / "run"
    cfg = cfg_for(run_dir, max_steps=3000, model_options={"width": 256, "dropout": 0.1}, batch_size=32,
                  eval_every=100, checkpoint_every=20, keep_checkpoints=1000)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "run_dir"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([PYTHON, "-m", "workbench.cli", "train", "--config", str(config), "--run-dir", str(run_dir),
                           "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 1, said[-3000:]
    assert "No space left on device" in proc.stderr and "[Errno 28]" in proc.stderr, proc.stderr[-3000:]
    assert str(run_dir / "checkpoints") in proc.stderr  # the path that could not be written
    assert "Run failed" in proc.stdout and "finished" not in proc.stdout

    db = RunDB(run_dir / "run.db", readonly=True)
    try:
        meta, last, steps, events, table = db.meta(), db.last_step(), db.read_steps(), db.read_events(), \
            db.read_checkpoints()
    finally:
        db.close()
    assert meta["status"] == "failed"
    assert 0 < last < 3000 and steps["step"].tolist() == list(range(1, last + 1))
    failed = events[events["kind"] == "checkpoint_failed"]
    assert len(failed) >= 1 and "Errno 28" in failed["data"].iloc[0]["error"]
    assert events[events["kind"] == "status"]["data"].iloc[-1] == {"status": "failed"}
    # the earlier checkpoints: on disk, in the table, each loads; none is newer than the run got
    files = checkpoint_files(run_dir / "checkpoints")
    assert len(files) >= 2
    assert {p.name for _, p in files} == {Path(p).name for p in table["path"]}
    for step, path in files:
        assert load_checkpoint(path)["step"] == step <= last
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # the failed write's temp file is gone
