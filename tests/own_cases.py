"""Training a user's own model, data, optimizer and metrics: the cases the tests run, importable by a worker
process (``python own_cases.py SPEC.json``) so a resume can happen in a new process.

Each case builds what a user would bring, from a fixed seed, the same way in every process:

- ``lm``: a small character-level Transformer LM on text that ships with Python (``textwrap``'s source),
  ``(x, y)`` token pairs, ``[B, T, V]`` logits, a warm-up ``step -> multiplier`` schedule.
- ``dict``: a Dataset of ``{"x", "y"}`` dicts and a model that returns ``{"logits": ...}``.
- ``hf``: Hugging Face style: ``{"input_ids", "labels"}`` batches, a model that returns ``.loss``.
- ``step_fn``: three-part batches that only a ``step_fn`` can read.
- ``groups``: SGD with two param groups (lr 0.01 and 0.1) and a StepLR the user made.
- ``iterable``: an IterableDataset (a seeded stream with a length).
- ``loader``: a DataLoader of variable-length sequences with a padding ``collate_fn``, shuffled.
"""
from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from workbench import Trainer

TEXT = Path(textwrap.__file__).read_text()[:12000]
VOCAB = sorted(set(TEXT))
STOI = {c: i for i, c in enumerate(VOCAB)}


class CharWindows(Dataset):
    """(context, next characters) windows over ``TEXT``."""

    def __init__(self, start: int, stop: int, block: int = 32, stride: int = 24) -> None:
        ids = torch.tensor([STOI[c] for c in TEXT[start:stop]])
        self.items = [(ids[i:i + block], ids[i + 1:i + block + 1]) for i in range(0, len(ids) - block - 1, stride)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class TinyLM(nn.Module):
    """A one-layer causal Transformer with a learned positional embedding."""

    def __init__(self, vocab: int, d: int = 32, block: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(block, d))
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.body = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        return self.head(self.body(self.tok(x) + self.pos[:t], mask=mask, is_causal=True))


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long()


class DictSet(Dataset):
    def __init__(self, n: int, seed: int, keys: tuple[str, str] = ("x", "y")) -> None:
        self.x, self.y = blobs(n, seed)
        self.keys = keys

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {self.keys[0]: self.x[i], self.keys[1]: self.y[i]}


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.net(x)}


@dataclass
class Output:
    """What a Hugging Face model returns (a ModelOutput-like object)."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class HFStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        logits = self.net(input_ids)
        return Output(nn.functional.cross_entropy(logits, labels) if labels is not None else None, logits)


class Triples(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.x, self.y = blobs(n, seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i, :4], self.x[i, 4:], self.y[i].float()


def triple_step(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    a, b, t = batch
    out = model(torch.cat([a, b], dim=1)).squeeze(-1)
    return nn.functional.binary_cross_entropy_with_logits(out, t), out


class Stream(IterableDataset):
    """A seeded stream of (x, y) samples; the same samples every pass."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        x, y = blobs(self.n, self.seed)
        yield from zip(x, y)


class Sequences(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = [torch.randint(1, 20, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
                      for _ in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        s = self.items[i]
        return s[:-1], s[1:]


def pad(items):
    xs = nn.utils.rnn.pad_sequence([a for a, _ in items], batch_first=True)
    ys = nn.utils.rnn.pad_sequence([b for _, b in items], batch_first=True, padding_value=-100)
    return xs, ys


class SeqModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(20, 16), nn.GRU(16, 16, batch_first=True), nn.Linear(16, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(x))[0])


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 20)


def make(case: str, run_dir: str | Path | None, **cfg: Any) -> dict[str, Any]:
    """The Trainer arguments of ``case`` (a fresh model, data and optimizer from a fixed seed)."""
    torch.manual_seed(0)
    base = dict(seed=0, max_steps=60, eval_every=20, checkpoint_every=None, tensorboard=False, run_dir=None
                if run_dir is None else str(run_dir), dataset=None, model=None)
    base.update(cfg)
    if case == "lm":
        n = len(TEXT)
        return dict(base, model=TinyLM(len(VOCAB)), train_data=CharWindows(0, int(0.8 * n)),
                    val_data=CharWindows(int(0.8 * n), n), batch_size=16, lr=3e-3, schedule=warmup)
    if case == "dict":
        return dict(base, model=DictOut(), train_data=DictSet(256, 1), val_data=DictSet(64, 2),
                    loss_fn=nn.CrossEntropyLoss(), batch_size=32)
    if case == "hf":
        return dict(base, model=HFStyle(), train_data=DictSet(256, 1, ("input_ids", "labels")),
                    val_data=DictSet(64, 2, ("input_ids", "labels")), batch_size=32)
    if case == "step_fn":
        return dict(base, model=nn.Linear(8, 1), train_data=Triples(256, 1), val_data=Triples(64, 2),
                    step_fn=triple_step, batch_size=32, lr=1e-2)
    if case == "groups":
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 2))
        opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.01},
                               {"params": model[3].parameters(), "lr": 0.1}], momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=25, gamma=0.5)
        return dict(base, model=model, optimizer=opt, schedule=sched, train_data=DictSet(256, 1),
                    val_data=DictSet(64, 2), loss_fn=nn.CrossEntropyLoss(), batch_size=32)
    if case == "iterable":
        return dict(base, model=DictOut(), train_data=Stream(200, 1), val_data=Stream(64, 2),
                    loss_fn=nn.CrossEntropyLoss(), batch_size=32)
    if case == "loader":
        g = torch.Generator().manual_seed(5)
        return dict(base, model=SeqModel(), train_data=DataLoader(Sequences(200, 1), batch_size=16, shuffle=True,
                                                                     collate_fn=pad, generator=g),
                    val_data=DataLoader(Sequences(48, 2), batch_size=16, collate_fn=pad))
    raise ValueError(f"case: got {case!r}")


def trainer(case: str, run_dir: str | Path | None, **cfg: Any) -> Trainer:
    args = make(case, run_dir, **cfg)
    return Trainer(**args)


def resume(case: str, run_dir: str | Path) -> Trainer:
    args = make(case, None)
    own = {k: args[k] for k in ("model", "train_data", "val_data", "loss_fn", "optimizer", "schedule", "step_fn")
           if k in args}
    return Trainer.from_checkpoint(run_dir, **own)


def main(spec_path: str) -> None:
    """A worker: train (``cfg``) or resume a case's run, stopping at ``stop_at``; ``live``: {step: controls}."""
    spec = json.loads(Path(spec_path).read_text())
    case, run_dir = spec["case"], spec["run_dir"]
    tr = resume(case, run_dir) if spec.get("resume") else trainer(case, run_dir, **spec.get("cfg", {}))
    live = {int(k): v for k, v in spec.get("live", {}).items()}
    stop_at = spec.get("stop_at")

    def hook(ctx) -> None:
        if ctx.step in live:
            tr.set(**live[ctx.step])
        if stop_at is not None and ctx.step == stop_at:
            tr.stop()
    tr.on("step_end", hook)
    tr.run()
    print(f"{tr.status} {tr.step_count}")


if __name__ == "__main__":
    main(sys.argv[1])
