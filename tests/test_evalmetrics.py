"""workbench.evalmetrics: accuracy over any [B, ..., C] prediction, perplexity, binary F1/AUC, user metrics.

* Token accuracy counts every target element once and skips the padding label (-100): never above 1.
* F1 and ROC-AUC agree with scikit-learn's, ties included; perplexity is exp(mean loss) for sequences.
* User callables see all predictions and targets of the pass at once; torchmetrics-like objects are reset,
  updated per batch and computed; a metric that returns no single number is an error naming it.
"""
from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from workbench.evalmetrics import EvalMetrics, binary_f1, check_metrics, roc_auc


def test_token_accuracy_skips_padding_and_stays_at_most_one():
    logits = torch.zeros(2, 3, 5)
    logits[..., 1] = 1.0                       # predicts class 1 everywhere
    target = torch.tensor([[1, 1, -100], [1, 2, -100]])
    acc = EvalMetrics(classification=True, user={}).start(torch.device("cpu"))
    acc.add(torch.tensor(2.0), 2, logits, target)
    loss, accuracy, extra = acc.result()
    assert accuracy == pytest.approx(3 / 4) and extra["val_ppl"] == pytest.approx(math.exp(2.0))


def test_f1_and_auc_match_scikit_learn_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (200,), generator=g).float() / 4     # many ties
    labels = torch.rand(200, generator=g) < 0.3
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert binary_f1(scores, labels) == pytest.approx(f1_score(labels, scores > 0.5))
    assert math.isnan(roc_auc(scores, torch.zeros(200, dtype=torch.bool)))


def test_two_logits_and_one_logit_give_f1_and_auc():
    for pred in (torch.tensor([[2.0, -1.0], [-1.0, 2.0], [0.0, 1.0]]), torch.tensor([-3.0, 3.0, 1.0])):
        acc = EvalMetrics(classification=True, user={}).start(torch.device("cpu"))
        target = torch.tensor([0, 1, 1]) if pred.dim() == 2 else torch.tensor([0.0, 1.0, 1.0])
        acc.add(torch.tensor(0.5), 3, pred, target)
        _, accuracy, extra = acc.result()
        assert accuracy == 1.0 and extra["val_f1"] == 1.0 and extra["val_auc"] == 1.0


def test_user_callables_and_metric_objects():
    class Counter:
        def __init__(self):
            self.n, self.resets = 0, 0

        def reset(self):
            self.n, self.resets = 0, self.resets + 1

        def update(self, preds, target):
            self.n += len(target)

        def compute(self):
            return torch.tensor(float(self.n))
    counter = Counter()
    spec = EvalMetrics(classification=True, user=check_metrics({"seen": counter, "mean_target": lambda p, t: t.float().mean()}))
    for _ in range(2):
        acc = spec.start(torch.device("cpu"))
        acc.add(torch.tensor(1.0), 2, torch.zeros(2, 3), torch.tensor([0, 2]))
        acc.add(torch.tensor(1.0), 1, torch.zeros(1, 3), torch.tensor([2]))
        extra = acc.result()[2]
    assert extra["val_seen"] == 3.0 and counter.resets == 2
    assert extra["val_mean_target"] == pytest.approx(4 / 3)
    bad = EvalMetrics(classification=False, user=check_metrics({"vec": lambda p, t: p})).start(torch.device("cpu"))
    bad.add(torch.tensor(1.0), 2, torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="metrics.vec: returned a tensor of shape"):
        bad.result()


@pytest.mark.parametrize("metrics, match", [({"score": 3}, "metrics.score: got int"), ({"a b": len}, "letters"),
                                            ({"loss": len}, "built in")])
def test_bad_metrics_are_refused(metrics, match):
    with pytest.raises((TypeError, ValueError), match=match):
        check_metrics(metrics)
