"""workbench.finders: the LR range test and the batch-size finder.

* lr_find suggests an lr within 3x of the best of a grid of fresh runs; it leaves the run bit-identical
  (weights, optimizer state, RNG, sampler position), is refused while the run is running, and checks its
  arguments; its suggestion rules (valley, steepest, min/10) on a synthetic curve.
* Out-of-memory errors are recognised; the decorator halves the batch on OOM, stops at the first success,
  gives up at zero and lets other errors through.
* find_batch_size follows the memory budget on the CPU (capped at the training set), leaves the run as it
  was, and says when even a batch of 1 does not fit; the step's memory account grows linearly with the batch.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from workbench import Trainer
from workbench.checkpoint import RNGState
from workbench.finders import (LRFindResult, find_executable_batch_size, is_oom_error, measure_step_memory,
                               steepest_index, suggest_lr, valley_index)

from conftest import make_mlp, wait_for

GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def digits_kw(runs_root, **extra):
    kw = dict(dataset="digits", model="mlp", optimizer="adam", batch_size=64, seed=0, runs_root=str(runs_root),
              tensorboard=False, eval_every=0, max_epochs=None, layer_every=0, keep_best=0)
    kw.update(extra)
    return kw


def rng_equal(a: dict, b: dict) -> bool:
    return (a["python"][0::2] == b["python"][0::2] and torch.equal(a["python"][1], b["python"][1])
            and a["numpy"][0] == b["numpy"][0] and torch.equal(a["numpy"][1], b["numpy"][1])
            and a["numpy"][2:] == b["numpy"][2:] and torch.equal(a["torch"], b["torch"])
            and len(a["cuda"]) == len(b["cuda"]) and all(torch.equal(x, y) for x, y in zip(a["cuda"], b["cuda"])))


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[tuple[int, str, torch.Tensor]]:
    return [(k, name, v.detach().clone()) for k, s in opt.state_dict()["state"].items() for name, v in s.items()
            if isinstance(v, torch.Tensor)]


# ------------------------------------------------------------------ LR range test
def test_lr_find_suggestion_is_within_3x_of_the_grid_best(runs_root):
    """Acceptance: digits/mlp/Adam, the suggestion vs the best constant LR of a 6-point grid of fresh runs.

    Every grid run has the same seed (same init, same data order) and trains 200 steps (~9 epochs); the
    best LR is the one with the lowest val loss at the end.
    """
    tr = Trainer(max_steps=200, **digits_kw(runs_root))
    before = [p.detach().clone() for p in tr.model.parameters()]
    res = tr.lr_find()
    assert isinstance(res, LRFindResult)
    assert all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))   # weights unchanged
    bound = res.lrs[int(np.argmin(res.losses))] / 10     # Smith's cap: a tenth of the LR at the minimum
    assert res.suggestion == min(res.valley, bound) and res.method == ("valley" if res.valley <= bound else "min/10")
    assert len(res.lrs) == len(res.losses) == len(res.raw_losses) >= 50
    assert all(b > a for a, b in zip(res.lrs, res.lrs[1:]))                      # an exponential sweep
    frame = res.to_frame()
    assert list(frame.columns) == ["lr", "loss", "raw_loss"] and len(frame) == len(res.lrs)

    val = {}
    for lr in GRID:
        run = Trainer(max_steps=200, lr=lr, **digits_kw(runs_root))
        run.run()
        val[lr] = run.last_eval["val_loss"]
    best = min(val, key=val.get)
    ratio = max(res.suggestion / best, best / res.suggestion)
    assert ratio <= 3.0, f"suggested {res.suggestion:.3g}, grid best {best:g} ({val})"

    ev = tr.events
    row = ev[ev["kind"] == "lr_find"].iloc[-1]
    assert row["source"] == "api" and row["data"]["suggestion"] == res.suggestion
    assert row["data"]["method"] == res.method and row["data"]["num_points"] == len(res.lrs)


def test_lr_find_leaves_the_run_bit_identical(runs_root):
    """Weights, optimizer state and RNG untouched; a run continued after lr_find equals one that never ran it.

    The model has dropout, so the sweep's copy draws from the global torch RNG: without the RNG restore
    the continued run's losses would differ.
    """
    kw = digits_kw(runs_root, max_steps=30, model_options={"dropout": 0.2})
    a = Trainer(**kw).start(paused=True)
    a.step(5).wait(30)
    assert a.status == "paused" and a.step_count == 5
    params = [p.detach().clone() for p in a.model.parameters()]
    opt_state = optimizer_tensors(a.optimizer)
    assert opt_state                                   # Adam moments exist after 5 steps
    rng_before = RNGState().state_dict()
    res = a.lr_find(num_steps=60)
    assert rng_equal(rng_before, RNGState().state_dict())
    assert all(torch.equal(x, y) for x, y in zip(params, a.model.parameters()))
    after = optimizer_tensors(a.optimizer)
    assert [(k, n) for k, n, _ in after] == [(k, n) for k, n, _ in opt_state]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(opt_state, after))
    assert a.sampler.position == 5 * 64 and a.sampler.epoch == 0
    assert np.isfinite(res.suggestion) and res.lrs[0] == pytest.approx(1e-7)
    a.resume()
    assert a.join(60) == "finished"

    b = Trainer(**kw).run()
    assert a.history["train_loss"].tolist() == b.history["train_loss"].tolist()
    assert len(b.history) == 30
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(x, y)


def test_lr_find_is_refused_while_running(runs_root):
    tr = Trainer(**digits_kw(runs_root, max_steps=100_000))
    tr.start()
    try:
        wait_for(lambda: tr.status == "running")
        with pytest.raises(RuntimeError, match=r"pause\(\) it first.*'running'|'running'.*pause\(\) it first"):
            tr.lr_find()
        with pytest.raises(RuntimeError, match="pause"):
            tr.find_batch_size()
    finally:
        tr.stop()
        tr.join(60)
    assert tr.status == "stopped"
    assert tr.lr_find(num_steps=20).lrs                 # allowed once the run has ended


def test_lr_find_rejects_bad_arguments(runs_root):
    tr = Trainer(**digits_kw(runs_root, max_steps=10))
    with pytest.raises(ValueError, match=r"end_lr: got 1e-08.*start_lr"):
        tr.lr_find(end_lr=1e-8)
    with pytest.raises(ValueError, match=r"smooth: got 1\.0; allowed"):
        tr.lr_find(smooth=1.0)
    with pytest.raises(ValueError, match=r"num_steps: got 2; allowed"):
        tr.lr_find(num_steps=2)
    with pytest.raises(ValueError, match=r"batch_size: got 100000; allowed"):
        tr.lr_find(batch_size=100_000)
    with pytest.raises(ValueError, match="source"):
        tr.lr_find(source="nowhere")


def test_suggestion_rules_on_a_synthetic_curve():
    """A plateau, a descent from 1e-4 to 1e-2, then divergence: valley halfway, steepest inside the descent;
    the suggestion is the valley unless a tenth of the minimum's LR is lower."""
    lrs = list(np.logspace(-7, 1, 81))
    log = np.log10(lrs)
    rng = np.random.default_rng(0)
    loss = np.where(log < -4, 2.3, np.where(log < -2, 2.3 - 1.0 * (log + 4), 0.3 + 3 * (log + 2) ** 2))
    loss = list(loss + rng.normal(0, 1e-3, len(loss)))
    pick, start, end = valley_index(loss)
    assert 1e-4 <= lrs[start] <= 2e-4 and 8e-3 <= lrs[end] <= 1.3e-2      # the plateau's noise is cut off
    assert 7e-4 <= lrs[pick] <= 1.5e-3                                      # halfway in log-LR
    assert 1e-4 <= lrs[steepest_index(lrs, loss)] <= 1e-2
    bound = lrs[int(np.argmin(loss))] / 10
    assert suggest_lr(lrs, loss)[:2] == ((lrs[pick], "valley") if lrs[pick] <= bound else (bound, "min/10"))
    # a short, steep valley right under the minimum (1e-2 to 1e-1) is capped at a tenth of the minimum's LR
    late = list(np.where(log < -2, 2.3, np.where(log < -1, 2.3 - 1.5 * (log + 2), 0.8 + 3 * (log + 1) ** 2))
                + rng.normal(0, 1e-3, len(lrs)))
    assert suggest_lr(lrs, late)[1] == "min/10" and suggest_lr(lrs, late)[0] == pytest.approx(
        lrs[int(np.argmin(late))] / 10)
    # too short for a valley or a derivative: a tenth of the LR at the minimum
    assert suggest_lr([1e-3, 1e-2], [2.0, 1.0]) == (1e-3, "min/10", None, None)
    # a rising curve has no valley: steepest descent, then min/10
    assert suggest_lr(list(lrs[:10]), [1.0 + i for i in range(10)])[1] == "min/10"


