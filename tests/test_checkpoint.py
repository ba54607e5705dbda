"""Checkpoints: exact resume in a new process (also after live changes), safe loading, retention, fork."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench import Trainer
from workbench.checkpoint import CheckpointError, Pacer, RNGState, atomic_save, load_checkpoint
from workbench.checkpointing import host_copy as _host_copy
from workbench.rundir import RunDB

from conftest import PYTHON, ROOT

WORKER = textwrap.dedent("""
    import json, sys
    from workbench import Trainer
    spec = json.loads(sys.argv[1])
    tr = Trainer.from_checkpoint(spec["resume"]) if "resume" in spec else Trainer(spec["cfg"])
    live = {int(k): v for k, v in spec.get("live", {}).items()}
    ids = []
    def hook(ctx):
        ids.append([ctx.step, int(ctx.metrics["epoch"]), list(ctx.sample_ids)])
        if ctx.step in live:
            tr.set(**live[ctx.step])
        if ctx.step == spec.get("stop_at"):
            tr.stop()
    tr.on("step_end", hook)
    tr.run()
    if spec.get("ids_file"):
        with open(spec["ids_file"], "a") as f:
            f.write(json.dumps(ids) + "\\n")
    print(tr.status, tr.step_count)
""")


def run_worker(spec: dict) -> str:
    proc = subprocess.run([PYTHON, "-c", WORKER, json.dumps(spec)], capture_output=True, text=True, timeout=180,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def cfg_for(run_dir: Path, **kw) -> dict:
    cfg = dict(dataset="digits", model="mlp", model_options={"width": 64, "dropout": 0.1}, max_steps=120,
               max_epochs=None, batch_size=64, eval_every=25, seed=11, run_dir=str(run_dir), tensorboard=False)
    cfg.update(kw)
    return cfg


def final_model(run_dir: Path) -> dict:
    path = max((run_dir / "checkpoints").glob("step-00000120.pt"))
    return load_checkpoint(path)["state"]["model"]


def uninterrupted(run_dir: Path, live: dict, **kw) -> Trainer:
    tr = Trainer(cfg_for(run_dir, **kw))

    def hook(ctx):
        if ctx.step in live:
            tr.set(**live[ctx.step])
    tr.on("step_end", hook)
    tr.run()
    return tr


CASES = {
    "plain": dict(stops=[60], live={}, kw={}),
    "live_lr_and_batch_size_at_30": dict(stops=[60], live={30: {"lr": 3e-3, "batch_size": 50}}, kw={}),
    "stop_mid_epoch_after_change": dict(stops=[47], live={45: {"batch_size": 17}}, kw={}),
    "accumulate_2": dict(stops=[60], live={}, kw={"accumulate": 2}),
    "bf16_on_cpu": dict(stops=[60], live={}, kw={"precision": "bf16"}),
    "resumed_twice": dict(stops=[40, 80], live={30: {"lr": 2e-3}, 70: {"batch_size": 40}}, kw={}),
    # every save lands on a diagnosis tick, which is then put off one step; stop right there
    "saves_on_ticks_high_lr": dict(stops=[60], live={}, kw={"checkpoint_every": 10, "lr": 1.0}),  # alerts at 21, 50, 61
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_in_a_new_process_is_bit_identical(case, tmp_path):
    c = CASES[case]
    ref = uninterrupted(tmp_path / "ref", c["live"], **c["kw"])
    assert ref.step_count == 120

    run_dir = tmp_path / "run"
    live = {str(k): v for k, v in c["live"].items()}
    out = run_worker({"cfg": cfg_for(run_dir, **c["kw"]), "stop_at": c["stops"][0], "live": live})
    assert out == f"stopped {c['stops'][0]}"
    for stop in c["stops"][1:]:
        assert run_worker({"resume": str(run_dir), "stop_at": stop, "live": live}) == f"stopped {stop}"
    assert run_worker({"resume": str(run_dir), "live": live}) == "finished 120"

    resumed = RunDB(run_dir / "run.db", readonly=True).read_steps()
    assert resumed["step"].tolist() == list(range(1, 121))
    assert resumed["train_loss"].tolist() == ref.history["train_loss"].tolist()
    assert resumed["lr"].tolist() == ref.history["lr"].tolist()
    a, b = final_model(tmp_path / "ref"), final_model(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evals = RunDB(run_dir / "run.db", readonly=True).read_evals()
    assert evals["val_loss"].tolist() == ref.evals["val_loss"].tolist()
    alerts = RunDB(run_dir / "run.db", readonly=True).read_events()
    alerts = alerts[alerts["kind"] == "alert"]
    expected = ref.events[ref.events["kind"] == "alert"]
    assert [(d["kind"], s) for d, s in zip(alerts["data"], alerts["step"])] == \
        [(d["kind"], s) for d, s in zip(expected["data"], expected["step"])]


def test_every_sample_once_per_epoch_across_stop_resume_and_batch_changes(tmp_path):
    run_dir, ids_file = tmp_path / "run", tmp_path / "ids.jsonl"
    cfg = cfg_for(run_dir, dataset="wine", batch_size=16, max_steps=40, eval_every=0)
    live = {"5": {"batch_size": 9}, "12": {"batch_size": 31}, "22": {"batch_size": 4}}
    run_worker({"cfg": cfg, "stop_at": 13, "live": live, "ids_file": str(ids_file)})
    run_worker({"resume": str(run_dir), "stop_at": 25, "live": live, "ids_file": str(ids_file)})
    run_worker({"resume": str(run_dir), "live": live, "ids_file": str(ids_file)})
    rows = [r for line in ids_file.read_text().splitlines() for r in json.loads(line)]
    assert [r[0] for r in rows] == list(range(1, 41))
    n = len(Trainer(cfg_for(tmp_path / "probe", dataset="wine")).train_data)
    by_epoch: dict[int, list[int]] = {}
    for _, epoch, ids in rows:
        by_epoch.setdefault(epoch, []).extend(ids)
    last = max(by_epoch)
    for epoch, ids in by_epoch.items():
        assert len(ids) == len(set(ids)), f"epoch {epoch}: a sample was seen twice"
        if epoch != last:
            assert sorted(ids) == list(range(n)), f"epoch {epoch}: a sample was skipped"


def _saved_run(tmp_path: Path, steps=40, every=10) -> Trainer:
    tr = Trainer(cfg_for(tmp_path / "run", max_steps=steps, checkpoint_every=every, keep_checkpoints=10))
    tr.run()
    return tr


def test_truncated_checkpoint_is_refused_and_resume_falls_back(tmp_path):
    tr = _saved_run(tmp_path)
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
    tr = _saved_run(tmp_path, steps=20)
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


def test_shape_mismatch_and_newer_format_are_clear_errors(tmp_path):
    tr = _saved_run(tmp_path, steps=20)
    path = tr.run_dir / "checkpoints" / "step-00000020.pt"
    ckpt = load_checkpoint(path)
    other = torch.nn.Sequential(torch.nn.Linear(64, 7), torch.nn.ReLU(), torch.nn.Linear(7, 10))
    train, val = tr.train_data, tr.val_data
    with pytest.raises(CheckpointError, match=r"step-00000020\.pt.*does not fit.*model"):
        Trainer.from_checkpoint(path, model=other, train_data=train, val_data=val,
                                loss_fn=torch.nn.CrossEntropyLoss())
    ckpt["format_version"] = 99
    newer = tmp_path / "newer.pt"
    atomic_save(ckpt, newer)
    with pytest.raises(CheckpointError, match=r"newer\.pt.*newer workbench \(format 99"):
        load_checkpoint(newer)


def test_atomic_save_leaves_no_partial_file_and_stale_temps_are_removed(tmp_path):
    target = tmp_path / "ck" / "x.pt"

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")
    with pytest.raises(RuntimeError):
        atomic_save({"a": Unsaveable()}, target)
    assert not target.exists() and list(target.parent.iterdir()) == []
    tr = _saved_run(tmp_path, steps=10)
    stale = tr.run_dir / "checkpoints" / ".step-00000010.pt.abc123.tmp"
    stale.write_bytes(b"partial")
    Trainer.from_checkpoint(tr.run_dir)
    assert not stale.exists()


def test_retention_keeps_newest_k_plus_best_k(tmp_path):
    tr = Trainer(cfg_for(tmp_path / "run", max_steps=90, checkpoint_every=10, eval_every=10, keep_checkpoints=2,
                         keep_best=1, lr=2e-2))
    tr.run()
    saved = tr.events[tr.events["kind"] == "checkpoint"]
    latest = {}
    for _, ev in saved.iterrows():
        latest[ev["data"]["path"]] = (ev["step"], ev["data"]["metric"], ev["time"])
    newest = sorted(latest, key=lambda p: (latest[p][0], latest[p][2]))[-2:]
    best = sorted(latest, key=lambda p: (latest[p][1], -latest[p][0]))[:1]
    expected = set(newest) | set(best)
    on_disk = {str(p) for p in (tr.run_dir / "checkpoints").glob("*.pt")}
    assert on_disk == expected
    assert set(tr.checkpoints["path"]) == expected
    # the best one follows the monitored metric
    best_step = int(tr.evals.loc[tr.evals["val_loss"].idxmin(), "step"])
    assert best_step in set(tr.checkpoints["step"])
    manual = tr.save_checkpoint(tag="keepme")
    assert manual.exists() and "keepme" in set(tr.checkpoints["tag"])


def test_save_checkpoint_on_demand_while_running(tmp_path):
    tr = Trainer(cfg_for(tmp_path / "run", max_steps=100_000))
    tr.start()
    while tr.step_count < 5:
        time.sleep(0.01)
    path = tr.save_checkpoint(tag="midway")
    tr.stop()
    tr.join(20)
    assert path.exists() and load_checkpoint(path)["step"] > 0


def test_nan_weights_are_never_saved_and_layer_norms_vouch_only_for_parameters(tmp_path):
    """A periodic save on a layer-statistics step skips checking the parameters whose norms that step
    found finite, and nothing else: a NaN buffer, or NaN parameters, still stop the save."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    tr = Trainer(cfg_for(tmp_path / "run", max_steps=None, checkpoint_every=5, layer_every=5, eval_every=0,
                         on_divergence="ignore"), model=model)
    ckdir = tr.run_dir / "checkpoints"

    def five_steps() -> None:  # and wait for the save at their end (a step request resolves before it)
        target = tr.step_count + 5
        assert tr.step(5).wait(30).status == "applied"
        deadline = time.monotonic() + 30
        while not ((tr.events["step"] == target) & tr.events["kind"].str.startswith("checkpoint")).any():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    tr.start(paused=True)
    five_steps()
    with torch.no_grad():
        model[1].running_var[0] = float("nan")  # a buffer: the training forward does not read it
    five_steps()
    with torch.no_grad():
        model[1].running_var.fill_(1.0)
        model[3].bias[0] = float("nan")  # a parameter: every later loss, grad and update is NaN
    five_steps()
    tr.stop().wait(30)
    tr.join(30)
    skipped = tr.events.query("kind == 'checkpoint_skipped'")["step"].tolist()
    assert skipped == [10, 15, 15]  # the last: the save when the run stops
    assert (ckdir / "step-00000005.pt").exists() and not list(ckdir.glob("step-0000001[05].pt"))
    assert all(torch.isfinite(t).all() for t in load_checkpoint(ckdir / "step-00000005.pt")["state"]["model"].values()
               if t.is_floating_point())


