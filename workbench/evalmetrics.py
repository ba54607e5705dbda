"""What an evaluation measures beside the loss: accuracy for any ``[B, ..., C]`` prediction, perplexity for
language models, F1 and ROC-AUC for two-class data, and the user's own metrics.

``EvalMetrics.start()`` makes an accumulator for one pass over the validation data; ``add`` takes each batch's
prediction and target (device tensors, no host sync); ``result`` reads everything back once at the end.

- **accuracy** (``val_acc``, classification): the arg-max of the last dimension against the target, counted
  per target element, so a sequence model's token accuracy is at most 1. Targets equal to the loss's
  ``ignore_index`` (-100, the padding label of Hugging Face and torch) are not counted. A prediction with
  the target's shape (one logit per sample, ``BCEWithLogitsLoss``) is read as positive when > 0.
- **perplexity** (``val_ppl``): ``exp(val_loss)``, for classification over sequences (a prediction with 3 or
  more dimensions: a language model's mean token cross-entropy).
- **F1 and ROC-AUC** (``val_f1``, ``val_auc``): for two-class predictions (two logits, or one), of the positive
  class; F1 at the arg-max (probability 0.5), AUC by the rank statistic (ties counted half).
- **user metrics** (``metrics={"name": fn}``): ``fn(predictions, targets) -> number`` over the whole pass
  (predictions and targets of all batches concatenated, on the host), or a torchmetrics-like object
  (``update(preds, target)`` per batch, ``compute()`` at the end, ``reset()`` before the next pass). Stored
  as ``val_<name>``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

BUILT_IN = ("val_loss", "val_acc", "val_ppl", "val_f1", "val_auc")


def metric_name(name: str) -> str:
    return name if name.startswith("val_") else f"val_{name}"


def check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """The user's metrics by their stored name; each must be a callable or a torchmetrics-like object."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics: got {type(metrics).__name__}; allowed: a dict of name -> fn(preds, targets) "
                        f"or torchmetrics Metric")
    out: dict[str, Any] = {}
    for name, fn in metrics.items():
        if not isinstance(name, str) or not name.replace("_", "").isalnum():
            raise ValueError(f"metrics: got the name {name!r}; allowed: letters, digits and _")
        stored = metric_name(name)
        if stored in BUILT_IN:
            raise ValueError(f"metrics: {name!r} is built in ({stored}); allowed: another name")
        is_object = all(callable(getattr(fn, m, None)) for m in ("update", "compute", "reset"))
        if not (is_object or callable(fn)):
            raise TypeError(f"metrics.{name}: got {type(fn).__name__}; allowed: fn(preds, targets) -> number, or "
                            f"an object with update/compute/reset (torchmetrics)")
        out[stored] = fn
    return out


def ignore_index_of(loss_fn: Any) -> int:
    return int(getattr(loss_fn, "ignore_index", -100))


class EvalMetrics:
    """The metrics of a run's evaluations (see the module docstring)."""

    def __init__(self, *, classification: bool, user: Mapping[str, Any], ignore_index: int = -100) -> None:
        self.classification, self.user, self.ignore_index = classification, dict(user), ignore_index

    @property
    def names(self) -> tuple[str, ...]:
        """The metrics an evaluation may record (which built-ins it does depends on the predictions' shape)."""
        return (*BUILT_IN, *self.user)

    def check_monitor(self, monitor: str) -> None:
        if monitor not in self.names:
            raise ValueError(f"monitor: got {monitor!r}, which no evaluation of this run measures; allowed: "
                             f"{', '.join(self.names)}")

    def check_measured(self, monitor: str, measured: Mapping[str, float]) -> None:
        """After the first evaluation: the monitored metric must be among those it recorded."""
        value = measured.get(monitor)
        if value is None or (monitor == "val_acc" and math.isnan(value)):   # NaN accuracy: a regression
            have = ", ".join(k for k, v in measured.items() if k != "step" and not (k == "val_acc" and math.isnan(v)))
            raise ValueError(f"monitor: {monitor!r} is not measured on this run's data (its evaluations record "
                             f"{have}); allowed: one of those")

    def start(self, device: torch.device) -> "_Pass":
        for fn in self.user.values():
            if hasattr(fn, "reset") and hasattr(fn, "update"):
                if callable(getattr(fn, "to", None)):
                    fn.to(device)  # a torchmetrics Metric keeps its state beside the predictions
                fn.reset()
        return _Pass(self)


