"""The optimizer and the learning rate of a run: a built-in one by name, or the user's own, steered live.

``optimizer=`` is a name (sgd, adam, adamw), an ``Optimizer`` instance, or a factory ``fn(params)`` given
the model's trainable parameters. ``schedule=`` is a name (workbench.schedules), an ``LRScheduler`` (or
``ReduceLROnPlateau``) instance, a factory ``fn(optimizer) -> scheduler``, or a callable ``step -> multiplier``.
Param groups are kept as the user made them.

The base lr of a run (the ``lr`` control) is the lr of the first param group; every other group keeps its
ratio to it. How a live ``set(lr=x)`` composes with each kind of schedule:

- a name or a ``step -> multiplier`` callable: before each step every group gets
  ``x * ratio * multiplier(step)``;
- an ``LRScheduler``: the scheduler sets the lrs, stepped once after every optimizer step (as Hugging Face's
  Trainer does; ``ReduceLROnPlateau`` after every evaluation, with the monitored metric). ``set(lr=x)``
  multiplies every group's lr and the scheduler's own bases (``base_lrs``, ``initial_lr``, ``max_lr``,
  ``max_lrs``) by ``x / base``, so the schedule's shape carries on from the same step at the new scale and
  the groups keep their ratios.

``weight_decay`` sets the decay of every group that decays: a group made with ``weight_decay=0`` beside
groups that decay (the usual "no decay on biases and norms" split) stays at 0.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from .schedules import Schedule

CUSTOM = "custom"   # the config's name for an optimizer or schedule the user passed as an object
_BASE_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


def make_optimizer(cfg: Any, given: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The run's optimizer: the user's (instance or factory), or the config's built-in one."""
    if isinstance(given, torch.optim.Optimizer):
        return given
    if given is not None:
        if not callable(given):
            raise TypeError(f"optimizer: got {type(given).__name__}; allowed: sgd, adam, adamw, an Optimizer, or "
                            f"fn(params) -> Optimizer")
        opt = given(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer: the factory returned {type(opt).__name__}; allowed: a torch.optim.Optimizer")
        return opt
    if cfg.optimizer == CUSTOM:
        raise ValueError("optimizer: the config says 'custom' (the run used its own optimizer); allowed: pass the "
                         "same optimizer= (an Optimizer or a factory) again, or name sgd, adam or adamw")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def check_optimizer(opt: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """An optimizer must step this model's parameters (not a copy's)."""
    own = {id(p) for p in model.parameters()}
    stray = sum(1 for g in opt.param_groups for p in g["params"] if id(p) not in own)
    if stray:
        raise ValueError(f"optimizer: {stray} of its parameters are not the model's (was it made for another "
                         f"model or a copy?); allowed: an optimizer over model.parameters()")


def copy_training(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any = None) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """Copies of a model, its optimizer (same class, groups, hyper-parameters and state) and scheduler, the
    copies referring to each other. The optimizer is rebuilt rather than deep-copied: a scheduler wraps the
    optimizer's ``step`` in a function bound to the original, which a deep copy would carry over. The state
    dict is deep-copied before loading, since ``load_state_dict`` keeps the tensors it is given."""
    twin_model = copy.deepcopy(model)
    twin = dict(zip((id(p) for p in model.parameters()), twin_model.parameters()))
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [twin[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    twin_opt = type(optimizer)(groups)
    twin_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    twin_sched = copy.deepcopy(scheduler, memo={id(optimizer): twin_opt}) if scheduler is not None else None
    return twin_model, twin_opt, twin_sched


class LRControl:
    """Sets the learning rate of every param group (module docstring); a checkpoint holds its state."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Any, *, cfg: Any,
                 planned_steps: int | None) -> None:
        self.optimizer = optimizer
        groups = optimizer.param_groups
        first = float(groups[0]["lr"])
        self.ratios = [float(g["lr"]) / first if first > 0 else 1.0 for g in groups]
        decays = [float(g.get("weight_decay", 0.0)) for g in groups]
        self.decay_exempt = [d == 0.0 for d in decays] if any(d > 0 for d in decays) else [False] * len(groups)
        self.builtin: Schedule | None = None
        self.fn: Callable[[int], float] | None = None
        self.scheduler: Any = None
        if schedule is None or isinstance(schedule, str):
            self.builtin = Schedule(schedule or cfg.schedule, cfg.schedule_options, planned_steps, cfg.monitor_mode)
        elif isinstance(schedule, (LRScheduler, ReduceLROnPlateau)):
            self.scheduler = schedule
        elif callable(schedule):
            self.scheduler = _made_scheduler(schedule, optimizer)
            if self.scheduler is None:
                self.fn = schedule
        else:
            raise TypeError(f"schedule: got {type(schedule).__name__}; allowed: a name, an LRScheduler, "
                            f"fn(optimizer) -> LRScheduler, or fn(step) -> multiplier")
        if self.scheduler is not None and getattr(self.scheduler, "optimizer", optimizer) is not optimizer:
            raise ValueError("schedule: the scheduler was made for another optimizer; allowed: one made for the "
                             "run's optimizer (pass both, or a factory fn(optimizer))")
        self.base = self._base()

    @property
    def kind(self) -> str:
        if self.builtin is not None:
            return self.builtin.kind
        return CUSTOM

    def _base(self) -> float:
        s = self.scheduler
        if s is not None and getattr(s, "base_lrs", None):
            return float(s.base_lrs[0])
        group = self.optimizer.param_groups[0]
        return float(group.get("initial_lr", group["lr"])) if s is not None else float(group["lr"])

    # ------------------------------------------------------------------ the loop's side
    def before_step(self, step: int, base: float) -> float:
        """Set the groups' lrs for the step about to run (0-based) from the base lr; returns the first's."""
        groups = self.optimizer.param_groups
        if self.scheduler is None:
            factor = self.builtin.factor(step) if self.builtin is not None else float(self.fn(step))
            if not math.isfinite(factor) or factor < 0:
                raise ValueError(f"schedule: the multiplier for step {step} is {factor!r}; allowed: a finite "
                                 f"number >= 0")
            for group, ratio in zip(groups, self.ratios):
                group["lr"] = base * ratio * factor
        return float(groups[0]["lr"])

    def after_step(self) -> None:
        if self.scheduler is not None and not isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step()

    def observe(self, metric: float) -> dict[str, Any] | None:
        """After an evaluation: the plateau schedule's turn; what it changed (None: nothing)."""
        if isinstance(self.scheduler, ReduceLROnPlateau):
            before = float(self.optimizer.param_groups[0]["lr"])
            if math.isfinite(metric):
                self.scheduler.step(metric)
            after = float(self.optimizer.param_groups[0]["lr"])
            return {"lr": after, "by": "ReduceLROnPlateau"} if after < before else None
        if self.builtin is not None and self.builtin.observe(metric):
            return {"plateau_scale": self.builtin.plateau_scale}
        return None

    def set_base(self, value: float) -> None:
        """A live ``set(lr=value)``: the base lr the next steps use (module docstring)."""
        scale = value / self.base if self.base > 0 else 1.0
        self.base = float(value)
        if self.scheduler is None:
            return
        for group in self.optimizer.param_groups:
            for key in _BASE_KEYS:
                if isinstance(group.get(key), (int, float)) and not isinstance(group.get(key), bool):
                    group[key] = group[key] * scale
        for attr in ("base_lrs", "max_lrs"):
            values = getattr(self.scheduler, attr, None)
            if isinstance(values, list):
                setattr(self.scheduler, attr, [v * scale for v in values])
        last = getattr(self.scheduler, "_last_lr", None)
        if isinstance(last, list):
            self.scheduler._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]

    def set_weight_decay(self, value: float) -> None:
        for group, exempt in zip(self.optimizer.param_groups, self.decay_exempt):
            if not exempt:
                group["weight_decay"] = value

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"kind": self.kind, "base": self.base, "ratios": list(self.ratios)}
        if self.builtin is not None:
            state["schedule"] = self.builtin.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = {k: v for k, v in self.scheduler.state_dict().items() if _plain(v)}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "plateau_scale" in state:   # a schedule part that holds the built-in Schedule's own state alone
            state = {"kind": state["kind"], "schedule": state}
        if (state.get("kind") == CUSTOM) != (self.builtin is None):
            mine = "its own schedule or multiplier" if self.builtin is None else f"the {self.builtin.kind} schedule"
            theirs = "a user's schedule" if state.get("kind") == CUSTOM else f"the {state.get('kind')} schedule"
            raise ValueError(f"schedule: the checkpoint was made with {theirs}, this run has {mine}")
        if self.builtin is not None:
            self.builtin.load_state_dict(state["schedule"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(dict(state["scheduler"]))
        if "ratios" in state and len(state["ratios"]) == len(self.ratios):
            self.ratios = [float(r) for r in state["ratios"]]
        if "base" in state:
            self.base = float(state["base"])


def _made_scheduler(fn: Callable, optimizer: torch.optim.Optimizer) -> Any:
    """``fn(optimizer)`` when ``fn`` is a scheduler factory, else None (``fn`` is a step -> multiplier
    callable: given an optimizer it fails with a TypeError or gives no scheduler)."""
    try:
        got = fn(optimizer)
    except TypeError:
        return None
    return got if isinstance(got, (LRScheduler, ReduceLROnPlateau)) else None


def _plain(value: Any) -> bool:
    """Only plain data goes into a checkpoint (functions a LambdaLR keeps are the user's code, not state)."""
    if isinstance(value, (bool, int, float, str, type(None), torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False
