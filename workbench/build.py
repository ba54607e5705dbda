"""From a config to the parts of a run: device, data, model, loss, optimizer, and the small stateful pieces.

Everything here runs once, in the caller's thread, before a run starts; every problem is a ValueError or
TypeError that names the field and what is allowed.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from .batches import find_target

from .config import TrainConfig
from .controls import precision_problem, resolve_precision
from .data import load_dataset
from .loaders import data_size, kind_of
from .models import build_model
from .optim import CUSTOM
from .rundir import new_run_dir


TASKS = ("classification", "regression", "other")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else mps, else cpu; an unavailable device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device: got {name!r}, but no such CUDA device is available here; allowed: auto, cpu"
                         + (", cuda" if torch.cuda.is_available() else ""))
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device: got {name!r}, but MPS is not available here; allowed: auto, cpu")
    return dev


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def as_config(cfg: Any, overrides: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from a TrainConfig, a mapping, a YAML path or None, with ``overrides`` applied."""
    if cfg is None:
        base = TrainConfig()
    elif isinstance(cfg, TrainConfig):
        base = cfg
    elif isinstance(cfg, Mapping):
        base = TrainConfig.from_dict(cfg)
    elif isinstance(cfg, (str, os.PathLike)):
        base = TrainConfig.from_yaml(cfg)
    else:
        raise TypeError(f"cfg: got {type(cfg).__name__}; allowed: TrainConfig, a mapping, a YAML path or None")
    return base.replace(**overrides) if overrides else base


@dataclass
class Parts:
    """What a config and the user's own objects resolve to."""

    cfg: TrainConfig
    device: torch.device
    precision: str
    task: str
    train_data: Any
    val_data: Any
    model: torch.nn.Module
    loss_fn: Callable
    own_model: bool                       # the user passed the model (a fork then needs a copy of it)
    data_info: dict[str, Any] = field(default_factory=dict)
    run_dir: Path = Path(".")


@dataclass
class Own:
    """What a user may bring beside a config (every field optional; see ``Trainer``)."""

    model: torch.nn.Module | None = None
    train_data: Any = None
    val_data: Any = None
    loss_fn: Callable | None = None
    task: str | None = None
    optimizer: Any = None
    schedule: Any = None
    step_fn: Callable | None = None
    collate_fn: Callable | None = None
    metrics: Mapping[str, Any] | None = None
    output_key: str | None = None
    target_key: str | None = None

    def __post_init__(self) -> None:
        # Trainer(model="mlp", optimizer="sgd") names built-ins, like the config fields of those names
        self.names = {n: getattr(self, n) for n in ("model", "optimizer", "schedule") if isinstance(getattr(self, n), str)}
        for name in self.names:
            setattr(self, name, None)

    def named_builtins(self) -> dict[str, Any]:
        """Config overrides: the built-ins named here, and ``custom`` for an optimizer or schedule object."""
        custom = {n: CUSTOM for n in ("optimizer", "schedule") if getattr(self, n) is not None}
        return {**self.names, **custom}

    def given(self) -> dict[str, Any]:
        """The objects the user passed, by name."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if getattr(self, f) is not None}

    def check(self) -> None:
        for name in ("loss_fn", "step_fn", "collate_fn"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name}: got {type(value).__name__}; allowed: a callable")
        for name in ("output_key", "target_key"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name}: got {value!r}; allowed: a key name (a string)")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task: got {self.task!r}; allowed: {', '.join(TASKS)}")


def build_parts(cfg: TrainConfig, own: Own) -> Parts:
    """Resolve the device and precision, load or check the data, build or place the model and the loss, and
    make the run directory. Seeds every generator first, so a built-in model starts from the seed."""
    own.check()
    if cfg.seed is None:
        cfg = cfg.replace(seed=random.SystemRandom().randrange(2**31))
    device = resolve_device(cfg.device)
    precision = resolve_precision(device, cfg.precision)
    problem = precision_problem(device, precision)
    if problem:
        raise ValueError(f"precision: got {cfg.precision!r}, which this device cannot run ({problem})")
    seed_everything(cfg.seed)

    data_info: dict[str, Any] = {}
    out_features = None
    train_data, val_data, task, loss_fn = own.train_data, own.val_data, own.task, own.loss_fn
    if train_data is None:
        if cfg.dataset is None:
            raise ValueError("dataset: none given and no train_data passed; name a built-in data set "
                             "(digits, breast_cancer, wine, moons, spirals, regression, csv:PATH) or pass train_data")
        bundle = load_dataset(cfg.dataset, seed=cfg.seed, val_fraction=cfg.val_fraction, normalize=cfg.normalize,
                              **cfg.dataset_options)
        train_data, val_data, task = bundle.train, bundle.val, bundle.task
        data_info = {"dataset": bundle.name, "n_features": bundle.n_features, "n_classes": bundle.n_classes,
                     "class_names": bundle.class_names}
        out_features = bundle.n_classes if bundle.task == "classification" else 1
    else:
        kind_of(train_data)
        if val_data is not None:
            kind_of(val_data)
        task = task or infer_task(loss_fn, train_data, cfg.loss, own)
    n = data_size(train_data)
    if kind_of(train_data) == "map" and n is not None and cfg.batch_size > n:
        raise ValueError(f"batch_size: got {cfg.batch_size}; allowed: 1 to {n} (the training set's size)")

    model = own.model
    own_model = model is not None
    if model is None:
        if cfg.model is None:
            raise ValueError("model: none given and no model passed; name a built-in model (mlp, cnn, logreg) "
                             "or pass model=")
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, in_features=data_info["n_features"], out_features=out_features,
                            **cfg.model_options)
    if loss_fn is None and task != "other":
        name = cfg.loss if cfg.loss != "auto" else ("cross_entropy" if task == "classification" else "mse")
        loss_fn = SequenceCrossEntropy() if name == "cross_entropy" else torch.nn.MSELoss()

    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "tb").mkdir(exist_ok=True)
    else:
        run_dir = new_run_dir(cfg.runs_root, cfg.name)
        cfg = cfg.replace(run_dir=str(run_dir))
    return Parts(cfg=cfg, device=device, precision=precision, task=task, train_data=train_data, val_data=val_data,
                 model=model.to(device), loss_fn=loss_fn, own_model=own_model, data_info=data_info, run_dir=run_dir)


class SequenceCrossEntropy(torch.nn.CrossEntropyLoss):
    """Cross-entropy that also takes a sequence model's ``[B, T, C]`` logits against ``[B, T]`` targets (the
    class dimension last, as language models give it), as well as torch's ``[B, C]`` / ``[B, C, ...]``."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.dim() > 2 and input.shape[:-1] == target.shape:
            return super().forward(input.reshape(-1, input.shape[-1]), target.reshape(-1))
        return super().forward(input, target)


