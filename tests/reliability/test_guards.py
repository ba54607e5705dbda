"""One writer per run directory, foreign checkpoints, a poisoned inbox, long run names, ended runs freed.

* Two trainers on one run directory are refused, whichever comes first (another process, or this one).
* A checkpoint of another run dropped into a run's folder is refused by name, and resuming falls back to the
  newest one of the run itself; the run's config.yaml is left as it was.
* Inbox rows whose arguments are not JSON, or of the wrong type, are refused one by one; the valid requests
  after them are applied, each once, in order.
* Ten runs in one process leave no Trainer, thread or file descriptor behind once they are dropped.
"""
from __future__ import annotations

import gc
import os
import shutil
import sqlite3
import threading
import time
import warnings
import weakref

import pytest

from workbench import Trainer
from workbench.rundir import RunDB, new_run_dir
from workbench.resume import run_config
from workbench.rundir.lock import RunBusy

from conftest import cfg_for, training_process, wait_for


def test_two_trainers_on_one_run_directory_are_refused_whichever_comes_first(tmp_path, runs_root):
    with training_process(runs_root) as (proc, run_dir):
        with pytest.raises(RunBusy, match=f"process {proc.pid}"):
            Trainer.from_checkpoint(run_dir) if list((run_dir / "checkpoints").glob("*.pt")) else \
                Trainer(cfg_for(run_dir))
    first = Trainer(cfg_for(tmp_path / "here", max_steps=100_000)).start(paused=True)
    with pytest.raises(RunBusy, match="this process"):
        Trainer(cfg_for(tmp_path / "here"))
    first.stop()
    first.join(60)
    again = Trainer.from_checkpoint(tmp_path / "here")  # the run ended: its directory is free again
    assert again.step_count == first.step_count


def test_a_foreign_checkpoint_is_refused_by_name_and_resume_falls_back(tmp_path):
    mine = Trainer(cfg_for(tmp_path / "mine", max_steps=20, checkpoint_every=10)).run()
    other = Trainer(cfg_for(tmp_path / "other", max_steps=30, model_options={"width": 32})).run()
    config_before = run_config(tmp_path / "mine")["model_options"]
    dropped = tmp_path / "mine" / "checkpoints" / "step-00000999.pt"
    shutil.copy(other.run_dir / "checkpoints" / "step-00000030.pt", dropped)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = Trainer.from_checkpoint(tmp_path / "mine")
    assert tr.step_count == 20
    assert [p.shape for p in tr.model.parameters()] == [p.shape for p in mine.model.parameters()]
    said = " ".join(str(w.message) for w in caught)
    assert str(dropped) in said and "model_options" in said and "different run" in said
    assert run_config(tmp_path / "mine")["model_options"] == config_before
    tr.run_lock.release()


def test_a_poisoned_inbox_refuses_each_bad_row_and_applies_every_later_one(tmp_path):
    tr = Trainer(cfg_for(tmp_path / "run", max_steps=100_000)).start()
    wait_for(lambda: tr.step_count > 2)
    db = RunDB(tr.run_dir / "run.db")
    good = [db.post_control({"lr": 1e-3 * (i + 1)}) for i in range(3)]
    con = sqlite3.connect(tr.run_dir / "run.db")
    bad_rows = [("set", "{not json"), ("step", "[1]"), ("set", "5"), ("set", '"lr=0.1"'), ("nope", "{}"),
                ("set", '{"lr": "fast"}'), ("step", '{"n": -3}')]
    bad = []
    for action, controls in bad_rows:
        cur = con.execute("INSERT INTO controls (time, source, action, controls, status) VALUES (?, 'dashboard', ?, "
                          "?, 'pending')", (time.time(), action, controls))
        bad.append(cur.lastrowid)
    con.commit()
    con.close()
    later = [db.post_control({"lr": 5e-4})]
    ids = good + bad + later
    wait_for(lambda: all(db.control(i)["status"] != "pending" for i in ids), timeout=60)
    for i in bad:
        rec = db.control(i)
        assert rec["status"] == "refused" and rec["message"], rec
    assert all(db.control(i)["status"] == "applied" for i in good + later)
    tr.stop()
    tr.join(60)
    changes = tr.events[tr.events["kind"] == "control"]
    assert [d["new"] for d in changes["data"]] == [1e-3 * 2, 1e-3 * 3, 5e-4]  # 1e-3 is the lr in force: no change
    db.close()


def test_a_long_run_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="name: .*300 characters.*at most 100"):
        new_run_dir(tmp_path, "x" * 300)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts file descriptors in /proc")
def test_ten_runs_in_one_process_free_their_trainers_threads_and_files(tmp_path):
    Trainer(cfg_for(tmp_path / "warm", max_steps=20, checkpoint_every=10)).run()  # the shared writer process
    gc.collect()
    threads, fds = threading.active_count(), _fds()
    refs = []
    for i in range(10):
        tr = Trainer(cfg_for(tmp_path / f"r{i}", max_steps=20, checkpoint_every=10, tensorboard=True)).run()
        refs.append(weakref.ref(tr))
        del tr
    def freed() -> bool:
        gc.collect()
        return all(r() is None for r in refs) and threading.active_count() <= threads
    wait_for(freed, timeout=30)
    assert _fds() <= fds + 2
