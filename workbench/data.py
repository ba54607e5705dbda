"""Datasets for the workbench: small built-in and generated sets plus CSV files.

Everything is loaded into memory and returned as a :class:`DataBundle` holding
``TensorDataset(x, y)`` splits, so a trainer can treat every source the same way.
Nothing is downloaded: the bundled sets come with scikit-learn and the generated
ones are drawn with a seeded numpy ``Generator``.

Teaching options (``label_noise``, ``random_labels``, ``scale``,
``duplicate_fraction``, ``nan_fraction``, ``n_samples``) deliberately break a
dataset in one well-defined way so a lesson can show what that looks like
during training.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DATASETS", "DataBundle", "describe_datasets", "load_dataset"]

DATASETS: tuple[str, ...] = ("digits", "breast_cancer", "wine", "moons", "spirals", "regression")
"""Names accepted by :func:`load_dataset`, besides ``"csv:PATH"``."""

_ALLOWED_NAMES = ", ".join((*DATASETS, "csv:PATH"))
_BUNDLED = ("digits", "breast_cancer", "wine")
_TASKS = ("auto", "classification", "regression")
# A target column with at most this many distinct integer values is treated as labels.
_MAX_AUTO_CLASSES = 20

# Options every dataset accepts, and those only classification sets accept.
_COMMON_OPTIONS = ("scale", "duplicate_fraction", "nan_fraction")
_LABEL_OPTIONS = ("label_noise", "random_labels")
_OPTIONS: dict[str, tuple[str, ...]] = {
    "digits": ("n_samples", *_LABEL_OPTIONS, *_COMMON_OPTIONS),
    "breast_cancer": ("n_samples", *_LABEL_OPTIONS, *_COMMON_OPTIONS),
    "wine": ("n_samples", *_LABEL_OPTIONS, *_COMMON_OPTIONS),
    "moons": ("n_samples", "noise", *_LABEL_OPTIONS, *_COMMON_OPTIONS),
    "spirals": ("n_samples", "n_classes", "noise", "turns", *_LABEL_OPTIONS, *_COMMON_OPTIONS),
    "regression": ("n_samples", "n_features", "noise", *_COMMON_OPTIONS),
    "csv": ("target", "task", "n_samples", *_LABEL_OPTIONS, *_COMMON_OPTIONS),
}


@dataclass
class DataBundle:
    """A loaded dataset: train/val splits plus the facts a model builder needs.

    ``train``/``val`` are ``TensorDataset(x, y)`` with ``x`` float32 of shape
    ``(n, n_features)``; ``y`` is int64 ``(n,)`` for classification and float32
    ``(n, 1)`` for regression. ``val`` is None when no validation split was asked for.
    """

    train: Dataset
    val: Dataset | None
    task: str
    n_features: int
    n_classes: int | None
    name: str
    feature_names: list[str] | None = None
    class_names: list[str] | None = None


@dataclass
class _Raw:
    """Unsplit data as float64 features and labels/targets, before any teaching option."""

    x: np.ndarray
    y: np.ndarray
    task: str
    feature_names: list[str] | None
    class_names: list[str] | None


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name}: {value!r} is out of range; allowed: integers >= {minimum}{upper}")
    return value


def _check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    value = float(value)
    if positive and value <= 0:
        raise ValueError(f"{name}: {value!r} is out of range; allowed: numbers > 0")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name}: {value!r} is out of range; allowed: numbers in [{minimum}, {maximum}]")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def _check_options(kind: str, options: dict[str, Any]) -> None:
    allowed = _OPTIONS[kind]
    for key in options:
        if key not in allowed:
            raise ValueError(
                f"dataset {kind!r}: unknown option {key!r}; allowed: {', '.join(allowed)}"
            )


# --------------------------------------------------------------------------- sources


def _load_bundled(name: str) -> _Raw:
    from sklearn import datasets as skd

    loader: Callable[..., Any] = {
        "digits": skd.load_digits,
        "breast_cancer": skd.load_breast_cancer,
        "wine": skd.load_wine,
    }[name]
    bunch = loader()
    return _Raw(
        x=np.asarray(bunch.data, dtype=np.float64),
        y=np.asarray(bunch.target, dtype=np.int64),
        task="classification",
        feature_names=[str(f) for f in bunch.feature_names],
        class_names=[str(c) for c in bunch.target_names],
    )


def _make_moons(rng: np.random.Generator, n_samples: int, noise: float) -> _Raw:
    """Two interleaving half circles (class 0 on top, class 1 below, shifted right)."""
    n_top = n_samples // 2
    n_bottom = n_samples - n_top
    t_top = rng.uniform(0.0, math.pi, n_top)
    t_bottom = rng.uniform(0.0, math.pi, n_bottom)
    top = np.column_stack([np.cos(t_top), np.sin(t_top)])
    bottom = np.column_stack([1.0 - np.cos(t_bottom), 0.5 - np.sin(t_bottom)])
    x = np.vstack([top, bottom]) + rng.normal(0.0, noise, (n_samples, 2))
    y = np.concatenate([np.zeros(n_top, np.int64), np.ones(n_bottom, np.int64)])
    order = rng.permutation(n_samples)
    return _Raw(x[order], y[order], "classification", ["x0", "x1"], ["0", "1"])


def _make_spirals(
    rng: np.random.Generator, n_samples: int, n_classes: int, noise: float, turns: float
) -> _Raw:
    """``n_classes`` interleaved spiral arms in 2-D; ``noise`` jitters the angle (radians)."""
    counts = [n_samples // n_classes + (1 if k < n_samples % n_classes else 0) for k in range(n_classes)]
    xs, ys = [], []
    for k, m in enumerate(counts):
        radius = np.linspace(0.05, 1.0, m)
        theta = 2 * math.pi * (k / n_classes + turns * radius) + rng.normal(0.0, noise, m)
        xs.append(np.column_stack([radius * np.sin(theta), radius * np.cos(theta)]))
        ys.append(np.full(m, k, dtype=np.int64))
    x, y = np.vstack(xs), np.concatenate(ys)
    order = rng.permutation(n_samples)
    return _Raw(x[order], y[order], "classification", ["x0", "x1"], [str(k) for k in range(n_classes)])


def _make_regression(rng: np.random.Generator, n_samples: int, n_features: int, noise: float) -> _Raw:
    """y = linear term + sin of one feature + product of two features + Gaussian noise."""
    x = rng.normal(0.0, 1.0, (n_samples, n_features))
    weights = rng.normal(0.0, 0.5, n_features)
    y = (
        x @ weights
        + 1.5 * np.sin(2.0 * x[:, 0])
        + x[:, 1 % n_features] * x[:, 2 % n_features]
        + rng.normal(0.0, noise, n_samples)
    )
    names = [f"x{i}" for i in range(n_features)]
    return _Raw(x, y.reshape(-1, 1), "regression", names, None)


def _label_value_name(value: Any) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _load_csv(path_text: str, target: Any, task: Any) -> _Raw:
    import pandas as pd

    if not path_text:
        raise ValueError("dataset: 'csv:' needs a file path after the colon, e.g. 'csv:data/houses.csv'")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"dataset: csv file not found: {str(path)!r}")
    try:
        frame = pd.read_csv(path)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as e:  # EmptyDataError is a ValueError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"dataset: csv file {str(path)!r} cannot be read as CSV ({first}); allowed: a text file "
                         f"of comma-separated columns with a header row") from None
    if frame.shape[1] < 2:
        raise ValueError(
            f"dataset: csv file {str(path)!r} has {frame.shape[1]} column(s); "
            "need at least one feature column and one target column"
        )
    if target is None:
        target = frame.columns[-1]
    elif target not in frame.columns:
        raise ValueError(
            f"target: column {target!r} not found in {str(path)!r}; "
            f"allowed: {', '.join(map(str, frame.columns))}"
        )
    if task not in _TASKS:
        raise ValueError(f"task: unknown value {task!r}; allowed: {', '.join(_TASKS)}")

    frame = frame[frame[target].notna()].reset_index(drop=True)
    if len(frame) == 0:
        raise ValueError(f"target: column {target!r} in {str(path)!r} has no non-missing values")
    y_col = frame[target]
    features = frame.drop(columns=[target])
    numeric_target = pd.api.types.is_numeric_dtype(y_col) and not pd.api.types.is_bool_dtype(y_col)

    if task == "auto":
        if not numeric_target:
            task = "classification"
        else:
            values = y_col.to_numpy(dtype=np.float64)
            integer_valued = bool(np.all(np.mod(values, 1.0) == 0.0))
            task = (
                "classification"
                if integer_valued and y_col.nunique() <= _MAX_AUTO_CLASSES
                else "regression"
            )
    if task == "regression" and not numeric_target:
        raise ValueError(
            f"task: 'regression' needs a numeric target, but column {target!r} of {str(path)!r} holds "
            f"{y_col.dtype} values like {y_col.iloc[0]!r}; allowed: task='classification' or 'auto'"
        )

    categorical = [
        c for c in features.columns
        if not pd.api.types.is_numeric_dtype(features[c]) or pd.api.types.is_bool_dtype(features[c])
    ]
    if categorical:
        features = pd.get_dummies(features, columns=categorical, dtype=np.float64)
    try:
        x = features.to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise ValueError(f"dataset: csv file {str(path)!r} has feature values that are not numbers ({e}); "
                         f"allowed: numeric or categorical columns") from None
    feature_names = [str(c) for c in features.columns]

    if task == "classification":
        codes, uniques = pd.factorize(y_col, sort=True)
        y = codes.astype(np.int64)
        class_names = [_label_value_name(v) for v in uniques]
        if len(class_names) < 2:
            raise ValueError(
                f"target: column {target!r} in {str(path)!r} has a single class {class_names[0]!r}; "
                "classification needs at least 2 classes"
            )
    else:
        y = y_col.to_numpy(dtype=np.float64).reshape(-1, 1)
        class_names = None
    return _Raw(x, y, task, feature_names, class_names)


# --------------------------------------------------------------------------- splitting


def _split_indices(
    n: int, y: np.ndarray | None, test_size: float | int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded index split, stratified by ``y`` when given and possible.

    Falls back to a plain random split when some class is too small to stratify
    (e.g. a tiny ``n_samples`` subset), so teaching runs on very little data still work.
    """
    from sklearn.model_selection import train_test_split

    indices = np.arange(n)
    if y is not None:
        try:
            a, b = train_test_split(indices, test_size=test_size, random_state=seed, stratify=y)
            return np.sort(a), np.sort(b)
        except ValueError:
            pass
    try:
        a, b = train_test_split(indices, test_size=test_size, random_state=seed)
    except ValueError as err:
        raise ValueError(
            f"val_fraction/n_samples: cannot split {n} rows with test size {test_size!r}: {err}"
        ) from None
    return np.sort(a), np.sort(b)


