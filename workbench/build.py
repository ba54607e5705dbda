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
from torch.utils.data import Dataset, TensorDataset

from .config import TrainConfig
from .controls import precision_problem, resolve_precision
from .data import load_dataset
from .models import build_model
from .rundir import new_run_dir


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
    train_data: Dataset
    val_data: Dataset | None
    model: torch.nn.Module
    loss_fn: Callable
    own_model: bool                       # the user passed the model (a fork then needs a copy of it)
    data_info: dict[str, Any] = field(default_factory=dict)
    run_dir: Path = Path(".")


def build_parts(cfg: TrainConfig, *, model: torch.nn.Module | None, train_data: Dataset | None,
                val_data: Dataset | None, loss_fn: Callable | None, task: str | None) -> Parts:
    """Resolve the device and precision, load or check the data, build or place the model and the loss, and
    make the run directory. Seeds every generator first, so a built-in model starts from the seed."""
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
        task = task or infer_task(loss_fn, train_data, cfg.loss)
    if task not in ("classification", "regression"):
        raise ValueError(f"task: got {task!r}; allowed: classification, regression")
    if cfg.batch_size > len(train_data):
        raise ValueError(f"batch_size: got {cfg.batch_size}; allowed: 1 to {len(train_data)} (the training "
                         f"set's size)")

    own_model = model is not None
    if model is None:
        if cfg.model is None:
            raise ValueError("model: none given and no model passed; name a built-in model (mlp, cnn, logreg) "
                             "or pass model=")
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, in_features=data_info["n_features"], out_features=out_features,
                            **cfg.model_options)
    if loss_fn is None:
        name = cfg.loss if cfg.loss != "auto" else ("cross_entropy" if task == "classification" else "mse")
        loss_fn = torch.nn.CrossEntropyLoss() if name == "cross_entropy" else torch.nn.MSELoss()

    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "tb").mkdir(exist_ok=True)
    else:
        run_dir = new_run_dir(cfg.runs_root, cfg.name)
        cfg = cfg.replace(run_dir=str(run_dir))
    return Parts(cfg=cfg, device=device, precision=precision, task=task, train_data=train_data, val_data=val_data,
                 model=model.to(device), loss_fn=loss_fn, own_model=own_model, data_info=data_info, run_dir=run_dir)


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def planned_steps(cfg: TrainConfig, n_train: int) -> int | None:
    """Optimizer steps the run will take: ``max_steps``, else epochs x steps per epoch, else None (no end)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = math.ceil(n_train / cfg.batch_size / cfg.accumulate)
    return per_epoch * cfg.max_epochs if cfg.max_epochs else None


def n_classes(data: Dataset, task: str) -> int | None:
    if task != "classification":
        return None
    if isinstance(data, TensorDataset):
        return int(data.tensors[1].max()) + 1
    return None


def infer_task(loss_fn: Callable | None, data: Dataset, loss: str) -> str:
    if loss == "cross_entropy" or isinstance(loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)):
        return "classification"
    if loss == "mse" or isinstance(loss_fn, (torch.nn.MSELoss, torch.nn.L1Loss, torch.nn.SmoothL1Loss,
                                             torch.nn.HuberLoss, torch.nn.BCEWithLogitsLoss)):
        return "regression"
    y = data.tensors[1] if isinstance(data, TensorDataset) else torch.as_tensor(data[0][1])
    return "classification" if not torch.is_floating_point(y) else "regression"


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