def test_continue_from_a_checkpoint_keeps_the_runs_own_objects_and_waits_for_the_run_to_end(tmp_path):
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    tr = Trainer(dict(max_steps=None, max_epochs=None, batch_size=32, eval_every=0, seed=1, checkpoint_every=10,
                      layer_every=5, run_dir=str(tmp_path / "run"), tensorboard=False),
                 model=model, train_data=TensorDataset(x, y), loss_fn=torch.nn.CrossEntropyLoss())
    tr.start(paused=True)
    assert tr.step(20).wait(30).status == "applied"
    at10 = tr.run_dir / "checkpoints" / "step-00000010.pt"
    with pytest.raises(RuntimeError, match="stop it first"):
        tr.continue_from(at10)
    tr.stop().wait(30)
    tr.join(30)
    new = tr.continue_from(at10)
    assert new.run_dir == tr.run_dir and new.step_count == 10 and new.model is model
    assert new.train_data is tr.train_data and new.loss_fn is tr.loss_fn
    assert torch.equal(model[0].weight, load_checkpoint(at10)["state"]["model"]["0.weight"])
    # the polling reads the views use: the same rows as the DataFrames, without building them
    events = new.events
    assert new.event_count == len(events) and len(new.event_list(2)) == len(events) - 2
    assert [e["kind"] for e in new.event_list(2)] == events["kind"].tolist()[2:]
    cols = tr.layer_columns()
    assert tr.layer_count == len(cols["step"]) == len(tr.layer_history) > 0
    assert [tr.layer_names[int(i)] for i in cols["layer"]] == tr.layer_history["layer"].tolist()