def _random_labels(rng: np.random.Generator, y: np.ndarray, fraction: float, n_classes: int) -> np.ndarray:
    """Give ``fraction`` of the rows (chosen at random) a uniformly random class."""
    y = y.copy()
    count = int(round(fraction * len(y)))
    if count:
        rows = rng.choice(len(y), size=count, replace=False)
        y[rows] = rng.integers(0, n_classes, size=count)
    return y


def _standardize(train: np.ndarray, *others: np.ndarray | None) -> list[np.ndarray | None]:
    """Scale columns to mean 0 / std 1 with statistics from ``train`` only (std 0 -> 1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column: "mean of empty slice"
        mean = np.nanmean(train, axis=0)
        std = np.nanstd(train, axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
    return [None if a is None else (a - mean) / std for a in (train, *others)]


def _tensors(x: np.ndarray, y: np.ndarray, task: str) -> TensorDataset:
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if task == "classification":
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    else:
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32).reshape(-1, 1))
    return TensorDataset(xt, yt)


# --------------------------------------------------------------------------- public API


def load_dataset(
    spec: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    normalize: bool = True,
    **options: Any,
) -> DataBundle:
    """Load a named dataset (or ``"csv:PATH"``) and split it into seeded train/val sets.

    ``seed`` drives generation, subsetting, the split and every teaching option, so the
    same arguments always give the same tensors. ``normalize`` standardises features
    (and a regression target) with train-split statistics only, so validation data
    never leaks into preprocessing. See :func:`describe_datasets` and the module
    docstring for the options each dataset accepts.
    """
    if not isinstance(spec, str):
        raise ValueError(f"dataset: expected a name string, got {spec!r}; allowed: {_ALLOWED_NAMES}")
    seed = _check_int("seed", seed, minimum=0)
    val_fraction = _check_float("val_fraction", val_fraction, minimum=0.0, maximum=0.9)
    normalize = _check_bool("normalize", normalize)

    name = spec.strip()
    if name.lower().startswith("csv:"):
        kind = "csv"
    elif name in DATASETS:
        kind = name
    else:
        raise ValueError(f"dataset: unknown name {spec!r}; allowed: {_ALLOWED_NAMES}")
    _check_options(kind, options)
    opts = dict(options)

    scale = _check_float("scale", opts.pop("scale", 1.0))
    duplicate_fraction = _check_float(
        "duplicate_fraction", opts.pop("duplicate_fraction", 0.0), minimum=0.0, maximum=1.0
    )
    nan_fraction = _check_float("nan_fraction", opts.pop("nan_fraction", 0.0), minimum=0.0, maximum=1.0)
    label_noise = _check_float("label_noise", opts.pop("label_noise", 0.0), minimum=0.0, maximum=1.0)
    random_labels = _check_bool("random_labels", opts.pop("random_labels", False))
    if duplicate_fraction > 0 and val_fraction == 0:
        raise ValueError(
            f"duplicate_fraction: {duplicate_fraction!r} copies validation rows into train, "
            "but val_fraction=0 makes no validation set; allowed: duplicate_fraction=0 or val_fraction > 0"
        )

    gen_rng = np.random.default_rng(seed)
    n_subset: int | None = None
    if kind in _BUNDLED:
        raw = _load_bundled(kind)
        if "n_samples" in opts:
            n_subset = _check_int("n_samples", opts.pop("n_samples"), minimum=2, maximum=len(raw.y))
    elif kind == "moons":
        raw = _make_moons(
            gen_rng,
            _check_int("n_samples", opts.pop("n_samples", 1000), minimum=4),
            _check_float("noise", opts.pop("noise", 0.2), minimum=0.0),
        )
    elif kind == "spirals":
        n_classes = _check_int("n_classes", opts.pop("n_classes", 3), minimum=2)
        n_samples = _check_int("n_samples", opts.pop("n_samples", 1000), minimum=2 * n_classes)
        raw = _make_spirals(
            gen_rng,
            n_samples,
            n_classes,
            _check_float("noise", opts.pop("noise", 0.2), minimum=0.0),
            _check_float("turns", opts.pop("turns", 1.5), positive=True),
        )
    elif kind == "regression":
        raw = _make_regression(
            gen_rng,
            _check_int("n_samples", opts.pop("n_samples", 1000), minimum=4),
            _check_int("n_features", opts.pop("n_features", 8), minimum=1),
            _check_float("noise", opts.pop("noise", 0.1), minimum=0.0),
        )
    else:  # csv
        raw = _load_csv(name[4:].strip(), opts.pop("target", None), opts.pop("task", "auto"))
        if "n_samples" in opts:
            n_subset = _check_int("n_samples", opts.pop("n_samples"), minimum=2, maximum=len(raw.y))
        if raw.task == "regression" and (label_noise > 0 or random_labels):
            raise ValueError(
                "label_noise/random_labels: only classification data has labels to corrupt, "
                f"but {spec!r} was loaded as regression; allowed: task='classification'"
            )
    assert not opts, f"unhandled options {sorted(opts)}"  # _check_options guards this

    classification = raw.task == "classification"
    x, y = raw.x, raw.y
    n_classes = len(raw.class_names) if classification and raw.class_names else None

    # Seeded stratified subset ("tiny data" runs).
    if n_subset is not None and n_subset < len(y):
        keep, _ = _split_indices(len(y), y if classification else None, len(y) - n_subset, seed)
        x, y = x[keep], y[keep]

    x = x * scale

    if val_fraction > 0:
        tr, va = _split_indices(len(y), y if classification else None, val_fraction, seed)
        x_train, y_train, x_val, y_val = x[tr], y[tr], x[va], y[va]
    else:
        x_train, y_train = x, y
        x_val = y_val = None

    # Teaching corruptions use their own stream so they don't change the split.
    noise_rng = np.random.default_rng([seed, 1])
    if classification:
        assert n_classes is not None
        if random_labels:
            y_train = _random_labels(noise_rng, y_train, 1.0, n_classes)
            if y_val is not None:
                y_val = _random_labels(noise_rng, y_val, 1.0, n_classes)
        elif label_noise > 0:
            y_train = _random_labels(noise_rng, y_train, label_noise, n_classes)

    if duplicate_fraction > 0:
        assert x_val is not None and y_val is not None
        count = int(round(duplicate_fraction * len(y_val)))
        rows = np.sort(noise_rng.choice(len(y_val), size=count, replace=False))
        x_train = np.concatenate([x_train, x_val[rows]])
        y_train = np.concatenate([y_train, y_val[rows]])

    if normalize:
        x_train, x_val = _standardize(x_train, x_val)
        if not classification:
            y_train, y_val = _standardize(y_train, y_val)

    if nan_fraction > 0:
        x_train = np.array(x_train, dtype=np.float64, copy=True)
        count = int(round(nan_fraction * x_train.size))
        cells = noise_rng.choice(x_train.size, size=count, replace=False)
        x_train.reshape(-1)[cells] = np.nan

    return DataBundle(
        train=_tensors(x_train, y_train, raw.task),
        val=None if x_val is None else _tensors(x_val, y_val, raw.task),
        task=raw.task,
        n_features=int(x.shape[1]),
        n_classes=n_classes,
        name=name if kind == "csv" else kind,
        feature_names=raw.feature_names,
        class_names=raw.class_names,
    )


def describe_datasets() -> dict[str, str]:
    """One plain-language line per dataset name, for menus and ``--help`` text."""
    return {
        "digits": "Handwritten digits 0-9 as 8x8 grey images (1797 rows, 64 pixel features, 10 classes).",
        "breast_cancer": "Breast tumour measurements labelled malignant or benign (569 rows, 30 features, 2 classes).",
        "wine": "Chemical analysis of wines from three growers (178 rows, 13 features, 3 classes).",
        "moons": "Two interleaving half circles in 2-D; a line cannot separate them (generated, 2 classes).",
        "spirals": "Interleaved spiral arms in 2-D; needs a non-linear model (generated, 3 classes by default).",
        "regression": "Predict a number from 8 random features via a non-linear formula plus noise (generated).",
        "csv:PATH": "Your own CSV file; the last column (or target=...) is what to predict.",
    }
