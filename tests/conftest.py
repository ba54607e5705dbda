"""Shared fixtures: tiny, fast, seeded runs under a temporary runs root."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    return root


@pytest.fixture
def tiny_data() -> torch.utils.data.TensorDataset:
    """200 samples, 8 features, 3 classes (a linear rule plus noise)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = (x[:, :3].argmax(dim=1)).long()
    return torch.utils.data.TensorDataset(x, y)


def make_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