def test_fork_starts_from_parent_weights_with_new_controls(tmp_path):
    parent = _saved_run(tmp_path, steps=40, every=20)
    at20 = parent.run_dir / "checkpoints" / "step-00000020.pt"
    child = parent.fork(checkpoint=at20, run_dir=tmp_path / "child", lr=5e-3)
    weights = load_checkpoint(at20)["state"]["model"]
    assert all(torch.equal(child.model.state_dict()[k], weights[k]) for k in weights)
    assert child.step_count == 20 and child.run_dir == tmp_path / "child"
    assert child.lineage == {"parent_run": str(parent.run_dir), "parent_step": 20, "parent_checkpoint": str(at20)}
    meta = RunDB(child.run_dir / "run.db", readonly=True).meta()
    assert meta["parent_run"] == str(parent.run_dir) and meta["parent_step"] == 20
    child.run()
    h = child.history.set_index("step")
    assert list(h.index) == list(range(1, 41))
    assert h.loc[20, "train_loss"] == parent.history.set_index("step").loc[20, "train_loss"]
    assert h.loc[21, "lr"] == pytest.approx(5e-3) and h.loc[20, "lr"] == pytest.approx(1e-3)
    ev = child.events
    assert ((ev["kind"] == "control") & (ev["step"] == 21)).any()
    assert ((ev["kind"] == "fork") & (ev["step"] == 20)).any()
    # default: fork from the newest checkpoint
    child2 = parent.fork(run_dir=tmp_path / "child2", batch_size=32)
    assert child2.step_count == 40


