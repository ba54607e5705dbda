"""Finders that run beside a training run without touching it: the LR range test and a batch-size finder.

Both work on throw-away copies: a deep copy of the model, a fresh optimizer of the same kind loaded with
a copy of the real optimizer's state, batches drawn with their own ``torch.Generator`` (never the run's
sampler), and the global RNG states (python, numpy, torch CPU/CUDA) snapshotted before and restored
after, so a dropout layer in the copy does not shift the real run's random stream. A run that calls a
finder while paused continues bit-identically to one that never did.

* ``lr_find``: Smith's LR range test ("Cyclical Learning Rates for Training Neural Networks", 2017) as
  popularised by fastai: an exponential LR sweep, one optimizer step per LR, an EMA-smoothed loss, stop
  at divergence; the suggestion is fastai's "valley" rule, capped at a tenth of the LR at the minimum
  (Smith's rule), with a steepest-descent fallback.
* ``find_batch_size``: double the batch while one step fits (no out-of-memory error, and the step's
  memory within a budget), halving on an OOM like accelerate's ``find_executable_batch_size``.
"""
from __future__ import annotations

import functools
import gc
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, IterableDataset

from .checkpoint import RNGState
from .config import check_int, check_number
from .requests import check_source
from .batches import StepContract, tensors_in, to_device
from . import cputhreads
from .optim import copy_training
from .step import AMP_DTYPES, train_step


IDLE_STATUSES = ("idle", "paused", "finished", "stopped")


class Trainer(Protocol):
    """What the finders read of a run (``workbench.Trainer``'s public surface)."""

    status: str
    is_stepping: bool
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    contract: Any
    source: Any
    train_data: Any
    device: torch.device
    controls: Any
    cfg: Any

    def log_event(self, kind: str, source: str, data: Any = None, step: int | None = None) -> None: ...
DEFAULT_BUDGET_FRACTION = 0.25   # of the available RAM, for find_batch_size on CPU


# ===================================================================== shared: guard, copies, RNG
def _check_not_running(trainer: "Trainer", what: str) -> None:
    """A finder reads the model and the global RNG: refuse while the loop may be running a step."""
    status = trainer.status
    if status == "running" or trainer.is_stepping:
        raise RuntimeError(f"{what}: the run is running (status {status!r}); pause() it first and wait until "
                           f"it is paused (allowed statuses: {', '.join(IDLE_STATUSES)})")
    if status not in IDLE_STATUSES:
        raise RuntimeError(f"{what}: got a run with status {status!r}; allowed: {', '.join(IDLE_STATUSES)}")