class _Pass:
    def __init__(self, spec: EvalMetrics) -> None:
        self.spec = spec
        self.loss_sum: torch.Tensor | None = None
        self.n = 0
        self.correct: torch.Tensor | None = None
        self.counted: torch.Tensor | None = None
        self.sequence = False
        self.scores: list[torch.Tensor] = []       # positive-class scores (two-class data)
        self.labels: list[torch.Tensor] = []
        self.binary: bool | None = None
        self.kept: tuple[list, list] = ([], [])    # for callable user metrics

    def add(self, loss: torch.Tensor, samples: int, pred: torch.Tensor | None, target: Any) -> None:
        weighted = loss.detach().double() * samples
        self.loss_sum = weighted if self.loss_sum is None else self.loss_sum + weighted
        self.n += samples
        if pred is None or not isinstance(target, torch.Tensor):
            return
        pred = pred.detach()
        if self.spec.classification:
            self._accuracy(pred, target)
        for name, fn in self.spec.user.items():
            if hasattr(fn, "update") and hasattr(fn, "compute"):
                fn.update(pred, target)
        if any(not hasattr(fn, "update") for fn in self.spec.user.values()):
            self.kept[0].append(pred.float().cpu())
            self.kept[1].append(target.detach().cpu())

    def _accuracy(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape == target.shape:          # one logit per element
            hit, valid = (pred > 0) == (target > 0.5), torch.ones_like(target, dtype=torch.bool)
            score, binary = torch.sigmoid(pred.float()), True
        elif pred.dim() == target.dim() + 1 and pred.shape[:-1] == target.shape:
            valid = target != self.spec.ignore_index
            hit = (pred.argmax(dim=-1) == target) & valid
            binary = pred.shape[-1] == 2
            score = torch.softmax(pred.float(), dim=-1)[..., 1] if binary else None
        else:
            return
        self.sequence = self.sequence or pred.dim() >= 3
        c, k = hit.sum().double(), valid.sum().double()
        self.correct = c if self.correct is None else self.correct + c
        self.counted = k if self.counted is None else self.counted + k
        self.binary = binary if self.binary is None else (self.binary and binary)
        if binary and score is not None and pred.dim() <= 2:
            self.scores.append(score.reshape(-1))
            self.labels.append(target.reshape(-1))

    def result(self) -> tuple[float, float, dict[str, float]]:
        """(val_loss, val_acc or NaN, the other metrics by name), read back once."""
        loss = float(self.loss_sum / max(self.n, 1)) if self.loss_sum is not None else math.nan
        acc = math.nan
        if self.correct is not None and float(self.counted) > 0:
            acc = float(self.correct / self.counted)
        extra: dict[str, float] = {}
        if self.spec.classification and self.sequence and math.isfinite(loss):
            extra["val_ppl"] = math.exp(min(loss, 700.0))
        if self.binary and self.scores:
            scores, labels = torch.cat(self.scores).cpu(), torch.cat(self.labels).cpu() > 0.5
            extra["val_f1"], extra["val_auc"] = binary_f1(scores, labels), roc_auc(scores, labels)
        preds, targets = self.kept
        for name, fn in self.spec.user.items():
            if hasattr(fn, "update") and hasattr(fn, "compute"):
                value = fn.compute()
            else:
                value = fn(torch.cat(preds), torch.cat(targets)) if preds else math.nan
            extra[name] = _number(name, value)
        return loss, acc, extra


def _number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metrics.{name[4:]}: returned a tensor of shape {tuple(value.shape)}; allowed: "
                             f"one number")
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metrics.{name[4:]}: returned {type(value).__name__}; allowed: one number") from None


def binary_f1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """F1 of the positive class at score 0.5 (NaN when there are no positives at all)."""
    predicted = scores > 0.5
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    if tp + fn == 0:
        return math.nan
    return 2 * tp / (2 * tp + fp + fn)


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative (ties
    count half); NaN when one class is absent."""
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return math.nan
    s = scores.double()
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    sorted_s = s[order]
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2          # the mean rank of each run of ties
    ranks[order] = mean_rank[inverse]
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))