def test_old_torch_is_refused():
    code = "import torch; torch.__version__ = '2.5.1'; import workbench"
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode != 0 and "CVE-2025-32434" in proc.stderr


def test_config_that_disagrees_with_the_checkpoint_is_reported_field_by_field(tmp_path):
    tr = _saved_run(tmp_path, steps=20)
    given = dict(cfg_for(tr.run_dir, max_steps=20, checkpoint_every=10, keep_checkpoints=10), lr=0.5, batch_size=8)
    with pytest.warns(UserWarning) as record:
        resumed = Trainer.from_checkpoint(tr.run_dir, cfg=given)
    text = " ".join(str(w.message) for w in record)
    assert "lr: checkpoint 0.001, given 0.5" in text and "batch_size: checkpoint 64, given 8" in text
    assert resumed.controls.lr == 1e-3


def test_a_new_trainer_refuses_a_run_dir_that_holds_a_run(tmp_path):
    tr = _saved_run(tmp_path, steps=10)
    with pytest.raises(ValueError, match=r"run_dir: .* already holds a run \(up to step 10\).*from_checkpoint"):
        Trainer(cfg_for(tr.run_dir, max_steps=10))


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
    with pytest.raises(ValueError, match=r"duty: got 0; allowed"):
        Pacer(duty=0)


def test_host_copy_reuses_buffers_and_keeps_tied_weights_tied():
    w = torch.randn(8, 4)
    state = {"model": {"enc": w, "dec": w, "b": torch.zeros(4)}, "opt": [{"m": torch.ones(3)}, 7], "rng": (1, 2)}
    buffers: dict = {}
    first = _host_copy(state, buffers)
    assert first["model"]["enc"] is first["model"]["dec"]  # one buffer, as torch.save would store it
    assert first["model"]["enc"].data_ptr() != w.data_ptr() and torch.equal(first["model"]["enc"], w)
    assert first["opt"][1] == 7 and first["rng"] == (1, 2) and first["model"] is not state["model"]
    w.add_(1)
    second = _host_copy(state, buffers)
    assert second["model"]["enc"] is first["model"]["enc"]  # the same host memory, refreshed
    assert torch.equal(second["model"]["enc"], w) and len(buffers) == 3


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


def test_paced_writer_catches_up_when_a_newer_save_waits(tmp_path):
    """Each waiting save holds a host copy of the state: a writer that is behind stops pausing."""
    from workbench.checkpoint import AsyncWriter

    pacer = Pacer(duty=0.05)
    writer = AsyncWriter(lambda p, e: None, pacer)
    state = {"w": torch.randn(512, 1024)}  # 2 MB: several pieces
    pauses: dict[str, int] = {}
    release = threading.Event()

    def hold(p):  # the first save's callback keeps the writer busy until both others are queued
        release.wait(10)
        pauses["before"] = pacer.pauses
    writer.submit({"x": 1}, tmp_path / "first.pt", hold)
    writer.submit(state, tmp_path / "a.pt", lambda p: pauses.__setitem__("a", pacer.pauses))
    writer.submit(state, tmp_path / "b.pt", lambda p: pauses.__setitem__("b", pacer.pauses))
    release.set()
    deadline = time.monotonic() + 30
    while "b" not in pauses and time.monotonic() < deadline:  # not writer.wait(): that would hurry it
        time.sleep(0.01)
    assert pauses["a"] == pauses["before"]  # b.pt waited behind a.pt: no pauses
    assert pauses["b"] > pauses["a"]  # the last one was paced again
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], state["w"])
