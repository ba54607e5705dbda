"""One optimizer step and one evaluation, as plain functions in causal order.

No threading, no logging, no host sync: values come back as device tensors and the trainer reads
them back in batches. Reading this file top to bottom is reading the training math.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from .batches import StepContract, count_samples
from .evalmetrics import EvalMetrics

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepResult:
    """What one optimizer step produced (device tensors; nothing has been read back yet)."""

    loss: torch.Tensor            # mean loss over the step's samples, detached
    grad_norm: torch.Tensor       # global grad norm before clipping (unscaled)
    samples: int
    layer_grad_norms: list[torch.Tensor] | None = None   # per parameter, when layer stats were asked for
    layer_param_norms: list[torch.Tensor] | None = None
    layer_update_norms: list[torch.Tensor] | None = None


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, contract: StepContract,
               micro_batches: Sequence[Any], *, params: list[torch.nn.Parameter],
               device_type: str, amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler,
               grad_clip: float | None, layer_stats: bool = False,
               scratch: list[torch.Tensor] | None = None) -> StepResult:
    """Forward/backward over the micro-batches (gradient accumulation), clip, step, zero the grads.

    ``contract`` turns a batch into its loss (workbench.batches: pairs, dict batches, HF-style models,
    ``step_fn``). ``scratch``: a list the caller keeps between steps; with ``layer_stats`` the pre-step copy
    of the parameters goes there (filled on first use) instead of into fresh tensors each time.

    Each micro-batch's loss is weighted by its share of the step's samples, so a short last
    micro-batch of an epoch counts for what it is. With one micro-batch the loss is used as is.
    """
    several = len(micro_batches) > 1
    counts = [count_samples(b) for b in micro_batches] if several else None
    total = sum(counts) if counts else 0
    scaling = scaler.is_enabled()  # fp16 only; otherwise no scaler calls at all (they would be no-ops)
    loss_sum = None
    for i, batch in enumerate(micro_batches):
        with _autocast(device_type, amp_dtype):
            done = contract.compute(model, batch)
        loss = done.loss
        if several:
            loss = loss * (counts[i] / total)
        else:
            total = done.samples
        (scaler.scale(loss) if scaling else loss).backward()
        d = loss.detach()
        if d.dtype != torch.float32:
            d = d.float()
        loss_sum = d if loss_sum is None else loss_sum + d

    # Unscale before measuring or clipping: the norm must be the true gradient's.
    if scaling:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads)
    grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=params[0].device)
    if grad_clip is not None and grads:
        # The same rule as clip_grad_norm_: scale every grad by min(1, clip / norm), no host sync.
        coef = torch.clamp(grad_clip / (grad_norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)

    before = _copy_params(params, scratch) if layer_stats else None
    if scaling:
        scaler.step(optimizer)  # skipped by the scaler when fp16 grads overflowed
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    result = StepResult(loss=loss_sum, grad_norm=grad_norm.detach(), samples=total)
    if layer_stats:
        with torch.no_grad():
            result.layer_grad_norms = list(norms)
            result.layer_param_norms = list(torch._foreach_norm([p.detach() for p in params]))
            # ||before - after|| == ||after - before|| bit for bit (IEEE subtraction is sign-symmetric)
            torch._foreach_sub_(before, [p.detach() for p in params])
            result.layer_update_norms = list(torch._foreach_norm(before))
    return result


def _autocast(device_type: str, amp_dtype: torch.dtype | None):
    """autocast for bf16/fp16; for fp32 no context at all when autocast is off anyway (the same math as a
    disabled autocast context, without its ~8 us per step)."""
    if amp_dtype is None and not torch.is_autocast_enabled(device_type):
        return nullcontext()
    return torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def _copy_params(params: list[torch.nn.Parameter], scratch: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """The parameters' values before the optimizer step, in ``scratch`` when given (reused across steps)."""
    if scratch is None:
        return [p.detach().clone() for p in params]
    if len(scratch) != len(params) or any(b.shape != p.shape or b.dtype != p.dtype or b.stride() != p.stride()
                                          or b.device != p.device for b, p in zip(scratch, params)):
        scratch[:] = [torch.empty_like(p) for p in params]  # the layout clone() would give
    torch._foreach_copy_(scratch, [p.detach() for p in params])
    return scratch


@torch.no_grad()
def evaluate(model: torch.nn.Module, contract: StepContract, batches: Iterable[Any], metrics: EvalMetrics, *,
             device: torch.device, amp_dtype: torch.dtype | None) -> tuple[float, float, dict[str, float]]:
    """One pass over ``batches``: (mean loss, accuracy or NaN, the other metrics by name), read back once at
    the end (workbench.evalmetrics). The model is put in eval mode for the pass and restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        acc = metrics.start(device)
        for batch in batches:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                done = contract.compute(model, batch)
            acc.add(done.loss, done.samples, done.prediction, done.target)
        return acc.result()
    finally:
        model.train(was_training)
