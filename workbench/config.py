"""Typed run configuration: defaults, validation with clear messages, YAML in and out.

A `TrainConfig` is plain data. It is saved into every run directory (``config.yaml``) and every
checkpoint, so a run can be read, repeated and resumed without the code that started it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "step", "plateau", "onecycle")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
LOSSES = ("auto", "cross_entropy", "mse")
MONITOR_MODES = ("min", "max")
DIVERGENCE_POLICIES = ("pause", "rollback", "stop", "ignore")
CHECKPOINT_WRITERS = ("auto", "process", "thread")


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name}: got {value!r}; allowed: {allowed}")


def check_number(name: str, value: Any, *, positive: bool = False, minimum: float | None = None,
                 maximum: float | None = None, allow_none: bool = False) -> float | None:
    """Validate a finite real number (bool and str are refused) and return it as float."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / torch scalars
            try:
                value = value.item()
            except Exception:  # noqa: BLE001 - fall through to the type error below
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            kind = "a finite number" + (" or None" if allow_none else "")
            raise TypeError(f"{name}: got {value!r} of type {type(value).__name__}; allowed: {kind}")
    value = float(value)
    if not math.isfinite(value):
        raise _fail(name, value, "a finite number")
    if positive and value <= 0:
        raise _fail(name, value, "a number > 0")
    if minimum is not None and value < minimum:
        raise _fail(name, value, f"a number >= {minimum:g}")
    if maximum is not None and value > maximum:
        raise _fail(name, value, f"a number <= {maximum:g}")
    return value


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False) -> int | None:
    """Validate an integer (a float with an integral value is accepted; bool and str are refused)."""
    if value is None and allow_none:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes, bool, int, float)):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" + (" or None" if allow_none else "")
        raise TypeError(f"{name}: got {value!r} of type {type(value).__name__}; allowed: {kind}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise _fail(name, value, "a whole number")
        value = int(value)
    bounds = []
    if minimum is not None and value < minimum:
        bounds.append(f">= {minimum}")
    if maximum is not None and value > maximum:
        bounds.append(f"<= {maximum}")
    if bounds:
        lo = f">= {minimum}" if minimum is not None else ""
        hi = f"<= {maximum}" if maximum is not None else ""
        raise _fail(name, value, "an integer " + " and ".join(b for b in (lo, hi) if b))
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Validate that ``value`` is one of ``choices`` (strings, case-insensitive)."""
    if not isinstance(value, str) or value.lower() not in choices:
        raise _fail(name, value, ", ".join(choices))
    return value.lower()


@dataclass
class TrainConfig:
    """Everything that defines a run. Unknown keys are refused with the list of valid ones.

    ``dataset``/``model`` name built-ins (see ``workbench.data`` and ``workbench.models``) and may be
    None when the caller passes its own objects to ``Trainer``. A step is one optimizer step, which
    consumes ``accumulate`` micro-batches of ``batch_size`` samples.
    """

    # data and model
    dataset: str | None = "digits"
    dataset_options: dict = field(default_factory=dict)
    val_fraction: float = 0.2
    normalize: bool = True
    model: str | None = "mlp"
    model_options: dict = field(default_factory=dict)
    loss: str = "auto"
    # optimisation
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    schedule_options: dict = field(default_factory=dict)
    batch_size: int = 64
    linear_scaling: bool = False
    precision: str = "fp32"
    accumulate: int = 1
    grad_clip: float | None = None
    # length and evaluation
    max_steps: int | None = None
    max_epochs: int | None = 20
    eval_every: int = 50
    eval_batch_size: int = 1024
    early_stopping_patience: int | None = None
    monitor: str = "val_loss"
    monitor_mode: str = "min"
    min_delta: float = 0.0
    # checkpoints and logging
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    keep_best: int = 1
    checkpoint_writer: str = "auto"  # process: a writer process (a GIL of its own); auto: that where it can run
    layer_every: int = 25
    sync_every: int = 50
    tensorboard: bool = True
    # diagnosis (workbench.diagnosis) and what to do when a run diverges
    diagnose: bool = True
    diagnosis_options: dict = field(default_factory=dict)
    on_divergence: str = "pause"
    rollback_lr_factor: float = 0.1
    max_rollbacks: int = 3
    good_state_every: int = 50
    good_states: int = 3
    # reproducibility and placement
    seed: int | None = None
    run_dir: str | None = None
    runs_root: str = "runs"
    name: str | None = None
    device: str = "auto"
    cpu_threads: int | None = None  # intra-op threads of a CPU run's trainer thread; None: chosen per model

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- validation
    def validate(self) -> "TrainConfig":
        """Check every field; raise ValueError/TypeError naming the field and what is allowed."""
        for name in ("dataset", "model", "run_dir", "name"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise TypeError(f"{name}: got {v!r}; allowed: a string or None")
        if self.run_dir is not None:
            self.run_dir = str(self.run_dir)
        for name in ("dataset_options", "model_options", "schedule_options", "diagnosis_options"):
            if not isinstance(getattr(self, name), Mapping):
                raise TypeError(f"{name}: got {getattr(self, name)!r}; allowed: a mapping of option -> value")
            setattr(self, name, dict(getattr(self, name)))
        self.val_fraction = check_number("val_fraction", self.val_fraction, minimum=0.0, maximum=0.9)
        for name in ("normalize", "linear_scaling", "tensorboard", "diagnose"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: got {getattr(self, name)!r}; allowed: true or false")
        self.loss = check_choice("loss", self.loss, LOSSES)
        self.optimizer = check_choice("optimizer", self.optimizer, OPTIMIZERS + ("custom",))
        self.lr = check_number("lr", self.lr, positive=True)
        self.momentum = check_number("momentum", self.momentum, minimum=0.0, maximum=1.0)
        self.weight_decay = check_number("weight_decay", self.weight_decay, minimum=0.0)
        self.schedule = check_choice("schedule", self.schedule, SCHEDULES + ("custom",))
        self.batch_size = check_int("batch_size", self.batch_size, minimum=1)
        self.precision = check_choice("precision", self.precision, PRECISIONS)
        self.accumulate = check_int("accumulate", self.accumulate, minimum=1)
        self.grad_clip = check_number("grad_clip", self.grad_clip, positive=True, allow_none=True)
        self.max_steps = check_int("max_steps", self.max_steps, minimum=1, allow_none=True)
        self.max_epochs = check_int("max_epochs", self.max_epochs, minimum=1, allow_none=True)
        self.eval_every = check_int("eval_every", self.eval_every, minimum=0)
        self.eval_batch_size = check_int("eval_batch_size", self.eval_batch_size, minimum=1)
        self.early_stopping_patience = check_int("early_stopping_patience", self.early_stopping_patience,
                                                 minimum=1, allow_none=True)
        if not isinstance(self.monitor, str) or not self.monitor:
            raise _fail("monitor", self.monitor, "an eval metric name such as val_loss or val_acc")
        self.monitor_mode = check_choice("monitor_mode", self.monitor_mode, MONITOR_MODES)
        self.min_delta = check_number("min_delta", self.min_delta, minimum=0.0)
        self.checkpoint_every = check_int("checkpoint_every", self.checkpoint_every, minimum=0, allow_none=True)
        self.keep_checkpoints = check_int("keep_checkpoints", self.keep_checkpoints, minimum=1)
        self.keep_best = check_int("keep_best", self.keep_best, minimum=0)
        self.layer_every = check_int("layer_every", self.layer_every, minimum=0)
        self.sync_every = check_int("sync_every", self.sync_every, minimum=1)
        self.checkpoint_writer = check_choice("checkpoint_writer", self.checkpoint_writer, CHECKPOINT_WRITERS)
        self.on_divergence = check_choice("on_divergence", self.on_divergence, DIVERGENCE_POLICIES)
        self.rollback_lr_factor = check_number("rollback_lr_factor", self.rollback_lr_factor, positive=True,
                                               maximum=1.0)
        self.max_rollbacks = check_int("max_rollbacks", self.max_rollbacks, minimum=0)
        self.good_state_every = check_int("good_state_every", self.good_state_every, minimum=1)
        self.good_states = check_int("good_states", self.good_states, minimum=1)
        self.seed = check_int("seed", self.seed, minimum=0, maximum=2**32 - 1, allow_none=True)
        self.cpu_threads = check_int("cpu_threads", self.cpu_threads, minimum=1, allow_none=True)
        if not isinstance(self.runs_root, (str, os.PathLike)):
            raise TypeError(f"runs_root: got {self.runs_root!r}; allowed: a folder path")
        self.runs_root = str(self.runs_root)
        dev = self.device
        if not isinstance(dev, str) or not (dev in ("auto", "cpu", "cuda", "mps")
                                            or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise _fail("device", dev, "auto, cpu, cuda, cuda:N, mps")
        if self.max_steps is None and self.max_epochs is None and self.schedule in ("cosine", "warmup_cosine",
                                                                                   "onecycle"):
            raise ValueError(f"schedule: {self.schedule!r} needs a run length; set max_steps or max_epochs")
        from .schedules import check_schedule_options  # local: schedules imports this module

        if self.schedule != "custom":  # the user's own schedule object takes no options from here
            check_schedule_options(self.schedule, self.schedule_options)
        from .diagnosis import default_detectors  # validates detector names and options

        default_detectors(self.diagnosis_options)
        return self

    # ----------------------------------------------------------------- conversion
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The valid keys, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from a mapping; an unknown key is an error that lists the valid ones."""
        if not isinstance(values, Mapping):
            raise TypeError(f"config: got {type(values).__name__}; allowed: a mapping of field -> value")
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            near = [f"{m[0]!r} for {k!r}" for k in unknown
                    if (m := difflib.get_close_matches(str(k), cls.field_names(), n=1, cutoff=0.75))]
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ValueError(f"config: unknown key(s) {', '.join(map(repr, unknown))}{hint}; "
                             f"valid keys: {', '.join(cls.field_names())}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON/checkpoint friendly)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some fields changed (unknown names are refused)."""
        d = self.to_dict()
        d.update(changes)
        return TrainConfig.from_dict(d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainConfig":
        """Read a YAML file of field: value pairs (unknown keys are refused)."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot be read as YAML ({_yaml_problem(e)}); allowed: a mapping of "
                             f"field: value pairs") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a mapping of field: value at the top level")
        data = {k: _yaml_number(v) for k, v in data.items()}
        data.pop("resolved", None)  # written by to_yaml for the reader; not a field
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{path}: {e}") from None

    def to_yaml(self, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None) -> None:
        """Write the config as YAML; ``extra`` (e.g. library versions) goes under a ``resolved`` key."""
        data = self.to_dict()
        if extra:
            data["resolved"] = dict(extra)
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def _yaml_problem(e: Exception) -> str:
    """What a YAML parser tripped over and where, without the snippet of the text it quotes (a file's
    content has no place in an error a page may show)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or getattr(e, 'reason', None) or type(e).__name__}{where}"


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads ``3e-4`` as a string; turn such number-looking strings into floats."""
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a CLI ``key=value`` override; the value is read as YAML (so 3e-4, true, null, [1,2] work)."""
    if "=" not in text:
        raise ValueError(f"--set: got {text!r}; allowed: key=value, e.g. lr=3e-4")
    key, _, raw = text.partition("=")
    key = key.strip()
    try:
        value = _yaml_number(yaml.safe_load(raw)) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"--set {text!r}: the value is not YAML ({_yaml_problem(e)}); allowed: a YAML value, "
                         f"e.g. lr=3e-4, max_steps=null, milestones=[10,20]") from None
    if "." in key:  # model_options.depth=12
        outer, _, inner = key.partition(".")
        return outer, {inner: value}
    return key, value
