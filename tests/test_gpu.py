"""The CUDA paths, on a GPU: exact resume, the zero-sync rule, fp16 with a GradScaler, the checkpoint's
device-to-host copy, the device-side good-state ring, pinned non-blocking batch copies.

Marked ``gpu`` and skipped where CUDA is absent; bench/gpu_check.sh runs them on a lent GPU.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from workbench import Trainer
from workbench.checkpoint import load_checkpoint
from workbench.rundir import RunDB
from workbench.sampler import BatchFetcher

from conftest import PYTHON, ROOT, WORKER, cfg_for, final_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")]

DETERMINISTIC = "import torch; torch.use_deterministic_algorithms(True)\n"


def _worker(spec: dict) -> str:
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # cuBLAS's deterministic mode needs it
    proc = subprocess.run([PYTHON, "-c", DETERMINISTIC + WORKER, json.dumps(spec)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


@pytest.mark.parametrize("kw, live", [({}, {}), ({"precision": "bf16"}, {"30": {"lr": 3e-3, "batch_size": 50}}),
                                      ({"precision": "fp16"}, {})])
def test_exact_resume_on_the_gpu(kw, live, tmp_path):
    """Deterministic algorithms on: a run stopped at 60 and resumed in a new process ends bit-identical to
    one that never stopped (weights, losses, lr), on the same device."""
    kw = {"device": "cuda", **kw}
    assert _worker({"cfg": cfg_for(tmp_path / "ref", **kw), "live": live}) == "finished 120"
    assert _worker({"cfg": cfg_for(tmp_path / "run", **kw), "stop_at": 60, "live": live}) == "stopped 60"
    assert _worker({"resume": str(tmp_path / "run"), "live": live}) == "finished 120"
    ref, run = (RunDB(tmp_path / d / "run.db", readonly=True).read_steps() for d in ("ref", "run"))
    assert run["train_loss"].tolist() == ref["train_loss"].tolist() and run["lr"].tolist() == ref["lr"].tolist()
    a, b = final_model(tmp_path / "ref"), final_model(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_no_host_sync_between_read_backs(precision, runs_root):
    sys.path.insert(0, str(ROOT / "bench"))
    from _common import host_syncs

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(4096, 256), torch.randn(4096, 256))
    net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
    tr = Trainer(model=net, train_data=data, loss_fn=torch.nn.MSELoss(), device="cuda", precision=precision,
                 batch_size=256, sync_every=10, max_steps=None, max_epochs=None, eval_every=0, seed=0,
                 runs_root=str(runs_root), tensorboard=False)
    tr.start(paused=True)
    tr.step(20).wait(120)
    got = host_syncs(tr, 60)
    tr.stop().wait(60)
    tr.join()
    assert got["read_back_syncs"] > 0, "the debug mode saw no sync at all: the count means nothing"
    assert got["other_syncs"] == 0, got["other_sites"]


def test_fp16_with_a_grad_scaler_trains_and_switches_live(runs_root):
    tr = Trainer(dataset="digits", model="mlp", device="cuda", precision="fp32", max_steps=200, max_epochs=None,
                 seed=0, runs_root=str(runs_root), tensorboard=False)
    tr.start(paused=True)
    tr.step(50).wait(60)
    assert tr.set(precision="fp16").wait(60).status == "applied"
    tr.resume()
    assert tr.join(120) == "finished"
    h = tr.history
    assert set(h.loc[h["step"] > 50, "precision"]) == {"fp16"}
    assert np.isfinite(h["train_loss"].iloc[-20:]).all()
    assert h["train_loss"].iloc[-20:].mean() < h["train_loss"].iloc[:20].mean()
    scaler = load_checkpoint(tr.checkpoints["path"].iloc[-1])["state"]["scaler"]
    assert scaler["enabled"] and scaler["state"]["scale"] > 0


def test_checkpoint_copies_the_device_state_exactly(runs_root):
    tr = Trainer(dataset="digits", model="mlp", device="cuda", max_steps=None, max_epochs=None, seed=0,
                 checkpoint_every=20, runs_root=str(runs_root), tensorboard=False)
    tr.start(paused=True)
    tr.step(40).wait(60)     # two periodic saves: the second copies into the first one's host buffers
    path = tr.save_checkpoint(tag="probe")
    state = load_checkpoint(path)["state"]
    for name, t in tr.model.state_dict().items():
        assert torch.equal(state["model"][name], t.cpu()), name
    opt = tr.optimizer.state_dict()["state"]
    for i, s in opt.items():
        assert torch.equal(state["optimizer"]["state"][i]["exp_avg"], s["exp_avg"].cpu())
    tr.stop().wait(60)
    tr.join()


def test_good_state_ring_on_the_device_rolls_back(runs_root):
    tr = Trainer(dataset="digits", model="mlp", device="cuda", optimizer="sgd", lr=0.05, momentum=0.9,
                 max_steps=400, max_epochs=None, on_divergence="rollback", good_state_every=25, eval_every=50,
                 seed=0, runs_root=str(runs_root), tensorboard=False)
    tr.on("step_end", lambda ctx: tr.set(lr=5.0) if ctx.step == 150 else None)
    tr.run()
    assert tr.status == "finished"
    ev = tr.events
    assert (ev["kind"] == "rollback").any()
    assert math.isfinite(float(tr.history["train_loss"].iloc[-20:].median()))


def test_pinned_non_blocking_batches_equal_the_cpu_gather():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(1000, 16, generator=g), torch.randint(0, 3, (1000,), generator=g))
    idx = torch.randperm(1000, generator=g)[:128]
    x, y = BatchFetcher(data, torch.device("cuda")).fetch(idx)
    assert x.is_cuda and y.is_cuda
    assert torch.equal(x.cpu(), data.tensors[0][idx]) and torch.equal(y.cpu(), data.tensors[1][idx])
