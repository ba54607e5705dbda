"""Pre-flight data checks, run once before the first step: NaNs, feature scales, class balance, leakage.

A column's kind decides which checks apply: ids and category codes (``categorical_columns``) are not
judged for scale."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from .alert import Action, Alert
from .base import fmt

MAX_ROWS = 20_000


def as_arrays(ds: Dataset | None, max_rows: int = MAX_ROWS) -> tuple[np.ndarray, np.ndarray] | None:
    """(x flattened to 2-D float64, y) from a data set, or None when its items are not plain tensors."""
    if ds is None or len(ds) == 0:
        return None
    try:
        if isinstance(ds, TensorDataset):
            x, y = ds.tensors[0][:max_rows], ds.tensors[1][:max_rows]
        else:
            items = [ds[i] for i in range(min(len(ds), max_rows))]
            x = torch.stack([torch.as_tensor(it[0]) for it in items])
            y = torch.stack([torch.as_tensor(it[1]) for it in items])
    except Exception:  # noqa: BLE001 - exotic items (dicts, strings): no data checks
        return None
    return x.reshape(len(x), -1).double().cpu().numpy(), y.cpu().numpy()


MAX_CODES = 32


def categorical_columns(ds: Dataset | None, x: np.ndarray) -> np.ndarray:
    """Which columns of ``x`` (as ``as_arrays`` flattened them) hold ids or category codes, not measurements:
    every column when the inputs are an integer or bool tensor (token ids, embedding inputs, one-hot
    codes), else the float columns whose values are all non-negative whole numbers taking at most
    ``MAX_CODES`` values (category codes stored as floats). Their mean and spread say nothing about scale:
    token id 46 is not "46 units" of anything, and standardising it would break the embedding lookup."""
    first = None
    try:
        first = ds.tensors[0] if isinstance(ds, TensorDataset) else torch.as_tensor(ds[0][0])
    except Exception:  # noqa: BLE001 - as_arrays already read these items; this is only the dtype
        pass
    if first is not None and not (first.is_floating_point() or first.is_complex()):
        return np.ones(x.shape[1], dtype=bool)
    with np.errstate(all="ignore"):
        whole = np.all((x == np.round(x)) & (x >= 0), axis=0)
    codes = np.zeros(x.shape[1], dtype=bool)
    for j in np.flatnonzero(whole):
        codes[j] = len(np.unique(x[:, j])) <= MAX_CODES
    return codes


def check_nan_inputs(x: np.ndarray, step: int = 0) -> Alert | None:
    """Any NaN or inf in the inputs turns every loss it touches into NaN."""
    bad = ~np.isfinite(x)
    if not bad.any():
        return None
    rows = int(bad.any(axis=1).sum())
    return Alert("nan_inputs", "critical", step,
                 "Some input values are missing (NaN) or infinite. Any sample containing one makes the loss NaN, "
                 "and one NaN gradient spreads to every weight. Fill or drop those values before training.",
                 f"{int(bad.sum())} non-finite values in {rows} of {len(x)} training rows "
                 f"({int(bad.any(axis=0).sum())} of {x.shape[1]} features affected)", confidence=1.0,
                 actions=[Action("Drop or impute the rows with missing values", hint="clean the data set")],
                 detector="data_checks")


def check_scales(x: np.ndarray, step: int = 0, max_abs_mean: float = 5.0, max_std: float = 10.0,
                 categorical: np.ndarray | None = None) -> Alert | None:
    """Features far from zero mean / unit variance (standardise them: LeCun et al. 1998, "Efficient BackProp").
    Columns marked ``categorical`` (ids, codes) are not features on a scale and are skipped."""
    if categorical is not None:
        x = x[:, ~categorical]
        if x.shape[1] == 0:
            return None
    with np.errstate(all="ignore"):
        mean = np.nanmean(x, axis=0)
        std = np.nanstd(x, axis=0)
    mean, std = mean[np.isfinite(mean)], std[np.isfinite(std)]
    if len(mean) == 0:
        return None
    worst_mean, worst_std = float(np.max(np.abs(mean))), float(np.max(std))
    if worst_mean <= max_abs_mean and worst_std <= max_std:
        return None
    return Alert("unnormalized_inputs", "warning", step,
                 "The input features are on very different or very large scales. Gradient descent then takes "
                 "tiny steps along some directions and huge ones along others, so training is slow or unstable. "
                 "Standardise each feature (zero mean, unit variance, fitted on the training split).",
                 f"largest feature |mean| {fmt(worst_mean)}, largest std {fmt(worst_std)} "
                 f"(smallest std {fmt(float(np.min(std)))}); expected about 0 and 1", confidence=0.9,
                 actions=[Action("Standardise the inputs", hint="normalize: true")], detector="data_checks")


def check_balance(y: np.ndarray, task: str, step: int = 0, ratio: float = 0.2) -> Alert | None:
    """The rarest class has fewer than ``ratio`` × the samples of the most common one."""
    if task != "classification" or y.ndim != 1:
        return None
    _, counts = np.unique(y, return_counts=True)
    if len(counts) < 2 or counts.min() >= ratio * counts.max():
        return None
    return Alert("class_imbalance", "warning", step,
                 "The classes are very unevenly represented. A model can score well by mostly predicting the "
                 "common class while failing on the rare one; accuracy then hides the problem.",
                 f"rarest class has {int(counts.min())} samples, the most common {int(counts.max())} "
                 f"(ratio {counts.min() / counts.max():.2f}) across {len(counts)} classes", confidence=0.8,
                 actions=[Action("Weight the loss by class frequency", hint="loss_fn=CrossEntropyLoss(weight=...)"),
                          Action("Resample the rare class", hint="oversample or collect more data")],
                 detector="data_checks")


def check_leakage(x_train: np.ndarray, x_val: np.ndarray, step: int = 0, fraction: float = 0.01) -> Alert | None:
    """Exact duplicate rows shared by train and val make validation scores optimistic."""
    if len(x_val) == 0:
        return None
    train_rows = {r.tobytes() for r in np.ascontiguousarray(x_train, dtype=np.float64)}
    shared = sum(r.tobytes() in train_rows for r in np.ascontiguousarray(x_val, dtype=np.float64))
    if shared <= fraction * len(x_val):
        return None
    return Alert("data_leakage", "warning", step,
                 "Some validation rows also appear in the training set. The validation score then partly measures "
                 "memory rather than generalisation, and looks better than the model really is. Remove duplicates "
                 "before splitting.",
                 f"{shared} of {len(x_val)} validation rows ({shared / len(x_val):.0%}) are exact copies of training "
                 f"rows", confidence=min(1.0, 0.6 + shared / len(x_val)),
                 actions=[Action("Deduplicate before the split", hint="drop duplicate rows, then split")],
                 detector="data_checks")


def preflight(train: Dataset, val: Dataset | None, task: str) -> list[Alert]:
    """All data checks that apply; an empty list when the data looks fine."""
    tr = as_arrays(train)
    if tr is None:
        return []
    x, y = tr
    alerts = [check_nan_inputs(x), check_scales(x, categorical=categorical_columns(train, x)),
              check_balance(y, task)]
    va = as_arrays(val)
    if va is not None:
        if not any(a is not None and a.kind == "nan_inputs" for a in alerts):
            alerts.append(check_nan_inputs(va[0]))
        alerts.append(check_leakage(x, va[0]))
    return [a for a in alerts if a is not None]
