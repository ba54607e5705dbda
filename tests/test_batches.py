"""workbench.batches: the step contract on every batch structure a user brings.

* Batches of tuples, dicts, dataclasses and NamedTuples, nested, move to the device whole.
* ``(x, y)`` pairs call ``loss_fn(model(x), y)``; dict batches call the model with keywords (Hugging Face
  style, ``.loss`` used) or pass the one input beside the target; ``step_fn`` returns a loss, a pair or a dict.
* The prediction is found in tensors, dicts, ModelOutput-like objects and tuples, or named by ``output_key``.
* A batch or output the contract cannot read is a BatchError that says what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
from torch import nn

from workbench.batches import BatchError, StepContract, count_samples, prediction, tensors_in, to_device


class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


@dataclass
class Item:
    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor


def test_nested_batches_move_whole_and_keep_their_types():
    batch = {"a": [torch.ones(2), (torch.zeros(2), "text")], "pair": Pair(torch.ones(2), torch.zeros(2)),
             "item": Item(torch.ones(2), torch.ones(2), torch.zeros(2)), "n": 3}
    moved = to_device(batch, torch.device("cpu"))
    assert isinstance(moved["pair"], Pair) and isinstance(moved["item"], Item)
    assert moved["a"][1][1] == "text" and moved["n"] == 3
    assert len(tensors_in(moved)) == 7
    assert count_samples({"labels": torch.zeros(5), "x": torch.zeros(5, 3)}) == 5


def test_pairs_dicts_hf_models_and_step_fns():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    want = nn.functional.cross_entropy(lin(x), y)
    c = StepContract(loss_fn=nn.CrossEntropyLoss())
    assert torch.allclose(c.compute(lin, (x, y)).loss, want)

    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, features):
            return {"hidden": features, "logits": self.lin(features)}
    done = c.compute(DictOut(), {"features": x, "label": y})
    assert torch.allclose(done.loss, want) and done.samples == 4 and done.prediction.shape == (4, 2)

    class HF(nn.Module):
        def forward(self, input_ids, labels=None):
            return {"loss": torch.tensor(7.0), "logits": lin(input_ids)}
    assert float(StepContract(loss_fn=None).compute(HF(), {"input_ids": x, "labels": y}).loss) == 7.0

    done = StepContract(loss_fn=None, step_fn=lambda m, b: {"loss": want, "logits": lin(b[0]), "target": b[2]}) \
        .compute(lin, (x, x, y))
    assert done.samples == 4 and torch.equal(done.target, y)
    named = StepContract(loss_fn=nn.MSELoss(), output_key="hidden").compute(DictOut(), {"features": x, "y": x})
    assert named.prediction is x and float(named.loss) == 0.0


def test_prediction_rule_and_output_key():
    t = torch.ones(2, 3)

    class Out:  # a ModelOutput-like object: keys() and []
        def keys(self):
            return ["loss", "logits"]

        def __getitem__(self, k):
            return {"loss": torch.tensor(1.0), "logits": t}[k]
    assert prediction(Out()) is t
    assert prediction((t, torch.zeros(1))) is t
    assert prediction({"loss": torch.tensor(1.0), "scores": t}) is t
    assert prediction({"a": torch.zeros(1), "b": t}, output_key="b") is t
    with pytest.raises(BatchError, match="output_key: got 'c'.*it has: a, b"):
        prediction({"a": torch.zeros(1), "b": t}, output_key="c")


@pytest.mark.parametrize("batch, model, match", [
    ((torch.ones(2, 3), torch.ones(2, 3), torch.ones(2)), nn.Linear(3, 1), "allowed: an \\(input, target\\) pair"),
    ({"a": torch.ones(2, 3), "b": torch.ones(2, 3)}, nn.Linear(3, 1), "do not match Linear.forward"),
    ({"x": torch.ones(2, 3)}, nn.Linear(3, 1), "with no target"),
])
def test_unreadable_batches_say_what_is_allowed(batch, model, match):
    with pytest.raises(BatchError, match=match):
        StepContract(loss_fn=nn.MSELoss()).compute(model, batch)


def test_step_fn_returning_something_else_is_refused():
    with pytest.raises(BatchError, match="step_fn: returned str; allowed: the loss"):
        StepContract(loss_fn=None, step_fn=lambda m, b: "loss").compute(nn.Linear(1, 1), (torch.ones(1, 1),) * 2)
