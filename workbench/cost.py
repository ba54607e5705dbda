"""What a run costs: the time left to its planned end at the current samples/s, and for Transformer-like models
the 6·N·D estimate of training FLOPs (Kaplan et al. 2020: forward + backward ~ 6 FLOPs per parameter per token)
and the FLOP/s achieved.

N is the count of trained parameters (embeddings included), D the tokens a sample carries: the length of the
first integer tensor of a batch with a sequence dimension (token ids). A model counts as Transformer-like when
it holds an attention module (``nn.MultiheadAttention``, a ``nn.Transformer*Layer``, or a module whose class
name says attention). FLOPs are not estimated for other models, nor for a stream whose batches cannot be read
ahead.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

ATTENTION = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def transformer_like(model: nn.Module) -> bool:
    return any(isinstance(m, ATTENTION) or "attention" in type(m).__name__.lower() for m in model.modules())


def tokens_per_sample(batch: Any) -> int | None:
    """The sequence length of the first integer tensor of ``batch`` shaped (samples, tokens, ...)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[1]) if batch.dim() >= 2 and not batch.is_floating_point() else None
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        found = tokens_per_sample(item)
        if found:
            return found
    return None


def flops_per_sample(model: nn.Module, params: list[torch.nn.Parameter], batch: Any) -> float | None:
    """6·N·D for one training sample of a Transformer-like model, else None."""
    tokens = tokens_per_sample(batch) if batch is not None and transformer_like(model) else None
    return 6.0 * sum(p.numel() for p in params) * tokens if tokens else None


def projection(samples_per_s: float | None, step: int, total_steps: int | None, samples_per_step: int,
               flops: float | None) -> dict[str, float | None]:
    """``eta_s``: seconds to ``total_steps`` at this rate; ``flops_per_sample`` and ``flop_s`` (None: unknown)."""
    sps = samples_per_s if samples_per_s is not None and math.isfinite(samples_per_s) and samples_per_s > 0 else None
    eta = max(0, total_steps - step) * samples_per_step / sps if sps and total_steps else None
    return {"eta_s": eta, "flops_per_sample": flops, "flop_s": sps * flops if sps and flops else None}
