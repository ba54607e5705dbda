"""What a batch is, and how a step turns one into a loss: the step contract.

A batch may be a tuple, a list, a dict, a dataclass or a NamedTuple, nested in any way; it is moved to the
device as a whole. How the loss comes out of it, in this order:

1. ``step_fn(model, batch)`` when the user gave one (Lightning's ``training_step``). It returns the loss, or
   ``(loss, outputs)``, or a mapping with ``"loss"`` (and, for metrics, ``"outputs"``/``"logits"`` and
   ``"target"``/``"labels"``).
2. An ``(input, target)`` pair (a tuple, list or two-field NamedTuple): ``loss_fn(prediction, target)`` on
   ``model(input)``.
3. A mapping (a dict, or a dataclass read as one): the model is called with the batch's keys as keyword
   arguments when its ``forward`` takes them all (Hugging Face style: ``labels`` included), else with the
   keys other than the target; a single remaining key is passed positionally. The loss is the output's
   ``.loss`` / ``["loss"]`` when the model computed one (HF models given ``labels``), else
   ``loss_fn(prediction, target)``. The target is the first of ``TARGET_KEYS`` the batch has (or
   ``target_key``).

The prediction that ``loss_fn`` and the metrics read from a model's output: the output itself when it is a
tensor; ``output_key`` when given; else a mapping's or ModelOutput's ``"logits"``, or its first tensor that
is not the loss; else a tuple's first tensor.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import torch

TARGET_KEYS = ("labels", "label", "targets", "target", "y")
PREDICTION_KEYS = ("logits", "predictions", "prediction", "preds", "outputs", "output", "y_hat")


class BatchError(TypeError):
    """A batch, output or step function result the contract cannot read; the message says what is allowed."""


# ---------------------------------------------------------------------------- moving and measuring
def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``obj`` with every tensor in it on ``device`` (structure and container types kept)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        moved = {k: to_device(v, device, non_blocking) for k, v in obj.items()}
        return moved if type(obj) is dict else _rebuild_mapping(obj, moved)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(to_device(v, device, non_blocking) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device, non_blocking)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _rebuild_mapping(obj: Mapping, moved: dict) -> Any:
    try:
        return type(obj)(moved)
    except Exception:  # noqa: BLE001 - a mapping type that cannot be rebuilt from a dict stays a dict
        return moved


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor in ``obj`` (tuples, lists, dicts, dataclasses, nested), depth-first."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    else:
        return []
    return [t for v in items for t in tensors_in(v)]


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor met walking ``obj`` depth-first (None when it holds none)."""
    found = tensors_in(obj)
    return found[0] if found else None


def count_samples(batch: Any) -> int:
    """Samples in a batch: the leading size of its target when it has one, else of its first tensor."""
    target = find_target(batch)
    t = target if isinstance(target, torch.Tensor) else first_tensor(batch)
    if t is None or t.dim() == 0:
        raise BatchError(f"batch: found no tensor with a batch dimension in a {type(batch).__name__}; allowed: "
                         f"tensors (or numbers a DataLoader collates into tensors) inside tuples, dicts, "
                         f"dataclasses or NamedTuples")
    return int(t.shape[0])


def as_mapping(batch: Any) -> Mapping | None:
    """A mapping view of a dict or dataclass batch (None for anything else)."""
    if isinstance(batch, Mapping):
        return batch
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return None