def planned_steps(cfg: TrainConfig, n_train: int | None, batches_per_epoch: int | None = None) -> int | None:
    """Optimizer steps the run will take: ``max_steps``, else epochs x steps per epoch, else None (no end, or
    a stream whose length is unknown)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    if batches_per_epoch is None and n_train is not None:
        batches_per_epoch = math.ceil(n_train / cfg.batch_size)
    if batches_per_epoch is None or not cfg.max_epochs:
        return None
    return math.ceil(batches_per_epoch / cfg.accumulate) * cfg.max_epochs


def n_classes(data: Any, task: str) -> int | None:
    if task != "classification":
        return None
    if isinstance(data, TensorDataset):
        return int(data.tensors[1].max()) + 1
    return None


def infer_task(loss_fn: Callable | None, data: Any, loss: str, own: Own) -> str:
    """classification, regression, or other (no target to judge: a model or step_fn that makes its own loss)."""
    if loss == "cross_entropy" or isinstance(loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss,
                                                       torch.nn.BCEWithLogitsLoss, torch.nn.BCELoss)):
        return "classification"
    if loss == "mse" or isinstance(loss_fn, (torch.nn.MSELoss, torch.nn.L1Loss, torch.nn.SmoothL1Loss,
                                             torch.nn.HuberLoss)):
        return "regression"
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        y = data.tensors[1]
    else:
        y = find_target(first_item(data), own.target_key)
        if y is None:
            return "other"
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError):
            return "other"
    return "classification" if not (torch.is_floating_point(y) or torch.is_complex(y)) else "regression"


def first_item(data: Any) -> Any:
    """The first item (or batch) of the data, read to infer the task (a stream is opened once more for it)."""
    source = data.dataset if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset) else data
    try:
        if isinstance(source, (IterableDataset, DataLoader)):
            return next(iter(source))
        return source[0]
    except Exception as e:  # noqa: BLE001 - the user's data raised: say where, and how to avoid the read
        raise ValueError(f"train_data: reading its first item to infer the task failed ({type(e).__name__}: {e}); "
                         f"allowed: data whose first item can be read, or pass task= and loss_fn=") from e


class EarlyStopping:
    """Patience on a monitored eval metric; also remembers the best value (for best-k checkpoints)."""

    def __init__(self, patience: int | None, mode: str, min_delta: float) -> None:
        self.patience, self.mode, self.min_delta = patience, mode, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.wait = 0

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def update(self, value: float, step: int) -> bool:
        """Record an eval value; True when patience has run out."""
        if self.improved(value):
            self.best, self.best_step, self.wait = value, step, 0
            return False
        self.wait += 1
        return self.patience is not None and self.wait >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "wait": self.wait}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_step, self.wait = state["best"], state["best_step"], int(state["wait"])


class ScalerHolder:
    """The GradScaler in force; a new enabled one is made when precision switches to fp16."""

    def __init__(self, device_type: str, precision: str) -> None:
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")

    def use(self, precision: str) -> None:
        if precision == "fp16" and not self.scaler.is_enabled():
            self.scaler = torch.amp.GradScaler(self.device_type)

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.scaler.is_enabled(), "state": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=bool(state["enabled"]))
        if state["enabled"] and state["state"]:
            self.scaler.load_state_dict(state["state"])
