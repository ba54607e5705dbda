"""Training Workbench: train a PyTorch model in a background thread and see and steer it live.

The public surface is small: ``Trainer`` (the one facade every view uses) and ``TrainConfig``.
"""
from __future__ import annotations

import torch as _torch

_major, _minor = (int(p) for p in _torch.__version__.split("+")[0].split(".")[:2])
if (_major, _minor) < (2, 6):
    raise ImportError(f"workbench needs torch >= 2.6 (found {_torch.__version__}): older versions load checkpoints "
                      "unsafely (CVE-2025-32434). Upgrade torch, e.g. pip install 'torch==2.13.0'.")

from .config import TrainConfig  # noqa: E402
from .version import __version__  # noqa: E402
from .trainer import Trainer, TrainingFailed  # noqa: E402

__all__ = ["Trainer", "TrainConfig", "TrainingFailed", "__version__"]