# ------------------------------------------------------------------ OOM handling
def test_oom_errors_are_recognised_and_others_are_not():
    assert is_oom_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom_error(RuntimeError("CUDA error: out of memory"))
    assert is_oom_error(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                     "memory: you tried to allocate 1000 bytes"))
    assert is_oom_error(MemoryError())
    assert not is_oom_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom_error(ValueError("out of memory"))


def test_decorator_halves_on_oom_and_stops_at_the_first_success():
    calls = []

    def step(batch_size: int, scale: int) -> int:
        calls.append(batch_size)
        if batch_size > 20:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return batch_size * scale

    run = find_executable_batch_size(step, 128)
    assert run(10) == 160
    assert calls == [128, 64, 32, 16] and run.batch_size == 16

    calls.clear()

    @find_executable_batch_size(starting_batch_size=8)
    def fits(batch_size: int) -> int:
        calls.append(batch_size)
        return batch_size

    assert fits() == 8 and calls == [8]                 # no OOM: one call, the starting size


def test_decorator_gives_up_at_zero_and_lets_other_errors_through():
    calls = []

    def never(batch_size: int) -> None:
        calls.append(batch_size)
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="reached 0"):
        find_executable_batch_size(never, 6)()
    assert calls == [6, 3, 1]

    def broken(batch_size: int) -> None:
        calls.append(batch_size)
        raise ValueError("a bug, not an OOM")

    calls.clear()
    with pytest.raises(ValueError, match="a bug"):
        find_executable_batch_size(broken, 64)()
    assert calls == [64]
    with pytest.raises(ValueError, match=r"starting_batch_size: got 0; allowed"):
        find_executable_batch_size(broken, 0)


