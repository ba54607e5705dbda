"""The resumable sampler and the batch fetcher of a map-style Dataset.

The sampler's position is counted in samples, not batches: the order of an epoch is a seeded
permutation that does not depend on the batch size, so a batch-size change mid-epoch serves the
remaining samples in the new size (none seen twice, none skipped), and a checkpoint needs only
(epoch, position) to put the data stream back exactly where it was.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from .batches import to_device


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation of range(n) from its own generator.

    Public so that a hand-written loop can reproduce the trainer's data order exactly.
    """
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63 - 1))
    return torch.randperm(n, generator=g)


class EpochSampler:
    """Hands out index batches epoch by epoch; state is (epoch, position in samples)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        if n < 1:
            raise ValueError("train_data: got an empty data set (0 samples); allowed: at least 1 sample")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch = 0
        self.position = 0
        self._perm = epoch_permutation(n, seed, 0, shuffle)

    def next_indices(self, batch_size: int) -> torch.Tensor:
        """The next batch of indices, never crossing the end of the epoch (the last one may be short)."""
        if self.position >= self.n:
            self._next_epoch()
        idx = self._perm[self.position:self.position + batch_size]
        self.position += len(idx)
        return idx

    @property
    def epoch_done(self) -> bool:
        """True when every sample of the current epoch has been handed out."""
        return self.position >= self.n

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.position = 0
        self._perm = epoch_permutation(self.n, self.seed, self.epoch, self.shuffle)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch,
                "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(f"sampler: the checkpoint was made with {state['n']} training samples, "
                             f"this data set has {self.n}")
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = epoch_permutation(self.n, self.seed, self.epoch, self.shuffle)


class BatchFetcher:
    """Turns index tensors into batches on the run's device.

    A ``TensorDataset`` is indexed in one batched gather (no per-sample collate), and moved to the device
    once when it is small enough; any other map-style Dataset goes through ``collate_fn`` (default:
    torch's ``default_collate``), and the batch it makes, whatever its structure, is moved as a whole.
    """

    MAX_ON_DEVICE_BYTES = 2 * 1024**3

    def __init__(self, dataset: Dataset, device: torch.device, collate_fn: Callable | None = None) -> None:
        self.dataset = dataset
        self.device = device
        self.collate_fn = collate_fn or default_collate
        self.tensors: tuple[torch.Tensor, ...] | None = None
        if isinstance(dataset, TensorDataset) and collate_fn is None:
            size = sum(t.numel() * t.element_size() for t in dataset.tensors)
            if device.type == "cpu" or size <= self.MAX_ON_DEVICE_BYTES:
                self.tensors = tuple(t.to(device) for t in dataset.tensors)
            else:
                self.tensors = tuple(t.pin_memory() if device.type == "cuda" else t for t in dataset.tensors)
        self._non_blocking = device.type == "cuda"
        self._direct = self.tensors is not None and len(self.tensors) == 2 \
            and all(t.device == device for t in self.tensors)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def fetch(self, idx: torch.Tensor) -> Any:
        """The batch for these indices (a CPU index tensor)."""
        if self._direct and idx.device == self.device:  # tensors on the device already: one gather each
            x, y = self.tensors
            return x[idx], y[idx]
        if self.tensors is not None:
            t0 = self.tensors[0]
            if t0.device != idx.device:
                # non_blocking: a copy from pageable memory is staged without waiting for the GPU
                idx = idx.to(t0.device, non_blocking=True)
            batch = tuple(t[idx] for t in self.tensors)
            if batch[0].device != self.device:
                batch = tuple(b.to(self.device, non_blocking=self._non_blocking) for b in batch)
            return batch
        try:
            batch = self.collate_fn([self.dataset[i] for i in idx.tolist()])
        except RuntimeError as e:
            if "stack expects each tensor to be equal size" in str(e):
                raise ValueError(f"train_data: items of different lengths cannot be stacked into a batch ({e}); "
                                 f"allowed: pass collate_fn= that pads them (e.g. with "
                                 f"torch.nn.utils.rnn.pad_sequence)") from None
            raise
        return to_device(batch, self.device, self._non_blocking)