def is_pair(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2


def find_target(batch: Any, target_key: str | None = None) -> Any:
    """The target of a batch: the second of a pair, or a mapping's target key (None when it has none)."""
    if is_pair(batch):
        return batch[1]
    m = as_mapping(batch)
    if m is None:
        return None
    if target_key is not None:
        return m.get(target_key)
    for key in TARGET_KEYS:
        if key in m:
            return m[key]
    return None


# ---------------------------------------------------------------------------- reading outputs
def prediction(output: Any, output_key: str | None = None) -> torch.Tensor | None:
    """The tensor of a model's output that losses and metrics read (module docstring's rule)."""
    if isinstance(output, torch.Tensor):
        return output
    m = as_mapping(output)
    if m is None and hasattr(output, "keys") and hasattr(output, "__getitem__"):  # ModelOutput-like
        m = {k: output[k] for k in output.keys()}
    if output_key is not None:
        value = m.get(output_key) if m is not None else getattr(output, output_key, None)
        if not isinstance(value, torch.Tensor):
            have = ", ".join(map(str, m)) if m is not None else type(output).__name__
            raise BatchError(f"output_key: got {output_key!r}, but the model's output has no tensor there "
                             f"(it has: {have})")
        return value
    if m is not None:
        for key in PREDICTION_KEYS:
            if isinstance(m.get(key), torch.Tensor):
                return m[key]
        for key, value in m.items():
            if key != "loss" and isinstance(value, torch.Tensor):
                return value
        return None
    if isinstance(output, (list, tuple)):
        return first_tensor(output)
    return None


def output_loss(output: Any) -> torch.Tensor | None:
    """The loss a model computed itself (HF style: ``.loss`` or ``["loss"]``), else None."""
    if isinstance(output, torch.Tensor):
        return None
    if isinstance(output, Mapping):
        loss = output.get("loss")
    else:
        loss = getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


# ---------------------------------------------------------------------------- the step contract
@dataclasses.dataclass
class Computed:
    """One forward pass: the loss to back-propagate, and what metrics read (either may be None)."""

    loss: torch.Tensor
    prediction: torch.Tensor | None
    target: Any
    samples: int


class StepContract:
    """Turns a batch into a loss (and a prediction and target for metrics), by the module docstring's rule.

    How a mapping batch is passed to the model is worked out once per set of keys (from ``forward``'s
    signature) and remembered."""

    def __init__(self, *, loss_fn: Callable | None, step_fn: Callable | None = None,
                 output_key: str | None = None, target_key: str | None = None) -> None:
        self.loss_fn, self.step_fn = loss_fn, step_fn
        self.output_key, self.target_key = output_key, target_key
        self._calls: dict[tuple, tuple[str, tuple[str, ...]]] = {}

    def compute(self, model: torch.nn.Module, batch: Any) -> Computed:
        if self.step_fn is not None:
            return self._user_step(model, batch)
        if is_pair(batch):
            x, y = batch
            out = model(x)
            pred = prediction(out, self.output_key)
            return Computed(self._loss(out, pred, y, "an (input, target) pair"), pred, y, _leading(y, batch))
        m = as_mapping(batch)
        if m is None:
            raise BatchError(self._unknown(batch))
        target = find_target(m, self.target_key)
        out = self._call_with_mapping(model, m)
        pred = prediction(out, self.output_key)
        loss = output_loss(out)
        if loss is None:
            loss = self._loss(out, pred, target, "a dict batch")
        return Computed(loss, pred, target, count_samples(m) if target is None else _leading(target, m))

    def forward(self, model: torch.nn.Module, batch: Any) -> Any:
        """The model's output on ``batch`` (for probes): the input of a pair, or the mapping as above."""
        if is_pair(batch):
            return model(batch[0])
        m = as_mapping(batch)
        if m is None:
            raise BatchError(self._unknown(batch))
        return self._call_with_mapping(model, m)

    # ------------------------------------------------------------------ helpers
    def _user_step(self, model: torch.nn.Module, batch: Any) -> Computed:
        got = self.step_fn(model, batch)
        pred, target = None, None
        if isinstance(got, torch.Tensor):
            loss = got
        elif isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], torch.Tensor):
            loss, out = got
            pred = prediction(out, self.output_key)
        elif isinstance(got, Mapping) and isinstance(got.get("loss"), torch.Tensor):
            loss = got["loss"]
            out = next((got[k] for k in ("outputs", "logits", "output", "preds") if k in got), None)
            pred = prediction(out, self.output_key) if out is not None else None
            target = next((got[k] for k in ("target", "targets", "labels", "y") if k in got), None)
        else:
            raise BatchError(f"step_fn: returned {type(got).__name__}; allowed: the loss (a tensor), "
                             f"(loss, outputs), or a dict with 'loss' (and 'outputs'/'logits', 'target'/'labels')")
        if target is None:
            target = find_target(batch, self.target_key)
        samples = _leading(target, batch) if isinstance(target, torch.Tensor) and target.dim() else count_samples(batch)
        return Computed(loss, pred, target, samples)

    def _loss(self, out: Any, pred: torch.Tensor | None, target: Any, what: str) -> torch.Tensor:
        if self.loss_fn is None:
            raise BatchError(f"loss: {what} whose model output has no .loss and no loss_fn was given; allowed: "
                             f"pass loss_fn=, a model that returns .loss / ['loss'] (given 'labels'), or step_fn=")
        if target is None:
            raise BatchError(f"batch: {what} with no target (looked for keys {', '.join(TARGET_KEYS)}); allowed: "
                             f"one of those keys, target_key=, a model that returns .loss, or step_fn=")
        if pred is None:
            raise BatchError(f"output: the model returned {type(out).__name__} with no tensor to give loss_fn; "
                             f"allowed: a tensor, a dict/ModelOutput with 'logits', or output_key=")
        return self.loss_fn(pred, target)

    def _call_with_mapping(self, model: torch.nn.Module, m: Mapping) -> Any:
        keys = tuple(m)
        plan = self._calls.get(keys)
        if plan is None:
            plan = self._calls[keys] = self._plan(model, keys)
        how, names = plan
        if how == "positional":
            return model(m[names[0]])
        return model(**{k: m[k] for k in names})

    def _plan(self, model: torch.nn.Module, keys: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        named = {n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                            inspect.Parameter.KEYWORD_ONLY)}
        if takes_any or set(keys) <= named:
            return "keywords", keys
        target = self.target_key or next((k for k in TARGET_KEYS if k in keys), None)
        inputs = tuple(k for k in keys if k != target)
        if inputs and set(inputs) <= named:
            return "keywords", inputs
        if len(inputs) == 1:
            return "positional", inputs
        raise BatchError(f"batch: the keys {', '.join(keys)} do not match {type(model).__name__}.forward"
                         f"({', '.join(params)}); allowed: keys named like forward's arguments, one input key "
                         f"beside the target, or step_fn=")

    @staticmethod
    def _unknown(batch: Any) -> str:
        return (f"batch: got a {type(batch).__name__}; allowed: an (input, target) pair, a dict (or dataclass) "
                f"batch, or any batch with step_fn=(model, batch) -> loss")


def _leading(t: Any, batch: Any) -> int:
    if isinstance(t, torch.Tensor) and t.dim() > 0:
        return int(t.shape[0])
    if isinstance(t, (list, tuple)):
        return len(t)
    return count_samples(batch)
