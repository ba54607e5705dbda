"""DistributedDataParallel under torchrun (gloo on the CPU): the sharded sampler, requests broadcast from rank 0,
every rank's weights and RNG, exact resume, parity with one process, two agents, a rank that dies."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]

# One rank of a run: trains (or resumes) and leaves its final weights and record in spec["out"].
RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from workbench import Trainer
    spec = json.loads(sys.argv[1])
    rank = int(os.environ["RANK"])
    out = spec["out"]
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, f"pid{rank}"), "w").write(str(os.getpid()))
    tr = Trainer.from_checkpoint(spec["resume"]) if "resume" in spec else Trainer(spec["cfg"])
    stop_at = spec.get("stop_at")
    if stop_at and rank == 0:
        tr.on("step_end", lambda c: tr.stop() if c.step == stop_at else None)
    tr.start(paused=spec.get("paused", False))
    tr.join()
    torch.save(tr.model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    json.dump({"status": tr.status, "run_dir": str(tr.run_dir), "losses": tr.history["train_loss"].tolist(),
               "events": [{k: e[k] for k in ("step", "kind", "source", "data")} for e in tr.event_list()]},
              open(os.path.join(out, f"rank{rank}.json"), "w"), default=str)
""")


def cfg(run_dir: Path, **kw) -> dict:
    c = dict(dataset="digits", model="mlp", batch_size=8, max_steps=60, max_epochs=None, eval_every=20, seed=5,
             run_dir=str(run_dir), tensorboard=False, layer_every=10)
    c.update(kw)
    return c


def launch(tmp_path: Path, spec: dict, *agent: str) -> subprocess.Popen:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    args = list(agent) or ["--standalone", "--nproc_per_node=2"]
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args, str(script), json.dumps(spec)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun did not end in {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def rank_out(out: Path, rank: int) -> tuple[dict, dict]:
    return torch.load(out / f"rank{rank}.pt", weights_only=True), json.loads((out / f"rank{rank}.json").read_text())


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- in one process
def test_global_batches_are_split_across_ranks_without_loss_or_overlap():
    from workbench.distributed import DistributedMapSource

    data = torch.utils.data.TensorDataset(torch.arange(21.0)[:, None], torch.arange(21))
    ranks = [DistributedMapSource(data, torch.device("cpu"), 3, None, rank=r, world=2, batch_size=4)
             for r in range(2)]
    seen, sizes = [], [3, 5]  # a live batch-size change mid-epoch stays exact
    for b in sizes:
        got = [src.next(b)[1] for src in ranks]
        seen += torch.cat(got).tolist()
    rest = [src.next(4)[1] for src in ranks]  # the epoch's last 5 samples, split 3 + 2
    seen += torch.cat(rest).tolist()
    assert sorted(seen) == list(range(21)) and [len(r) for r in rest] == [3, 2]
    assert all(src.epoch_done for src in ranks)
    assert ranks[0].state_dict()["world"] == 2 and ranks[0].state_dict()["position"] == 21


def test_a_position_saved_by_another_world_size_resumes_at_the_next_epoch():
    from workbench.distributed import DistributedMapSource
    from workbench.loaders import MapSource

    data = torch.utils.data.TensorDataset(torch.zeros(20, 1), torch.zeros(20, dtype=torch.long))
    one = MapSource(data, torch.device("cpu"), 1, None)
    one.next(6)
    two = DistributedMapSource(data, torch.device("cpu"), 1, None, rank=1, world=2, batch_size=3)
    with pytest.warns(UserWarning, match="resumes at the start of epoch 1"):
        two.load_state_dict(one.state_dict())
    assert two.epoch_done and two.next(3)[1].numel() == 3 and two.epoch == 1


def test_a_loader_that_would_give_every_rank_the_same_batches_is_refused():
    from workbench.distributed import Distributed

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 1)), batch_size=2)
    d = Distributed.__new__(Distributed)
    d.rank, d.world = 0, 2
    with pytest.raises(ValueError, match="train_data: under torchrun .* DistributedSampler"):
        d.source(loader, torch.device("cpu"), seed=0, batch_size=2, collate_fn=None, max_epochs=1)