# ------------------------------------------------------------------ batch-size finder
def test_find_batch_size_on_cpu_follows_the_memory_budget(runs_root):
    tr = Trainer(**digits_kw(runs_root, max_steps=10, batch_size=16))
    n = len(tr.train_data)
    params = [p.detach().clone() for p in tr.model.parameters()]
    rng_before = RNGState().state_dict()

    large = tr.find_batch_size(memory_budget_mb=10_000)
    assert large == n                                   # everything fits: capped at the training set's size
    small = tr.find_batch_size(memory_budget_mb=0.25)
    assert 16 <= small < large and small & (small - 1) == 0   # 16 * 2^k
    assert tr.find_batch_size() <= n                    # default budget: a quarter of the available RAM
    halved = tr.find_batch_size(start=4096, memory_budget_mb=0.25)   # n, n // 2, ...: halves down to a fit
    assert small // 2 <= halved < 2 * small
    assert tr.find_batch_size(max_batch=100, memory_budget_mb=10_000) == 100

    assert rng_equal(rng_before, RNGState().state_dict())
    assert all(torch.equal(a, b) for a, b in zip(params, tr.model.parameters()))
    assert tr.controls.batch_size == 16 and tr.sampler.position == 0
    ev = tr.events
    rows = ev[ev["kind"] == "batch_size_find"]
    assert [r["batch_size"] for r in rows["data"]][:2] == [large, small]

    with pytest.raises(ValueError, match=rf"max_batch: got {n + 1}; allowed"):
        tr.find_batch_size(max_batch=n + 1)
    with pytest.raises(RuntimeError, match="even batch size 1 does not fit"):
        tr.find_batch_size(memory_budget_mb=0.01)      # below the parameters + Adam state alone


def test_step_memory_account_grows_linearly_with_the_batch():
    model = make_mlp(0)
    opt = torch.optim.Adam(model.parameters())
    params = list(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    n_params = sum(p.numel() for p in params)

    def account(b: int):
        x, y = torch.randn(b, 8), torch.randint(0, 3, (b,))
        return measure_step_memory(model, opt, torch.nn.functional.cross_entropy, (x, y), params=params,
                                   device_type="cpu", amp_dtype=None, scaler=scaler, grad_clip=None)

    m10, m20, m30 = account(10), account(20), account(30)
    assert m10.params == m10.grads == 4 * n_params
    assert m10.optimizer_state >= 2 * 4 * n_params       # Adam's two moments
    assert m10.batch == 10 * 8 * 4 + 10 * 8
    per_10 = m20.activations - m10.activations
    assert per_10 == 10 * (32 + 3) * 4   # per sample: ReLU's output (also Linear 2's saved input, counted once), log-softmax
    assert m30.activations - m20.activations == per_10   # linear in the batch size
    assert m30.total - m20.total == m20.total - m10.total > 0
    model_copy = copy.deepcopy(model)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_copy.parameters()))
