"""workbench.optim: the run's optimizer and the learning rate of every param group.

* With a built-in schedule or a multiplier, each group gets base x its ratio x the multiplier.
* A user's LRScheduler sets the lrs; set_base rescales the groups and the scheduler's bases (OneCycleLR's
  max_lr too), so the shape goes on at the new scale; ReduceLROnPlateau steps on the monitored metric.
* Its state survives state_dict / load_state_dict into a fresh control; a checkpoint of another kind of
  schedule is refused naming both; an optimizer over another model's parameters is refused.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from workbench.config import TrainConfig
from workbench.optim import LRControl, check_optimizer, copy_training

CFG = TrainConfig(dataset=None, model=None, schedule="cosine", max_steps=100)


def groups():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    return m, torch.optim.SGD([{"params": m[0].parameters(), "lr": 0.1}, {"params": m[1].parameters(), "lr": 0.3}])


def test_builtin_schedule_keeps_group_ratios():
    _, opt = groups()
    c = LRControl(opt, None, cfg=CFG, planned_steps=100)
    assert c.base == 0.1 and c.ratios == pytest.approx([1.0, 3.0])
    c.before_step(50, 0.2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.3])     # half-way down a cosine


def test_user_scheduler_rescaled_live_and_restored():
    m, opt = groups()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1.0, 3.0], total_steps=20)
    c = LRControl(opt, sched, cfg=CFG, planned_steps=20)
    for _ in range(5):
        opt.step()
        c.after_step()
    before = [g["lr"] for g in opt.param_groups]
    c.set_base(c.base * 2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2 * v for v in before])
    opt.step()
    c.after_step()
    state = c.state_dict()
    m2, opt2 = groups()
    c2 = LRControl(opt2, torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=[1.0, 3.0], total_steps=20), cfg=CFG,
                   planned_steps=20)
    opt2.load_state_dict(opt.state_dict())
    c2.load_state_dict(state)
    for ctl, o in ((c, opt), (c2, opt2)):
        o.step()
        ctl.after_step()
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])
    with pytest.raises(ValueError, match="schedule: the checkpoint was made with a user's schedule, this run has "
                                         "the cosine schedule"):
        LRControl(groups()[1], None, cfg=CFG, planned_steps=20).load_state_dict(state)


def test_plateau_scheduler_steps_on_the_metric():
    _, opt = groups()
    c = LRControl(opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5), cfg=CFG,
                  planned_steps=None)
    assert c.observe(1.0) is None
    assert c.observe(2.0) == {"lr": 0.05, "by": "ReduceLROnPlateau"}


def test_bad_multiplier_and_foreign_optimizer_are_refused():
    m, opt = groups()
    c = LRControl(opt, lambda step: float("nan"), cfg=CFG, planned_steps=10)
    with pytest.raises(ValueError, match="schedule: the multiplier for step 0 is nan"):
        c.before_step(0, 0.1)
    with pytest.raises(ValueError, match="optimizer: 4 of its parameters are not the model's"):
        check_optimizer(opt, nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.filterwarnings("ignore:Seems like:UserWarning")
def test_copies_refer_to_each_other_and_leave_the_original_alone():
    m, opt = groups()
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    m2, opt2, sched2 = copy_training(m, opt, sched)
    assert sched2.optimizer is opt2
    assert {id(p) for g in opt2.param_groups for p in g["params"]} == {id(p) for p in m2.parameters()}
    m2[0].weight.grad = torch.ones(2, 2)
    opt2.step()
    sched2.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.3])
    assert not torch.equal(m[0].weight, m2[0].weight)
