"""workbench.loaders: what each kind of train_data supports.

* A map-style Dataset gets the resumable sampler; an IterableDataset, a DataLoader and a StatefulDataLoader
  get a LoaderSource whose batch size is fixed (and says why) and whose state resumes mid-epoch exactly.
* A DataLoader with its own sampler resumes at the next epoch boundary, with a warning.
* An epoch of a loader ends where the data ends, seen as soon as its last batch is served.
* Items of different lengths without a collate_fn name the fix.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from workbench.loaders import LoaderSource, MapSource, make_source

CPU = torch.device("cpu")
DATA = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))


def take(src, n):
    return [src.next(3)[0][1].tolist() for _ in range(n)]


def test_kinds_and_what_they_support():
    assert isinstance(make_source(DATA, CPU, seed=0, batch_size=3, collate_fn=None, max_epochs=None), MapSource)
    src = make_source(DataLoader(DATA, batch_size=3, shuffle=True), CPU, seed=0, batch_size=3, collate_fn=None,
                      max_epochs=None)
    assert isinstance(src, LoaderSource) and "map-style Dataset" in src.batch_size_fixed
    with pytest.raises(TypeError, match="train_data: got int; allowed: a map-style Dataset"):
        make_source(5, CPU, seed=0, batch_size=3, collate_fn=None, max_epochs=None)


def test_loader_resumes_mid_epoch_and_across_epochs_exactly():
    def fresh():
        return LoaderSource(DataLoader(DATA, batch_size=3, shuffle=True), CPU, seed=1, batch_size=3,
                            collate_fn=None, max_epochs=None)
    a = fresh()
    first = take(a, 2)
    state = a.state_dict()
    rest = take(a, 8)                        # the rest of epoch 0 (4 batches of 3, 3, 3, 1) and more
    b = fresh()
    b.load_state_dict(state)
    assert take(b, 8) == rest
    assert sorted(sum(first + rest[:2], [])) == list(range(10))
    assert a.epoch == 2 and a.served == 2


def test_epoch_end_is_known_at_the_last_batch_and_max_epochs_stops():
    src = LoaderSource(DataLoader(DATA, batch_size=4), CPU, seed=0, batch_size=4, collate_fn=None, max_epochs=1)
    done = []
    for _ in range(3):
        src.next(4)
        done.append(src.epoch_done)
    assert done == [False, False, True]
    assert src.next(4) is None and src.exhausted


class Reverse(Sampler):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))

    def __len__(self):
        return self.n


def test_a_custom_sampler_resumes_at_the_next_epoch_with_a_warning():
    with pytest.warns(UserWarning, match="its own sampler cannot carry its position"):
        src = LoaderSource(DataLoader(DATA, batch_size=3, sampler=Reverse(10)), CPU, seed=0, batch_size=3,
                           collate_fn=None, max_epochs=None)
    take(src, 2)
    state = src.state_dict()
    with pytest.warns(UserWarning, match="resumes at the start of epoch 1"):
        again = LoaderSource(DataLoader(DATA, batch_size=3, sampler=Reverse(10)), CPU, seed=0, batch_size=3,
                             collate_fn=None, max_epochs=None)
        again.load_state_dict(state)
    assert again.next(3)[0][1].tolist() == [9, 8, 7] and again.epoch == 1


def test_items_of_different_lengths_name_the_fix():
    ragged = [(torch.ones(i + 1), torch.tensor(0)) for i in range(4)]
    src = make_source(ragged, CPU, seed=0, batch_size=4, collate_fn=None, max_epochs=None)
    with pytest.raises(ValueError, match="pass collate_fn= that pads them"):
        src.next(4)
