"""Where a run's batches come from: the data the user passed, and what each kind of data supports.

=====================================  =====================  ======================================
``train_data``                         live batch-size change  resume mid-epoch
=====================================  =====================  ======================================
a map-style ``Dataset``                yes                     exact (the workbench owns the sampler)
(``collate_fn=`` optional)
an ``IterableDataset``                 no (batch size fixed)   exact, through torchdata's
                                                               ``StatefulDataLoader`` (replayed, or
                                                               the dataset's own ``state_dict``)
a ``StatefulDataLoader``               no                      exact (its ``state_dict``)
a ``DataLoader`` with a standard       no                      exact: rebuilt as a ``StatefulDataLoader``
sampler (shuffled or not)                                      with the same arguments, shuffled by
                                                               the run's seed
a ``DataLoader`` with its own sampler  no                      at the next epoch boundary (warned)
=====================================  =====================  ======================================

``val_data`` may be any of these too; it is read in order, once per evaluation.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler, TensorDataset

from .batches import to_device
from .sampler import BatchFetcher, EpochSampler

# torchdata's StatefulDataLoader calls a deprecated torch function at every new iterator (every epoch): a
# warning about torchdata's internals that the user can do nothing about.
warnings.filterwarnings("ignore", message=".*set_vital.*", category=UserWarning)

FIXED_BATCH = ("the data is {what}, whose batches are made by a loader; the workbench changes the batch size "
               "live only for a map-style Dataset, whose sampler it owns")


def kind_of(data: Any) -> str:
    if isinstance(data, DataLoader):
        return "loader"
    if isinstance(data, IterableDataset):
        return "iterable"
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return "map"
    raise TypeError(f"train_data: got {type(data).__name__}; allowed: a map-style Dataset (with __getitem__ and "
                    f"__len__), an IterableDataset, or a DataLoader")


def data_size(data: Any) -> int | None:
    """Samples in the data when it can say (None for a stream without a length)."""
    if isinstance(data, DataLoader):
        data = data.dataset
    try:
        return len(data)
    except TypeError:
        return None


class MapSource:
    """A map-style Dataset: the resumable sampler hands out indices, the fetcher makes batches of them."""

    batch_size_fixed: str | None = None
    exact_resume = True

    def __init__(self, data: Dataset, device: torch.device, seed: int, collate_fn: Callable | None) -> None:
        self.sampler = EpochSampler(len(data), seed)
        self.fetcher = BatchFetcher(data, device, collate_fn)
        self.n = len(data)
        self.dataset = data          # what the data checks read before the run (workbench.diagnosis)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def epoch_done(self) -> bool:
        return self.sampler.epoch_done

    def next(self, batch_size: int) -> tuple[Any, torch.Tensor]:
        """The next batch and its sample indices."""
        idx = self.sampler.next_indices(batch_size)
        return self.fetcher.fetch(idx), idx

    def probe(self, n: int) -> Any:
        return self.fetcher.fetch(torch.arange(min(n, self.n)))

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class LoaderSource:
    """An IterableDataset or a DataLoader, read through a ``StatefulDataLoader`` where one can carry the state.

    One batch is read ahead, so that the end of an epoch is known as soon as its last batch is served (a
    stream has no length to tell it); the position a checkpoint keeps is the one before that batch, so a
    resumed run reads it again."""

    def __init__(self, data: Any, device: torch.device, *, seed: int, batch_size: int,
                 collate_fn: Callable | None, max_epochs: int | None) -> None:
        self.device, self.max_epochs, self.seed = device, max_epochs, seed
        self.dataset = None          # a stream is not read ahead for data checks
        self.loader, what, self.exact_resume, self._generator = _stateful(data, seed, batch_size, collate_fn)
        self.batch_size_fixed = FIXED_BATCH.format(what=what)
        self.n = data_size(data)
        try:
            self.batches_per_epoch: int | None = len(self.loader)
        except TypeError:
            self.batches_per_epoch = None
        self.epoch, self.served = 0, 0
        self.exhausted = False
        self._it: Iterator | None = None
        self._ahead: tuple[Any, Any] | None = None   # (the next batch or _END, the loader's state before it)
        self._non_blocking = device.type == "cuda"

    @property
    def epoch_done(self) -> bool:
        return self.exhausted or (self.served > 0 and self._peek() is _END)

    def _peek(self) -> Any:
        if self._ahead is None:
            if self._it is None:
                if self._generator is not None:  # an epoch's order depends on the seed and the epoch alone
                    self._generator.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63 - 1))
                self._it = iter(self.loader)
            before = self.loader.state_dict() if self.exact_resume else None
            try:
                self._ahead = (next(self._it), before)
            except StopIteration:
                self._ahead = (_END, before)
        return self._ahead[0]

    def next(self, batch_size: int) -> tuple[Any, None] | None:
        if self.served > 0 and self._peek() is _END:
            if self.max_epochs is not None and self.epoch + 1 >= self.max_epochs:
                self.exhausted = True
                return None
            self.epoch, self.served, self._it, self._ahead = self.epoch + 1, 0, None, None
            _set_epoch(self.loader, self.epoch)
        batch = self._peek()
        if batch is _END:
            raise ValueError("train_data: the loader gave no batch in a whole epoch; allowed: data with at least "
                             "one batch")
        self._ahead = None
        self.served += 1
        return to_device(batch, self.device, self._non_blocking), None

    def probe(self, n: int) -> Any:
        return None  # reading a stream ahead would move it; the probe needs a fixed batch

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"kind": "loader", "epoch": self.epoch, "served": self.served,
                                 "exhausted": self.exhausted}
        if self.exact_resume:
            state["loader"] = self._ahead[1] if self._ahead is not None else self.loader.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "loader":
            raise ValueError("sampler: the checkpoint was made with a map-style Dataset, this run reads a "
                             "loader or stream")
        self.epoch, self.served = int(state["epoch"]), int(state["served"])
        self.exhausted, self._it, self._ahead = bool(state.get("exhausted", False)), None, None
        _set_epoch(self.loader, self.epoch)
        if self.exact_resume and "loader" in state:
            self.loader.load_state_dict(dict(state["loader"]))
        elif self.served:
            warnings.warn(f"train_data: this loader cannot carry its position, so the run resumes at the start of "
                          f"epoch {self.epoch + 1} (the rest of epoch {self.epoch} is skipped)", stacklevel=3)
            self._ahead = (_END, None)


_END = object()   # the read-ahead found the end of the epoch


def _stateful(data: Any, seed: int, batch_size: int,
              collate_fn: Callable | None) -> tuple[Any, str, bool, torch.Generator | None]:
    """(the loader to read, what it is, whether it resumes exactly, the generator of ours it draws from)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    # Each new iterator draws a base seed from the loader's generator, or from the global RNG when it has
    # none, which would shift the draws of the model's dropout by one at every epoch start: a private
    # generator keeps the global stream the same whether an epoch began in this process or before a resume.
    own = torch.Generator().manual_seed(seed)  # reseeded by LoaderSource at each epoch
    if isinstance(data, StatefulDataLoader):
        if data.generator is not None:
            return data, "a StatefulDataLoader", True, None
        data.generator = own
        return data, "a StatefulDataLoader", True, own
    if isinstance(data, DataLoader):
        sampler = getattr(data.batch_sampler, "sampler", None)
        standard = type(data.batch_sampler).__name__ == "BatchSampler" and \
            type(sampler) in (RandomSampler, SequentialSampler)
        if isinstance(data.dataset, IterableDataset) or standard:
            shuffle = isinstance(sampler, RandomSampler)
            return StatefulDataLoader(
                data.dataset, batch_size=data.batch_size, shuffle=shuffle if not isinstance(
                    data.dataset, IterableDataset) else None,
                num_workers=data.num_workers, collate_fn=data.collate_fn, pin_memory=data.pin_memory,
                drop_last=data.drop_last, timeout=data.timeout, worker_init_fn=data.worker_init_fn,
                multiprocessing_context=data.multiprocessing_context,
                generator=own,
                prefetch_factor=data.prefetch_factor if data.num_workers else None,
                persistent_workers=data.persistent_workers), "a DataLoader", True, own
        mine = data.generator is None
        if mine:
            data.generator = own
        warnings.warn("train_data: a DataLoader with its own sampler cannot carry its position in an epoch; a "
                      "resumed run starts at the next epoch boundary (pass a StatefulDataLoader, or a map-style "
                      "Dataset, for an exact resume)", stacklevel=4)
        return data, "a DataLoader", False, own if mine else None
    return StatefulDataLoader(data, batch_size=batch_size, collate_fn=collate_fn, generator=own), \
        "an IterableDataset", True, own


