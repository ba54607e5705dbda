"""Runs the diagnosis is measured on besides the teaching scenarios: longer runs, and models a user writes.

Each ``Case`` builds a run (a config, and for a user model its model, data and loss) and says which alert it
should raise (None: a healthy run, where no warning may fire), within how many steps, and which related
symptoms may fire too. ``scripts/diagnosis_report.py`` runs them beside the scenarios; the tests use
the same builders. Data ships with the libraries: scikit-learn's digits and diabetes sets, and the source
text of a module of Python's own library for the language model.
"""
from __future__ import annotations

import codecs
import importlib.util
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset

UNBOUNDED_STEPS = 20_000   # where the report stops a run that has no step or epoch limit


@dataclass(frozen=True)
class Case:
    """A run to measure the diagnosis on: ``build(seed)`` gives the Trainer's keyword arguments."""

    name: str
    build: Callable[[int], dict[str, Any]]
    expect: str | None = None
    within: int | None = None
    also: tuple[str, ...] = field(default_factory=tuple)
    stop_at: int | None = None     # the report stops the (unbounded) run here


# ===================================================================== user models
class CharLM(nn.Module):
    """A small causal Transformer language model as a user writes it: token and learned positional
    embeddings (the latter a bare 2-D parameter), pre-norm encoder layers with a causal mask, a head."""

    def __init__(self, vocab: int, context: int, d: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos[:t]
        return self.head(self.norm(self.blocks(h, mask=self.mask[:t, :t], is_causal=True)))


class TokenCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy over every position: logits [B, T, V] against targets [B, T]."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def python_text() -> str:
    """Text that ships with Python: the Zen of Python (rot13-encoded in the source of ``this``, which prints
    it when imported, so the file is read instead) and the source of textwrap (about 20 kB in all)."""
    this = Path(importlib.util.find_spec("this").origin).read_text(encoding="utf-8")
    zen = codecs.decode(this.split('"""')[1], "rot13")
    return zen + "\n" + Path(textwrap.__file__).read_text(encoding="utf-8")


def char_data(context: int = 32, stride: int = 4) -> tuple[TensorDataset, TensorDataset, int]:
    """(train, val, vocab size): windows of ``context`` character ids and the next-character targets; the
    last tenth of the text is the validation set."""
    text = python_text()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    starts = torch.arange(0, len(ids) - context - 1, stride)
    x = torch.stack([ids[s:s + context] for s in starts.tolist()])
    y = torch.stack([ids[s + 1:s + context + 1] for s in starts.tolist()])
    cut = int(0.9 * len(x))
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut + context // stride:], y[cut + context // stride:]), \
        len(chars)


def char_lm(seed: int, lr: float = 3e-3, steps: int = 300) -> dict[str, Any]:
    train, val, vocab = char_data()
    torch.manual_seed(seed)
    return dict(model=CharLM(vocab, 32), train_data=train, val_data=val, loss_fn=TokenCrossEntropy(),
                optimizer="adam", lr=lr, batch_size=32, max_steps=steps, max_epochs=None, eval_every=50)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                      nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _split(x: torch.Tensor, y: torch.Tensor, seed: int, n_val: int) -> tuple[TensorDataset, TensorDataset]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x[perm[n_val:]], y[perm[n_val:]]), TensorDataset(x[perm[:n_val]], y[perm[:n_val]])


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(y)


def cnn(seed: int) -> dict[str, Any]:
    x, y = digit_images()
    train, val = _split(x, y, seed, 360)
    torch.manual_seed(seed)
    return dict(model=SmallCNN(), train_data=train, val_data=val, loss_fn=nn.CrossEntropyLoss(), optimizer="adam",
                lr=1e-3, batch_size=64, max_steps=400, max_epochs=None, eval_every=25)


def regression(seed: int) -> dict[str, Any]:
    from sklearn.datasets import load_diabetes
    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    train, val = _split(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)[:, None], seed, 88)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    return dict(model=model, train_data=train, val_data=val, loss_fn=nn.MSELoss(), optimizer="adam", lr=1e-3,
                weight_decay=1e-2, batch_size=32, max_steps=300, max_epochs=None, eval_every=20)


def memorised(seed: int, per_class: int = 4) -> dict[str, Any]:
    """A wide MLP on a few dozen digits (``per_class`` of each), validated on 500 others: it memorises the
    training set in a few dozen steps; weight decay holds the val loss flat rather than climbing, so only
    the generalisation gap shows it."""
    x, y = digit_images()
    x = x.reshape(len(x), -1)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    picked = torch.cat([perm[(y[perm] == c)][:per_class] for c in range(10)])
    rest = perm[~torch.isin(perm, picked)][:500]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return dict(model=model, train_data=TensorDataset(x[picked], y[picked]), val_data=TensorDataset(x[rest], y[rest]),
                loss_fn=nn.CrossEntropyLoss(), optimizer="adamw", lr=1e-3, weight_decay=0.5, batch_size=20,
                max_steps=400, max_epochs=None, eval_every=20)


# ===================================================================== built-in models, longer runs
def _digits_mlp(**kw: Any) -> Callable[[int], dict[str, Any]]:
    return lambda seed: dict(dict(dataset="digits", model="mlp", lr=1e-3, eval_every=20), **kw)


CASES: dict[str, Case] = {c.name: c for c in [
    Case("healthy_x3", _digits_mlp(max_steps=750, max_epochs=None)),
    Case("cosine_to_end", _digits_mlp(model_options={"depth": 2, "width": 128}, schedule="warmup_cosine",
                                      batch_size=64, max_epochs=40, eval_every=50)),
    # healthy for its first ~15,000 steps; past them, on some seeds, the val loss creeps 20-30% above its best
    # while the train loss still falls (the model grows over-confident on the points where the moons overlap,
    # val accuracy flat): a late, mild overfit that the overfitting alert may name; any other warning is false
    Case("unbounded_moons", lambda seed: dict(dataset="moons", dataset_options={"n_samples": 5000}, model="mlp",
                                              lr=3e-3, max_steps=None, max_epochs=None, eval_every=200),
         also=("overfitting",), stop_at=UNBOUNDED_STEPS),
    # the dashboard run: digits with no limit memorises its training set and its val loss climbs
    # 2.5x above its best — overfitting is the right call there, once; anything else is a false alarm
    Case("unbounded_digits", _digits_mlp(max_steps=None, max_epochs=None, eval_every=200), expect="overfitting",
         within=UNBOUNDED_STEPS, also=("plateau",), stop_at=UNBOUNDED_STEPS),
    Case("user_char_lm", char_lm),
    Case("user_cnn", cnn),
    Case("user_regression", regression),
    Case("user_char_lm_lr10", lambda seed: char_lm(seed, lr=10.0, steps=150), expect="divergence", within=10,
         also=("loss_spike", "exploding_gradients", "lr_too_high", "underfitting", "dead_units")),
    Case("user_memorised", memorised, expect="overfitting", within=400, also=("plateau",)),
]}

