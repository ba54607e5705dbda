"""workbench.rundir: the run directory and its SQLite database (RunDB), TBWriter, list_runs, new_run_dir.

* RunDB round-trips steps, evals, layer rows (NaN as NULL, +-inf), events (numpy values, nested data),
  metadata and the checkpoint table; it deletes the rows after a step (a resume), refuses unknown columns
  writing nothing, opens read-only without creating anything, and is safe from many threads at once.
* Its control inbox holds requests until resolved once (applied or refused, with step and message); a
  second process reads the tables while they grow and posts a request whose outcome it gets back.
* new_run_dir makes unique run folders; list_runs lists them newest first with status, step and best val
  loss; TBWriter writes scalars TensorBoard reads back.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workbench.rundir import (
    EVAL_COLUMNS,
    LAYER_COLUMNS,
    LIST_RUNS_COLUMNS,
    STEP_COLUMNS,
    RunDB,
    TBWriter,
    list_runs,
    new_run_dir,
)

from conftest import ROOT


@pytest.fixture()
def db(tmp_path: Path):
    d = RunDB(tmp_path / "run.db")
    yield d
    d.close()


# ---------------------------------------------------------------------------------------------- metrics
def test_steps_round_trip_with_nan_and_inf(db: RunDB) -> None:
    rows = [
        {"step": 0, "epoch": 0, "train_loss": 2.5, "lr": 0.1, "batch_size": 32, "precision": "fp32",
         "grad_norm": 1.0, "samples_per_s": 1000.0, "time": 100.0},
        {"step": 1, "epoch": 0, "train_loss": float("nan"), "lr": np.float32(0.05), "batch_size": np.int64(64),
         "precision": "bf16", "grad_norm": float("inf"), "samples_per_s": -math.inf, "time": 101.0},
        {"step": 2, "train_loss": np.float64(1.25)},  # missing columns -> NULL/NaN, time filled in
    ]
    before = time.time()
    db.insert_steps(rows)
    df = db.read_steps()
    assert list(df.columns) == list(STEP_COLUMNS)
    assert df["step"].tolist() == [0, 1, 2] and df["step"].dtype == np.int64
    assert math.isnan(df.loc[1, "train_loss"])
    assert df.loc[1, "grad_norm"] == math.inf and df.loc[1, "samples_per_s"] == -math.inf
    assert df.loc[1, "lr"] == pytest.approx(0.05) and df.loc[1, "batch_size"] == 64
    assert df.loc[1, "precision"] == "bf16"
    assert math.isnan(df.loc[2, "lr"]) and df.loc[2, "precision"] is None
    assert df.loc[2, "time"] >= before
    for c in ("epoch", "train_loss", "lr", "batch_size", "grad_norm", "samples_per_s", "time"):
        assert df[c].dtype == np.float64, c

    # since_step is exclusive; INSERT OR REPLACE on step
    assert db.read_steps(since_step=0)["step"].tolist() == [1, 2]
    assert db.read_steps(since_step=2).empty
    db.insert_steps([{"step": 1, "train_loss": 0.5}])
    again = db.read_steps()
    assert len(again) == 3 and again.loc[1, "train_loss"] == 0.5
    assert db.last_step() == 2

    with pytest.raises(ValueError, match="'loss'.*allowed"):
        db.insert_steps([{"step": 3, "loss": 1.0}])
    with pytest.raises(ValueError, match="'step'"):
        db.insert_steps([{"train_loss": 1.0}])
    assert len(db.read_steps()) == 3  # failed batches wrote nothing


def test_evals_and_layers_round_trip(db: RunDB) -> None:
    assert list(db.read_evals().columns) == list(EVAL_COLUMNS) and db.read_evals().empty
    db.insert_evals([
        {"step": 100, "val_loss": 1.5, "val_acc": 0.4, "time": 1.0},
        {"step": 200, "val_loss": math.inf, "val_acc": None, "time": 2.0},
        {"step": 300, "val_loss": math.nan, "time": 3.0},
    ])
    ev = db.read_evals()
    assert ev["step"].tolist() == [100, 200, 300]
    assert ev.loc[1, "val_loss"] == math.inf and math.isnan(ev.loc[1, "val_acc"])
    assert math.isnan(ev.loc[2, "val_loss"])
    assert db.read_evals(since_step=100)["step"].tolist() == [200, 300]

    db.insert_layers([
        {"step": 10, "layer": "fc2", "grad_norm": 0.1, "param_norm": 2.0, "update_ratio": 1e-3},
        {"step": 10, "layer": "fc1", "grad_norm": math.nan, "param_norm": math.inf, "update_ratio": 0.0},
        {"step": 20, "layer": "fc1", "grad_norm": 0.3, "param_norm": 2.1, "update_ratio": 2e-3},
    ])
    db.insert_layers([{"step": 10, "layer": "fc2", "grad_norm": 0.2, "param_norm": 2.0, "update_ratio": 1e-3}])
    la = db.read_layers()
    assert list(la.columns) == list(LAYER_COLUMNS)
    assert list(zip(la["step"], la["layer"])) == [(10, "fc1"), (10, "fc2"), (20, "fc1")]
    assert math.isnan(la.loc[0, "grad_norm"]) and la.loc[0, "param_norm"] == math.inf
    assert la.loc[1, "grad_norm"] == 0.2
    assert db.read_layers(since_step=10)["step"].tolist() == [20]


def test_delete_after_drops_every_row_past_a_step(db: RunDB) -> None:
    db.insert_steps([{"step": s, "train_loss": 1.0 / (s + 1)} for s in range(10)])
    db.insert_evals([{"step": s, "val_loss": 1.0} for s in (3, 6, 9)])
    db.insert_layers([{"step": s, "layer": "a", "grad_norm": 1.0} for s in range(10)])
    db.delete_after(5)
    assert db.read_steps()["step"].tolist() == list(range(6))
    assert db.read_evals()["step"].tolist() == [3]
    assert db.read_layers()["step"].max() == 5
    db.insert_steps([{"step": 6, "train_loss": 9.0}])  # the resumed run continues
    assert db.read_steps()["step"].tolist() == list(range(7))


# ---------------------------------------------------------------------------------------------- events, meta, checkpoints
def test_events_round_trip(db: RunDB) -> None:
    data = {
        "lr": np.float32(0.5),
        "n": np.int64(3),
        "shape": (2, 3),
        "arr": np.arange(3),
        "bad": math.nan,
        "big": math.inf,
        "nested": {"x": [1.5, -math.inf], 7: "seven"},
    }
    i1 = db.log_event(step=5, kind="control_applied", source="trainer", data=data, time=123.0)
    i2 = db.log_event(step=6, kind="note", source="user")
    assert i2 > i1
    ev = db.read_events()
    assert list(ev.columns) == ["id", "time", "step", "kind", "source", "data"]
    assert ev["id"].tolist() == [i1, i2] and ev["step"].tolist() == [5, 6]
    d0 = ev.loc[0, "data"]
    assert ev.loc[0, "time"] == 123.0 and ev.loc[0, "kind"] == "control_applied"
    assert d0["lr"] == 0.5 and d0["n"] == 3 and d0["shape"] == [2, 3] and d0["arr"] == [0, 1, 2]
    assert math.isnan(d0["bad"]) and d0["big"] == math.inf
    assert d0["nested"] == {"x": [1.5, -math.inf], "7": "seven"}
    assert ev.loc[1, "data"] == {}
    assert db.read_events(since_id=i1)["id"].tolist() == [i2]
    assert db.read_events(since_id=i2).empty
    with pytest.raises(ValueError, match="kind"):
        db.log_event(step=1, kind="", source="x")


def test_meta_and_the_checkpoint_table_round_trip(db: RunDB) -> None:
    db.set_meta(status="running", started=1000.5, model={"name": "mlp", "width": np.int64(64)})
    db.set_meta(status="paused")
    assert db.meta() == {"status": "paused", "started": 1000.5, "model": {"name": "mlp", "width": 64}}

    db.add_checkpoint(step=200, path="checkpoints/b.pt", metric=0.5, tag="best", time=2.0)
    db.add_checkpoint(step=100, path="checkpoints/a.pt", metric=None, tag=None, time=1.0)
    db.add_checkpoint(step=300, path="checkpoints/c.pt", metric=math.nan, tag="last")
    cp = db.read_checkpoints()
    assert list(cp.columns) == ["step", "path", "metric", "tag", "time"]
    assert cp["step"].tolist() == [100, 200, 300]
    assert math.isnan(cp.loc[0, "metric"]) and cp.loc[1, "metric"] == 0.5 and cp.loc[0, "tag"] is None
    db.remove_checkpoint("checkpoints/a.pt")
    db.remove_checkpoint("checkpoints/missing.pt")  # ignored
    assert db.read_checkpoints()["path"].tolist() == ["checkpoints/b.pt", "checkpoints/c.pt"]


def test_the_control_inbox_resolves_each_request_once(db: RunDB) -> None:
    r1 = db.post_control({"lr": 0.01, "grad_clip": np.float64(1.0)})
    r2 = db.post_control({}, action="pause", source="notebook")
    pend = db.pending_controls()
    assert [p["id"] for p in pend] == [r1, r2]
    assert pend[0]["controls"] == {"lr": 0.01, "grad_clip": 1.0} and pend[0]["action"] == "set"
    assert pend[1]["source"] == "notebook" and pend[1]["action"] == "pause"
    db.resolve_control(r1, status="applied", step=42, message="lr 0.1 -> 0.01")
    db.resolve_control(r2, status="refused", step=None, message="already paused")
    assert db.pending_controls() == []
    c1 = db.control(r1)
    assert (c1["status"], c1["step"], c1["message"]) == ("applied", 42, "lr 0.1 -> 0.01")
    assert db.wait_control(r2, timeout=0.1)["status"] == "refused"

    r3 = db.post_control({"lr": 1.0})
    assert db.wait_control(r3, timeout=0.2)["status"] == "pending"  # timeout returns the pending record

    with pytest.raises(ValueError, match="'jump'.*allowed"):
        db.post_control({}, action="jump")
    with pytest.raises(ValueError, match="'done'.*allowed"):
        db.resolve_control(r3, status="done", step=1)
    with pytest.raises(ValueError, match="already 'applied'"):
        db.resolve_control(r1, status="applied", step=43)
    with pytest.raises(KeyError):
        db.control(9999)


def test_a_readonly_db_needs_the_file_refuses_writes_and_closes(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    with pytest.raises(FileNotFoundError):
        RunDB(path, readonly=True)
    w = RunDB(path)
    w.insert_steps([{"step": 1, "train_loss": 1.0}])
    w.close()  # the last writer is gone (WAL files checkpointed away)
    ro = RunDB(path, readonly=True)
    assert ro.read_steps()["step"].tolist() == [1]
    with pytest.raises(PermissionError):
        ro.insert_steps([{"step": 2}])
    ro.close()
    with pytest.raises(RuntimeError, match="closed"):
        ro.read_steps()


def test_many_threads_write_and_read(db: RunDB) -> None:
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for b in range(20):
                base = k * 10_000 + b * 10
                db.insert_steps([{"step": base + j, "train_loss": float(j)} for j in range(10)])
                db.log_event(step=base, kind="batch", source=f"t{k}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(30):
                df = db.read_steps()
                assert df["step"].is_monotonic_increasing
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(db.read_steps()) == 4 * 20 * 10
    assert len(db.read_events()) == 4 * 20


# ---------------------------------------------------------------------------------------------- a second process
CHILD = textwrap.dedent(
    """
    import json, sys, time
    from workbench.rundir import RunDB

    path = sys.argv[1]
    ro = RunDB(path, readonly=True)
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        df = ro.read_steps()
        steps = df["step"].tolist()
        if steps and steps != list(range(steps[0], steps[0] + len(steps))):
            raise SystemExit("gap or disorder in steps: %r" % steps[:20])
        if df["train_loss"].isna().any():
            raise SystemExit("half-written row")
        if not seen or len(df) != seen[-1]:
            seen.append(len(df))
        if len([s for s in seen if s > 0]) >= 3:
            break
        time.sleep(0.02)
    rw = RunDB(path)
    rid = rw.post_control({"lr": 0.01, "note": "from child"}, source="child")
    result = rw.wait_control(rid, timeout=30)
    print(json.dumps({"seen": seen, "rid": rid, "result": result}))
    """
)


def test_second_process_reads_while_writing_and_controls_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    db = RunDB(path)
    stop = threading.Event()
    written = [0]

    def write_loop() -> None:
        step = 0
        while not stop.is_set():
            db.insert_steps([{"step": step + j, "train_loss": 1.0 / (step + j + 1)} for j in range(10)])
            step += 10
            written[0] = step
            time.sleep(0.02)

    wt = threading.Thread(target=write_loop, daemon=True)
    wt.start()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        pending: list[dict] = []
        while not pending and time.monotonic() < deadline and child.poll() is None:
            pending = db.pending_controls()
            time.sleep(0.02)
        assert pending, "the child never posted a control: " + (child.stderr.read() if child.poll() is not None else "")
        req = pending[0]
        assert req["source"] == "child" and req["action"] == "set"
        assert req["controls"] == {"lr": 0.01, "note": "from child"}
        applied_at = written[0]
        db.resolve_control(req["id"], status="applied", step=applied_at, message="lr set to 0.01")
        out, err = child.communicate(timeout=60)
    finally:
        stop.set()
        wt.join(timeout=10)
        if child.poll() is None:
            child.kill()
            child.wait()
        db.close()
    assert child.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["rid"] == req["id"]
    assert res["result"]["status"] == "applied"
    assert res["result"]["step"] == applied_at and res["result"]["message"] == "lr set to 0.01"
    seen = [s for s in res["seen"] if s > 0]
    assert len(seen) >= 3 and seen == sorted(seen), res["seen"]  # it watched the table grow


# ---------------------------------------------------------------------------------------------- run folders
def test_new_run_dir_makes_unique_folders_and_refuses_bad_names(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    a = new_run_dir(root)
    assert a.parent == root and (a / "tb").is_dir() and (a / "checkpoints").is_dir()
    named = new_run_dir(root, name="exp1")
    again = new_run_dir(root, name="exp1")
    assert named.name == "exp1" and again.name == "exp1-2"
    b = new_run_dir(root)
    assert b != a and b.name.startswith(time.strftime("%Y-"))
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError, match="single folder name"):
            new_run_dir(root, name=bad)


def test_list_runs_lists_runs_newest_first_with_status_step_and_best_loss(tmp_path: Path) -> None:
    missing = list_runs(tmp_path / "nope")
    assert missing.empty and list(missing.columns) == list(LIST_RUNS_COLUMNS)
    (tmp_path / "empty").mkdir()
    assert list_runs(tmp_path / "empty").empty

    root = tmp_path / "runs"
    old = new_run_dir(root, name="old")
    new = new_run_dir(root, name="new")
    (root / "not-a-run").mkdir()
    with RunDB(old / "run.db") as d:
        d.set_meta(status="finished", started=1000.0, dataset="mnist", model={"name": "mlp"})
        d.insert_steps([{"step": s, "train_loss": 1.0} for s in range(50)])
        d.insert_evals([{"step": 10, "val_loss": 0.7}, {"step": 20, "val_loss": 0.4}, {"step": 30, "val_loss": math.nan}])
    writer = RunDB(new / "run.db")  # still open: another process would be writing
    writer.set_meta(status="running", started=2000.0)
    writer.insert_steps([{"step": 7}])

    runs = list_runs(root)
    writer.close()
    assert list(runs.columns) == list(LIST_RUNS_COLUMNS)
    assert runs["run"].tolist() == ["new", "old"]  # newest first
    n, o = runs.iloc[0], runs.iloc[1]
    assert (n["status"], n["step"], n["started"]) == ("running", 7, 2000.0)
    assert math.isnan(n["best_val_loss"]) and n["dataset"] is None
    assert (o["status"], o["step"], o["best_val_loss"]) == ("finished", 49, 0.4)
    assert (o["dataset"], o["model"]) == ("mnist", "mlp")
    assert o["path"] == str(old)

    # a run without metadata or metric rows
    bare = new_run_dir(root, name="bare")
    RunDB(bare / "run.db").close()
    runs = list_runs(root)
    row = runs[runs["run"] == "bare"].iloc[0]
    assert row["status"] == "unknown" and pd.isna(row["step"]) and row["started"] > 2000.0


# ---------------------------------------------------------------------------------------------- TensorBoard
def test_tbwriter_scalars_read_back_in_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    records = [("train/loss", s, 1.0 / (s + 1), 1_700_000_000.0 + s) for s in range(20)]
    records += [("val/loss", s, 0.5 + s, 1_700_000_100.0 + s) for s in (5, 10, 15)]
    records += [("train/loss", 20, math.inf, 1_700_000_020.0)]
    with TBWriter(logdir) as tb:
        tb.write(records[:10])
        tb.write(iter(records[10:]))
        tb.flush()
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    assert set(ea.Tags()["scalars"]) == {"train/loss", "val/loss"}
    for tag in ("train/loss", "val/loss"):
        want = [(s, v, w) for t, s, v, w in records if t == tag]
        got = [(e.step, e.value, e.wall_time) for e in ea.Scalars(tag)]
        assert [g[0] for g in got] == [w[0] for w in want]
        np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-6)
        np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="tag, step, value, walltime"):
        TBWriter(tmp_path / "tb2").write([("x", 1, 2.0)])