def _copy_training_objects(trainer: "Trainer") -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                                        list[torch.nn.Parameter]]:
    """Copies of the model and of its optimizer with the same class, groups, hyper-parameters and state."""
    model, optimizer, _ = copy_training(trainer.model, trainer.optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    return model, optimizer, params


class _Batches:
    """Training batches for a finder, never from the run's own sampler or loader: a map-style Dataset's
    samples drawn by a private generator (any batch size), or a fresh pass over a loader's data set in the
    loader's own batch size (a stream moves on; a finder's batches are its own)."""

    def __init__(self, trainer: "Trainer", seed: int) -> None:
        src = trainer.source
        self.fetcher = getattr(src, "fetcher", None)
        self.fixed = None if self.fetcher is not None else src.batch_size_fixed
        if self.fetcher is not None:
            self.stream = _IndexStream(len(self.fetcher), seed)
        else:
            loader = src.loader
            data = loader.dataset
            self.loader = DataLoader(data, batch_size=loader.batch_size, collate_fn=loader.collate_fn,
                                     shuffle=not isinstance(data, IterableDataset),
                                     generator=torch.Generator().manual_seed(seed))
            self.batch_size = loader.batch_size
            self._it = iter(self.loader)
        self.device = trainer.device

    def check(self, batch_size: int, what: str) -> None:
        if self.fixed is not None and batch_size != self.batch_size:
            raise ValueError(f"{what}: got batch_size {batch_size}, but {self.fixed}; allowed: "
                             f"{self.batch_size}")

    def take(self, k: int) -> Any:
        if self.fetcher is not None:
            return self.fetcher.fetch(self.stream.take(k))
        try:
            batch = next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            batch = next(self._it)
        return to_device(batch, self.device, self.device.type == "cuda")


def _use_trainer_threads(trainer: "Trainer", batch_size: int) -> int:
    """On a CPU, run the finder with the intra-op thread count the run's loop would choose for this batch
    size (workbench.cputhreads); returns the caller's count, to be set back."""
    before = torch.get_num_threads()
    if trainer.device.type == "cpu":
        n_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        torch.set_num_threads(cputhreads.choose_threads(trainer.cfg.cpu_threads, n_params, batch_size, before)[0])
    return before


def _generator_seed(trainer: "Trainer", seed: int | None) -> int:
    if seed is not None:
        return check_int("seed", seed, minimum=0)
    return int(trainer.cfg.seed or 0) + 7919  # its own stream; never the sampler's (which uses cfg.seed)


class _IndexStream:
    """Random index batches from its own generator: shuffled passes over range(n), wrapping at the end."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.gen)
        self.pos = 0

    def take(self, k: int) -> torch.Tensor:
        parts, need = [], k
        while need > 0:
            if self.pos >= self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
            part = self.perm[self.pos:self.pos + need]
            self.pos += len(part)
            need -= len(part)
            parts.append(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# ===================================================================== LR range test
@dataclass
class LRFindResult:
    """The outcome of an LR range test: the curve and the suggested LR (with the rule that gave it)."""

    lrs: list[float]
    losses: list[float]            # EMA-smoothed, bias-corrected
    raw_losses: list[float]
    suggestion: float
    steepest: float | None         # LR of the steepest descent of the smoothed loss (None: too few points)
    valley: float | None           # LR from the valley rule (None: no usable valley)
    method: str                    # "valley", "steepest" or "min/10": the rule behind ``suggestion``
    stopped_early: bool = False    # the sweep ended at divergence (or a non-finite loss) before end_lr
    details: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One row per sweep step: lr, loss (smoothed), raw_loss."""
        return pd.DataFrame({"lr": self.lrs, "loss": self.losses, "raw_loss": self.raw_losses})


def valley_index(losses: Sequence[float], knee: float = 0.1, min_span: int = 5) -> tuple[int, int, int] | None:
    """The valley rule (a variant of fastai's ``valley``): (pick, start, end) indices, or None.

    1. The valley is the longest decreasing subsequence of the smoothed loss: the longest stretch of
       the sweep over which the loss keeps going down, small bumps allowed. It ends at (or near) the
       curve's minimum, past which the LR is too large to train stably.
    2. Its flat head is cut off: on a noisy plateau at tiny LRs the subsequence also collects points
       that "descend" by noise alone. fastai sidesteps this implicitly (it measures the valley by its
       number of points back from the end); here it is explicit: the valley starts at the first member
       whose loss has fallen by ``knee`` (10%) of the valley's total drop, where real progress begins.
    3. The pick is halfway along that stretch (in index, i.e. in log-LR, since the sweep is exponential):
       a clear margin below the minimum, well above the plateau.

    Chosen on 16 sweeps (digits mlp/cnn/logreg, breast_cancer, wine, spirals, moons; Adam and SGD; two
    seeds each) against a 9-point grid of 200-step runs (best = lowest final val loss): within 3x of the
    grid's best on 9 of 16, mean |log10(suggested/best)| 0.65; fastai's original 3/16 and 1.01, no knee
    cut 0/16 and 2.00, minimum/10 9/16 and 0.69, steepest descent (``steepest_index``) 7/16 and 0.63.
    None when the cut valley spans fewer than ``min_span`` points, so the caller can fall back.
    """
    n = len(losses)
    if n < 2:
        return None
    length = [1] * n
    first = list(range(n))      # where the longest decreasing subsequence ending at i starts
    prev = [-1] * n             # its previous member
    for i in range(1, n):
        for j in range(i):
            # longer wins; on a tie prefer the earlier start (the wider valley)
            if losses[i] < losses[j] and (length[j] + 1 > length[i]
                                          or (length[j] + 1 == length[i] and first[j] < first[i])):
                length[i], first[i], prev[i] = length[j] + 1, first[j], j
    end = max(range(n), key=lambda i: (length[i], i - first[i], -i))  # longest, then widest, then earliest
    members = [end]
    while prev[members[-1]] >= 0:
        members.append(prev[members[-1]])
    members.reverse()
    top, bottom = losses[members[0]], losses[end]
    threshold = top - knee * (top - bottom)
    start = next(i for i in members if losses[i] <= threshold)
    if end - start + 1 < min_span:
        return None
    return start + (end - start) // 2, start, end


def steepest_index(lrs: Sequence[float], losses: Sequence[float]) -> int | None:
    """The steepest-descent rule (Smith 2017; fastai's ``steep``): argmin of d(loss)/d(log10 lr).

    Searched only up to the minimum of the smoothed loss (past it the curve is diverging, and a
    smoothed spike falling back can look steep), skipping the first tenth of the points (at least
    one), dominated by the EMA's warm-up. None when fewer than 3 points remain.
    """
    n = len(losses)
    if n < 3:
        return None
    grad = np.gradient(np.asarray(losses, dtype=float), np.log10(np.asarray(lrs, dtype=float)))
    lo, hi = max(1, n // 10), int(np.argmin(losses)) + 1
    if hi - lo < 3:
        return None
    return lo + int(np.argmin(grad[lo:hi]))


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float, str, float | None, float | None]:
    """(suggestion, method, steepest, valley) for a smoothed loss-vs-LR curve.

    The valley rule (``valley_index``) is preferred: it reads the whole descent rather than one noisy
    derivative and lands between "too small to move" and "about to diverge" (fastai made its valley rule
    the default in 2021 for that reason) — but never above a tenth of the LR at the minimum loss (Smith's
    rule of thumb), which then is the suggestion ("min/10"). The cap matters for adaptive optimizers: a
    sweep of one step per LR reads how fast the loss falls in the first hundred steps, and Adam's early
    descent is steepest close to the LR where longer training turns unstable (digits MLP, Adam, 300 steps:
    the valley's 1.5e-2 to 1.8e-2 ends at val loss 0.15-0.36, a tenth of the minimum's LR, 5e-3 to 8e-3,
    at 0.07-0.12, the best of an 8-point grid give or take 10%). Steepest descent (``steepest_index``) is
    the fallback when the curve has no valley of at least 5 points; the last resort, on a sweep too short
    for either (e.g. one that diverged at once), is min/10 again.
    """
    if not lrs:
        raise ValueError("lr_find: got an empty curve (0 points); allowed: at least 1 point")
    v = valley_index(losses)
    s = steepest_index(lrs, losses)
    valley = float(lrs[v[0]]) if v is not None else None
    steepest = float(lrs[s]) if s is not None else None
    bound = float(lrs[int(np.argmin(losses))]) / 10.0
    if valley is not None:
        return (valley, "valley", steepest, valley) if valley <= bound else (bound, "min/10", steepest, valley)
    if steepest is not None:
        return steepest, "steepest", steepest, valley
    return bound, "min/10", steepest, valley


def lr_find(trainer: "Trainer", *, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
            smooth: float = 0.98, diverge_factor: float | None = 4.0, batch_size: int | None = None,
            seed: int | None = None, source: str = "api") -> LRFindResult:
    """LR range test on copies of the model and optimizer; the run's own state is left untouched.

    The LR grows exponentially from ``start_lr`` to ``end_lr`` over ``num_steps`` optimizer steps (one
    step per LR, on batches of ``batch_size`` (default: the run's current) drawn with a private
    generator, ``accumulate`` micro-batches each, under the run's precision and grad clipping). The loss
    is smoothed with a bias-corrected EMA (``smooth`` is its beta); the sweep stops when the smoothed
    loss exceeds ``diverge_factor`` times its best so far (None: never) or the loss is not finite.
    Only while the run is not running a step: status idle, paused, finished or stopped.
    """
    source = check_source(source)
    _check_not_running(trainer, "lr_find")
    start_lr = check_number("start_lr", start_lr, positive=True)
    end_lr = check_number("end_lr", end_lr, positive=True)
    if end_lr <= start_lr:
        raise ValueError(f"end_lr: got {end_lr!r}; allowed: a number > start_lr ({start_lr!r})")
    num_steps = check_int("num_steps", num_steps, minimum=5)
    smooth = check_number("smooth", smooth, minimum=0.0)
    if smooth >= 1.0:
        raise ValueError(f"smooth: got {smooth!r}; allowed: a number >= 0 and < 1 (the EMA's beta)")
    diverge_factor = check_number("diverge_factor", diverge_factor, minimum=1.0, allow_none=True)
    c = trainer.controls
    batch_size = check_int("batch_size", c.batch_size if batch_size is None else batch_size, minimum=1,
                           maximum=getattr(trainer.facts, "n_train", None))
    batches = _Batches(trainer, _generator_seed(trainer, seed))
    batches.check(batch_size, "lr_find")

    rng = RNGState()
    saved_rng = rng.state_dict()
    threads = _use_trainer_threads(trainer, batch_size)
    lrs: list[float] = []
    raw: list[float] = []
    smoothed: list[float] = []
    stopped_early = False
    try:
        model, optimizer, params = _copy_training_objects(trainer)
        model.train(trainer.model.training)
        scaler = torch.amp.GradScaler(trainer.device.type, enabled=c.precision == "fp16")
        ratio = end_lr / start_lr
        avg, best = 0.0, math.inf
        for i in range(num_steps):
            lr = start_lr * ratio ** (i / (num_steps - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [batches.take(batch_size) for _ in range(c.accumulate)]
            result = train_step(model, optimizer, trainer.contract, micro, params=params,
                                device_type=trainer.device.type, amp_dtype=AMP_DTYPES[c.precision],
                                scaler=scaler, grad_clip=c.grad_clip)
            loss = float(result.loss)
            if not math.isfinite(loss):
                stopped_early = i < num_steps - 1
                break
            avg = smooth * avg + (1.0 - smooth) * loss
            value = avg / (1.0 - smooth ** (i + 1))
            lrs.append(lr)
            raw.append(loss)
            smoothed.append(value)
            best = min(best, value)
            if diverge_factor is not None and i > 0 and value > diverge_factor * best:
                stopped_early = i < num_steps - 1
                break
        del model, optimizer, params
    finally:
        rng.load_state_dict(saved_rng)
        torch.set_num_threads(threads)
    if not lrs:
        raise RuntimeError(f"lr_find: the loss was not finite at the first step (lr {start_lr:g}); allowed: a "
                           f"start_lr small enough to train, and a model/loss that give a finite loss")
    suggestion, method, steepest, valley = suggest_lr(lrs, smoothed)
    res = LRFindResult(lrs=lrs, losses=smoothed, raw_losses=raw, suggestion=suggestion, steepest=steepest,
                       valley=valley, method=method, stopped_early=stopped_early,
                       details={"start_lr": start_lr, "end_lr": end_lr, "num_steps": num_steps,
                                "batch_size": batch_size, "smooth": smooth, "diverge_factor": diverge_factor})
    trainer.log_event("lr_find", source, {"suggestion": suggestion, "method": method, "num_points": len(lrs),
                                           "steepest": steepest, "valley": valley, "start_lr": start_lr,
                                           "end_lr": end_lr, "batch_size": batch_size,
                                           "stopped_early": stopped_early})
    return res


# ===================================================================== batch size
_OOM_MESSAGES = (
    "out of memory",                              # CUDA / HIP / MPS allocators
    "cudnn_status_not_supported",                 # cuDNN fails like this when its workspace cannot be allocated
    "cublas_status_alloc_failed",
    "defaultcpuallocator: can't allocate memory",  # the CPU allocator
)


def is_oom_error(e: BaseException) -> bool:
    """True when ``e`` means the device ran out of memory (the batch should shrink), else False.

    ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``) and Python's ``MemoryError`` always
    count; a ``RuntimeError`` counts when its message carries one of the allocators' OOM phrases.
    """
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(e, (oom_type, torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(e, RuntimeError) and e.args:
        text = str(e.args[0]).lower()
        return any(m in text for m in _OOM_MESSAGES)
    return False


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def find_executable_batch_size(fn: Callable[..., Any] | None = None, starting_batch_size: int = 128, *,
                               oom_predicate: Callable[[BaseException], bool] = is_oom_error) -> Callable[..., Any]:
    """Call ``fn(batch_size, *args, **kwargs)``, halving ``batch_size`` after each OOM until it succeeds.

    The accelerate pattern (``accelerate.utils.find_executable_batch_size``): usable as
    ``find_executable_batch_size(fn, 128)`` or as ``@find_executable_batch_size(starting_batch_size=128)``.
    An error for which ``oom_predicate`` is False propagates at once; reaching batch size 0 raises
    RuntimeError. The wrapper's ``batch_size`` attribute holds the size of the last attempt.
    """
    starting_batch_size = check_int("starting_batch_size", starting_batch_size, minimum=1)
    if fn is None:
        return functools.partial(find_executable_batch_size, starting_batch_size=starting_batch_size,
                                 oom_predicate=oom_predicate)
    if not callable(fn):
        raise TypeError(f"fn: got {fn!r} of type {type(fn).__name__}; allowed: a callable taking batch_size first")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "batch_size" in kwargs:
            raise TypeError(f"batch_size: got {kwargs['batch_size']!r} as an argument; allowed: none (the "
                            f"decorator passes it, starting at {starting_batch_size})")
        batch_size = starting_batch_size
        while True:
            wrapper.batch_size = batch_size
            try:
                return fn(batch_size, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - only OOMs are retried; anything else re-raises
                if not oom_predicate(e):
                    raise
                e = None  # noqa: F841 - drop the traceback's frames (and their tensors) before freeing
                _release_memory()
                if batch_size // 2 == 0:
                    raise RuntimeError(f"find_executable_batch_size: out of memory even at batch size "
                                       f"{batch_size}; allowed: a batch size >= 1 that fits (reached 0)") from None
                batch_size //= 2

    wrapper.batch_size = starting_batch_size
    return wrapper


def available_memory_bytes() -> int | None:
    """Available RAM in bytes: psutil when installed, else /proc/meminfo's MemAvailable, else sysconf."""
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil is optional
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class StepMemory:
    """Bytes one training step holds at its peak, by kind (an allocator-independent account)."""

    params: int
    grads: int
    optimizer_state: int
    batch: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer_state + self.batch + self.activations


def measure_step_memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer, contract: Any,
                        batch: Any, *, params: list[torch.nn.Parameter], device_type: str,
                        amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler,
                        grad_clip: float | None) -> StepMemory:
    """Run one real training step on ``batch`` and account for the memory it holds at its peak. ``contract``:
    the run's StepContract (workbench.batches), or a ``loss_fn`` for an ``(input, target)`` batch.

    Activations are what autograd saves for the backward pass, counted in a ``saved_tensors_hooks``
    pack hook (each storage once; parameters and the batch are counted separately). At the end of the
    backward pass the step holds parameters + gradients (one per trainable parameter) + optimizer state
    (measured after the step, so Adam's two moments are included) + the batch + the saved activations.
    Why not measure the process: torch's CPU allocations are invisible to ``tracemalloc``, and RSS /
    VmHWM move with the allocator's caching and the rest of the process, so they are neither stable
    nor testable; this account is deterministic and linear in the batch size. It ignores short-lived
    per-op workspace, so keep a margin in the budget.
    """
    if not isinstance(contract, StepContract):   # a loss_fn for (input, target) batches
        contract = StepContract(loss_fn=contract)
    seen: set[int] = set()
    for p in model.parameters():
        seen.add(p.untyped_storage().data_ptr())
    batch_bytes = 0
    for t in tensors_in(batch):
        batch_bytes += _tensor_bytes(t)
        seen.add(t.untyped_storage().data_ptr())
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr != 0:
            seen.add(ptr)
            saved[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(model, optimizer, contract, [batch], params=params, device_type=device_type,
                   amp_dtype=amp_dtype, scaler=scaler, grad_clip=grad_clip)
    param_bytes = sum(_tensor_bytes(p) for p in model.parameters())
    grad_bytes = sum(_tensor_bytes(p) for p in params)
    state_bytes = sum(_tensor_bytes(v) for s in optimizer.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor))
    return StepMemory(params=param_bytes, grads=grad_bytes, optimizer_state=state_bytes, batch=batch_bytes,
                      activations=saved[0])


def find_batch_size(trainer: "Trainer", *, start: int | None = None, max_batch: int | None = None,
                    memory_budget_mb: float | None = None, seed: int | None = None,
                    oom_predicate: Callable[[BaseException], bool] = is_oom_error, source: str = "api") -> int:
    """The largest batch size (start x 2^k, or ``max_batch``) for which one training step fits.

    From ``start`` (default: the run's current batch size) the size doubles while a full step (forward,
    backward, optimizer step under the run's precision) on a copy of the model succeeds and its memory
    (``measure_step_memory``) stays within ``memory_budget_mb``; it is capped at ``max_batch`` (default
    and upper bound: the training set's size). If ``start`` itself does not fit, it halves (accelerate's
    rule) until one fits; an OOM (per ``oom_predicate``) frees the cache first. The budget defaults to
    25% of the available RAM on CPU and to none on a GPU, where the device's own OOM is the bound.
    Returns the size found and logs a ``batch_size_find`` event; the run's own state is untouched.
    """
    source = check_source(source)
    _check_not_running(trainer, "find_batch_size")
    if trainer.source.batch_size_fixed:
        raise ValueError(f"find_batch_size: {trainer.source.batch_size_fixed}; allowed: a run on a map-style "
                         f"Dataset (set the batch size on the DataLoader yourself)")
    n = len(trainer.train_data)
    max_batch = check_int("max_batch", n if max_batch is None else max_batch, minimum=1, maximum=n)
    start = check_int("start", trainer.controls.batch_size if start is None else start, minimum=1)
    start = min(start, max_batch)
    if memory_budget_mb is not None:
        memory_budget_mb = check_number("memory_budget_mb", memory_budget_mb, positive=True)
    elif trainer.device.type == "cpu":
        avail = available_memory_bytes()
        memory_budget_mb = avail * DEFAULT_BUDGET_FRACTION / 2**20 if avail else None
    budget = None if memory_budget_mb is None else memory_budget_mb * 2**20
    if not callable(oom_predicate):
        raise TypeError(f"oom_predicate: got {oom_predicate!r}; allowed: a callable taking an exception")

    c = trainer.controls
    rng = RNGState()
    saved_rng = rng.state_dict()
    threads = _use_trainer_threads(trainer, start)
    tried: list[dict[str, Any]] = []
    best: int | None = None
    try:
        model, optimizer, params = _copy_training_objects(trainer)
        model.train(trainer.model.training)
        fetch = trainer.source.fetcher
        gen = torch.Generator().manual_seed(_generator_seed(trainer, seed))
        scaler = torch.amp.GradScaler(trainer.device.type, enabled=c.precision == "fp16")
        size = start
        while True:
            fits, used, why = True, None, ""
            try:
                batch = fetch.fetch(torch.randperm(n, generator=gen)[:size])
                mem = measure_step_memory(model, optimizer, trainer.contract, batch, params=params,
                                          device_type=trainer.device.type, amp_dtype=AMP_DTYPES[c.precision],
                                          scaler=scaler, grad_clip=c.grad_clip)
                used = mem.total
                if budget is not None and used > budget:
                    fits, why = False, "over budget"
                del batch
            except Exception as e:  # noqa: BLE001 - only OOMs mean "too big"; anything else re-raises
                if not oom_predicate(e):
                    raise
                fits, why = False, "out of memory"
                e = None  # noqa: F841
                optimizer.zero_grad(set_to_none=True)
                _release_memory()
            tried.append({"batch_size": size, "fits": fits, "bytes": used, "why": why})
            if fits:
                best = size
                if size >= max_batch:
                    break
                size = min(size * 2, max_batch)
            elif best is not None:
                break
            elif size == 1:
                break
            else:
                size //= 2
        del model, optimizer, params
        if trainer.device.type == "cuda":
            _release_memory()   # hand the copies' cached blocks back before the run continues
    finally:
        rng.load_state_dict(saved_rng)
        torch.set_num_threads(threads)
    if best is None:
        last = tried[-1]
        need = "" if last["bytes"] is None else f"; allowed: a memory_budget_mb above {last['bytes'] / 2**20:.4f}"
        raise RuntimeError(f"find_batch_size: even batch size {last['batch_size']} does not fit ({last['why']}, "
                           f"memory_budget_mb {memory_budget_mb!r}){need}")
    trainer.log_event("batch_size_find", source, {"batch_size": best, "start": start, "max_batch": max_batch,
                                                   "memory_budget_mb": memory_budget_mb, "tried": tried})
    return best