# ---------------------------------------------------------------------------- under torchrun
@pytest.mark.slow
def test_two_ranks_apply_a_posted_control_at_the_same_step_and_end_with_identical_weights(tmp_path):
    from workbench.runview import RunView

    run_dir, out = tmp_path / "run", tmp_path / "out"
    proc = launch(tmp_path, {"cfg": cfg(run_dir), "out": str(out), "paused": True})
    try:
        view = wait_for(lambda: (run_dir / "run.db").exists() and RunView(run_dir), timeout=240)
        wait_for(lambda: view.refresh() is not None and view.status == "paused", timeout=240)
        assert view.wait(view.command("step", n=25), timeout=120)["status"] == "applied"
        assert view.wait(view.set(lr=3e-3), timeout=60)["status"] == "applied"
        view.wait(view.command("resume"), timeout=60)
        view.close()
    finally:
        finish(proc)
    (w0, r0), (w1, r1) = rank_out(out, 0), rank_out(out, 1)
    assert r0["status"] == r1["status"] == "finished"
    assert same_weights(w0, w1)

    def controls(r):
        return [(e["step"], e["data"]["field"], e["data"]["new"]) for e in r["events"] if e["kind"] == "control"]
    assert controls(r0) == controls(r1) == [(26, "lr", 3e-3)]
    assert r0["losses"] == r1["losses"]  # every rank logs the loss averaged over ranks
    assert not Path(r1["run_dir"]).exists()  # rank 1's private folder is gone; only rank 0 wrote a run


@pytest.mark.slow
def test_stop_and_resume_on_two_ranks_equals_never_stopping_and_matches_one_process_with_twice_the_batch(tmp_path):
    from workbench import Trainer

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    finish(launch(tmp_path, {"cfg": cfg(straight / "run"), "out": str(straight)}))
    finish(launch(tmp_path, {"cfg": cfg(stopped / "run", checkpoint_every=25), "out": str(stopped / "a"),
                             "stop_at": 30}))
    assert rank_out(stopped / "a", 0)[1]["status"] == "stopped"
    finish(launch(tmp_path, {"resume": str(stopped / "run"), "out": str(stopped / "b")}))
    for rank in (0, 1):
        (wa, ra), (wb, rb) = rank_out(straight, rank), rank_out(stopped / "b", rank)
        assert rb["status"] == "finished"
        assert same_weights(wa, wb), rank
    assert rank_out(stopped / "b", 0)[1]["losses"] == rank_out(straight, 0)[1]["losses"]

    # the same data order by construction: one process with the global batch (2 x 8) takes the same steps
    one = Trainer(cfg(tmp_path / "one", batch_size=16, max_steps=50)).run()
    two = rank_out(straight, 0)[1]["losses"][:50]
    assert torch.allclose(torch.tensor(two), torch.tensor(one.history["train_loss"].tolist()), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_torchrun_agents_on_one_machine_train_one_run(tmp_path):
    from workbench.rundir import RunDB

    run_dir, out = tmp_path / "run", tmp_path / "out"
    port = free_port()
    agent = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
             "--rdzv_id=two-agents"]
    procs = [launch(tmp_path, {"cfg": cfg(run_dir, max_steps=30), "out": str(out)}, *agent) for _ in range(2)]
    for p in procs:
        finish(p)
    (w0, r0), (w1, r1) = rank_out(out, 0), rank_out(out, 1)
    assert r0["status"] == r1["status"] == "finished" and same_weights(w0, w1)
    db = RunDB(run_dir / "run.db", readonly=True)
    try:
        assert db.last_step() == 30 and db.meta()["world_size"] == 2
    finally:
        db.close()


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_run_as_failed_with_the_cause_in_the_event_log(tmp_path):
    from workbench.rundir import RunDB

    run_dir, out = tmp_path / "run", tmp_path / "out"
    proc = launch(tmp_path, {"cfg": cfg(run_dir, max_steps=None, eval_every=0), "out": str(out)})
    try:
        def steps() -> int:
            if not (run_dir / "run.db").exists():
                return 0
            db = RunDB(run_dir / "run.db", readonly=True)
            try:
                return db.last_step() or 0
            finally:
                db.close()
        wait_for(lambda: steps() > 20 and (out / "pid1").exists(), timeout=240)
        os.kill(int((out / "pid1").read_text()), signal.SIGKILL)
        killed = time.monotonic()

        def status() -> str:
            db = RunDB(run_dir / "run.db", readonly=True)
            try:
                return db.meta().get("status")
            finally:
                db.close()
        # the bound: a dead peer's closed socket fails rank 0's next collective; a hung one, the timeout (60 s)
        wait_for(lambda: status() == "failed", timeout=60)
        print(f"rank 0 recorded the failure {time.monotonic() - killed:.1f} s after rank 1 was killed")
        db = RunDB(run_dir / "run.db", readonly=True)
        try:
            errors = db.read_events().query("kind == 'error'")
        finally:
            db.close()
        assert len(errors) == 1 and "Connection" in str(errors.iloc[0]["data"])
    finally:
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