def _set_epoch(loader: Any, epoch: int) -> None:
    """A DistributedSampler-like sampler (or dataset) reshuffles per epoch when told which one it is."""
    for obj in (getattr(loader, "sampler", None), getattr(loader, "dataset", None)):
        if callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)


def make_source(data: Any, device: torch.device, *, seed: int, batch_size: int, collate_fn: Callable | None,
                max_epochs: int | None) -> MapSource | LoaderSource:
    kind = kind_of(data)
    if kind == "map":
        return MapSource(data, device, seed, collate_fn)
    if kind == "loader" and collate_fn is not None:
        raise ValueError("collate_fn: the DataLoader passed as train_data has its own; allowed: collate_fn with a "
                         "Dataset, or set it on the DataLoader")
    return LoaderSource(data, device, seed=seed, batch_size=batch_size, collate_fn=collate_fn,
                        max_epochs=max_epochs)


def eval_batches(data: Any, device: torch.device, batch_size: int, collate_fn: Callable | None,
                 fetcher: BatchFetcher | None = None) -> Iterator[Any]:
    """The validation data in order, one batch at a time, on the device."""
    if fetcher is not None:
        n = len(fetcher)
        for i in range(0, n, batch_size):
            yield fetcher.fetch(torch.arange(i, min(i + batch_size, n)))
        return
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size,
                                                                  collate_fn=collate_fn)
    non_blocking = device.type == "cuda"
    for batch in loader:
        yield to_device(batch, device, non_blocking)


def is_tensor_pairs(data: Any) -> bool:
    """The fast path: a TensorDataset of (input, target)."""
    return isinstance(data, TensorDataset) and len(data.tensors) == 2
