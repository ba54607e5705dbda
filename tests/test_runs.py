"""workbench.runs: the runs under a folder, who trains each one, and how they descend from each other.

* ``describe_runs`` lists every run with ``where`` it is trained: "this app" (a trainer registered in this
  process, with its live status), "pid N" (another live process), or "-" (nobody); a run whose status says
  it is going but whose process is gone is shown stale ("running?").
* ``owner`` says the same of one run: where, the pid, alive.
* ``lineage`` follows forks both ways: a run's ancestors, oldest first, with the step each child forked at,
  and its direct children.
"""
from __future__ import annotations

import os

import pytest

from workbench import Trainer, registry, runs

from conftest import cfg_for, kill, saved_run, training_process, wait_for


@pytest.fixture
def root(tmp_path):
    """A folder of runs; trainers registered under it are stopped after the test."""
    yield tmp_path
    registry.stop_all(under=tmp_path)
    runs.clear_cache()


def where(root) -> dict[str, tuple[str, str]]:
    runs.clear_cache()  # the list is cached for a second: read it again
    df = runs.describe_runs(root)
    return {k: (w, s) for k, w, s in zip(df["key"], df["where"], df["status"])}


def test_describe_runs_and_owner_say_who_trains_each_run(root):
    ended = saved_run(root, steps=10)  # trained (and finished) by this process, not registered
    mine = registry.add(Trainer(cfg_for(root / "mine", max_steps=None)).start(paused=True))
    wait_for(lambda: mine.status == "paused")
    with training_process(root) as (proc, other):
        listed = where(root)
        assert listed[registry.key(ended.run_dir)] == ("-", "finished")
        assert listed[registry.key(mine.run_dir)] == ("this app", "paused")
        assert listed[registry.key(other)] == (f"pid {proc.pid}", "running")
        assert runs.owner(ended.run_dir) == {"where": "none", "pid": os.getpid(), "alive": False}
        assert runs.owner(mine.run_dir) == {"where": "app", "pid": os.getpid(), "alive": True}
        assert runs.owner(other) == {"where": "process", "pid": proc.pid, "alive": True}

        kill(proc)
        assert where(root)[registry.key(other)] == ("-", "running?")  # stale: it says running, nobody trains it
        assert runs.owner(other) == {"where": "none", "pid": proc.pid, "alive": False}


def test_lineage_follows_forks_both_ways(root):
    parent = saved_run(root, steps=20, every=10)
    child = parent.fork(checkpoint=parent.run_dir / "checkpoints" / "step-00000010.pt", run_dir=root / "child")
    child.run()
    grandchild = child.fork(checkpoint=child.run_dir / "checkpoints" / "step-00000020.pt", run_dir=root / "grand")
    p, c, g = (registry.key(t.run_dir) for t in (parent, child, grandchild))

    assert runs.lineage(g, root) == {"ancestors": [{"run": p, "child": c, "step": 10},
                                                   {"run": c, "child": g, "step": 20}], "children": []}
    assert runs.lineage(c, root) == {"ancestors": [{"run": p, "child": c, "step": 10}],
                                     "children": [{"run": g, "step": 20}]}
    assert runs.lineage(p, root) == {"ancestors": [], "children": [{"run": c, "step": 10}]}
