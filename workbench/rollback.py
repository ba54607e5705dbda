"""Rollback: a ring of recent good states kept on the device, and going back to one after a divergence.

The recipe large runs use (PaLM, OPT): restore a state from before the spike, keep the data stream where it
is (the batches around the spike are skipped), lower the learning rate and go on. The step counter keeps
counting up, so the history stays one line with the rollback marked on it.
"""
from __future__ import annotations

import copy
import math
from collections import deque
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from . import checkpoint as ck

ROLLBACK_KEYS = ("model", "optimizer", "schedule", "scaler", "rng", "early_stopping")


class GoodStates:
    """Up to ``size`` in-memory copies of the rollback parts, taken when the last loss was finite; the newest
    finite checkpoint stands in when the ring is empty."""

    def __init__(self, size: int, parts: Mapping[str, Any], controls: Any, *, lr_factor: float,
                 device: torch.device, folder: Path, wait_for_saves: Callable[[], None],
                 after_load: Callable[[], None], event: Callable[..., None]) -> None:
        self.ring: deque[tuple[int, dict]] = deque(maxlen=size)
        self.parts, self.controls, self.lr_factor = parts, controls, lr_factor
        self.device, self.folder = device, folder
        self._wait_for_saves, self._after_load, self._event = wait_for_saves, after_load, event
        self.rollbacks = 0

    def keep(self, step: int, last_loss: float | None) -> None:
        """Keep a copy of the state (on the device) when the last loss is finite and the weights are too."""
        if last_loss is None or not math.isfinite(last_loss):
            return
        state = {k: clone(self.parts[k].state_dict()) for k in ROLLBACK_KEYS}
        state["lr"] = self.controls.lr
        if not ck.has_nonfinite(state["model"]):
            self.ring.append((step, state))

    def rollback(self, step: int, source: str, lr: float | None = None) -> bool:
        """Restore the newest good state from before the detection window and lower the lr by ``lr_factor``,
        never above the lr in force at that state (or set ``lr``). False when there is nothing to go back to."""
        # the newest state from before the detection window; newer ones may already be on the way up
        earlier = [t for t in self.ring if t[0] <= step - 5]
        target = earlier[-1] if earlier else (self.ring[0] if self.ring else None)
        if target is not None:
            while self.ring and self.ring[-1][0] > target[0]:
                self.ring.pop()
        else:
            target = self._newest_finite_checkpoint()
        if target is None:
            return False
        good_step, state = target
        for k in ROLLBACK_KEYS:
            self.parts[k].load_state_dict(clone(state[k]))
        self._after_load()
        old_lr = self.controls.lr
        new_lr = lr if lr is not None else min(old_lr * self.lr_factor, state["lr"])
        self.controls.lr = new_lr
        self.rollbacks += 1
        self._event("rollback", source, {"from_step": step, "to_state_of_step": good_step, "lr_old": old_lr,
                                         "lr_new": new_lr, "rollbacks": self.rollbacks}, step + 1)
        self._event("control", source, {"field": "lr", "old": old_lr, "new": new_lr}, step + 1)
        return True

    def _newest_finite_checkpoint(self) -> tuple[int, dict] | None:
        self._wait_for_saves()  # saves already logged but still being written count too
        for step, path in ck.checkpoint_files(self.folder):
            try:
                ckpt = ck.load_checkpoint(path, map_location=self.device)
            except ck.CheckpointError:
                continue
            if not ck.has_nonfinite(ckpt["state"]["model"]):
                return step, {**{k: ckpt["state"][k] for k in ROLLBACK_KEYS}, "lr": ckpt["state"]["controls"]["lr"]}
        return None


def clone(obj: Any) -> Any:
    """Deep copy with tensors cloned on their device (fast in-memory snapshots)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone(v) for v in obj)
    return copy.deepcopy(obj)
