"""workbench.build: from a config to a device, data, a model, a loss and an optimizer.

Arguments that cannot make a run are refused with the field and what is allowed (a batch larger than the
training set, an unknown data set, a device that is not there); a user's own map-style dataset without
tensors trains, and a loss such as MSE makes it a regression task.
"""
from __future__ import annotations

import pytest
import torch

from workbench import Trainer

from conftest import make_mlp


def test_arguments_that_cannot_make_a_run_are_refused_naming_the_field(tiny_data, runs_root):
    with pytest.raises(ValueError, match="batch_size.*1 to 200"):
        Trainer(model=make_mlp(), train_data=tiny_data, batch_size=500, runs_root=str(runs_root))
    with pytest.raises(ValueError, match="dataset"):
        Trainer(dataset="mnist", runs_root=str(runs_root))
    with pytest.raises(ValueError, match="device.*cuda"):
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        Trainer(dataset="wine", device="cuda", runs_root=str(runs_root))


def test_a_users_dataset_without_tensors_trains_as_a_regression_task(runs_root):
    class Squares(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            x = torch.tensor([i / 64.0])
            return x, x ** 2
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    tr = Trainer(model=model, train_data=Squares(), val_data=Squares(), loss_fn=torch.nn.MSELoss(), batch_size=16,
                 max_steps=40, max_epochs=None, eval_every=20, seed=0, runs_root=str(runs_root), tensorboard=False)
    tr.run()
    assert tr.task == "regression" and tr.evals["val_acc"].isna().all()
    assert tr.history["train_loss"].iloc[-1] < tr.history["train_loss"].iloc[0]
