"""The general path: a user's own Transformer LM, Dataset and batches, Trainer vs a hand-written loop.

    .venv/bin/python bench/own_model.py [--quick] [--rounds R] [--chunk N]

A character-level Transformer LM (2 layers, width 64, context 64, batch 32) on the source of Python's
``textwrap`` module, its items made by a plain map-style Dataset (not a TensorDataset: each batch is
collated from items, as for any user data). Sides, interleaved in chunks of N steps with the order rotating:

* pairs: ``Trainer(model=..., train_data=Dataset of (x, y), loss_fn=None)``: the default cross-entropy over
  ``[B, T, V]`` logits, default instrumentation (recorder, SQLite, TensorBoard, layer statistics, diagnosis);
* dict / HF: the same model wrapped to take ``{"input_ids", "labels"}`` and return ``.loss``, dict items;
* raw: the same model copy, items, batch order (``epoch_permutation``), collation, Adam and loss, by hand, on
  the intra-op thread count the trainer chose.

The first round is warm-up. "mean / raw" is the median over rounds of (side's mean step / raw's mean step in
the same round): the throughput a user gets. The median step is printed beside it.
"""
from __future__ import annotations

import argparse
import copy
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from _common import (Trainer, env_line, epoch_permutation, mean, median_ms, notebook_warmup, per_round_ratio,
                     run_trainer_chunk, runs_dir, table, trainer_threads)

TEXT = Path(textwrap.__file__).read_text()
VOCAB = sorted(set(TEXT))


class Windows(Dataset):
    def __init__(self, block: int = 64, stride: int = 8, as_dict: bool = False) -> None:
        stoi = {c: i for i, c in enumerate(VOCAB)}
        self.ids = torch.tensor([stoi[c] for c in TEXT])
        self.block, self.as_dict = block, as_dict
        self.starts = range(0, len(self.ids) - block - 1, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int):
        s = self.starts[i]
        x, y = self.ids[s:s + self.block], self.ids[s + 1:s + self.block + 1]
        return {"input_ids": x, "labels": y} if self.as_dict else (x, y)


class CharLM(nn.Module):
    def __init__(self, vocab: int, d: int = 64, block: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(block, d))
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(block), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        return self.head(self.body(self.tok(x) + self.pos[:t], mask=self.mask[:t, :t], is_causal=True))


@dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class HFWrapper(nn.Module):
    def __init__(self, lm: CharLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        logits = self.lm(input_ids)
        loss = None if labels is None else nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return Output(loss, logits)


class HandLoop:
    """The user's own loop over the same items, order, collation, model copy, Adam and loss."""

    def __init__(self, model: nn.Module, data: Windows, seed: int, batch_size: int) -> None:
        self.model, self.data, self.seed, self.bs = copy.deepcopy(model), data, seed, batch_size
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.epoch, self.pos = 0, 0
        self.perm = epoch_permutation(len(data), seed, 0)

    def run(self, n: int) -> list[float]:
        ends = []
        for _ in range(n):
            if self.pos >= len(self.perm):
                self.epoch, self.pos = self.epoch + 1, 0
                self.perm = epoch_permutation(len(self.data), self.seed, self.epoch)
            idx = self.perm[self.pos:self.pos + self.bs]
            self.pos += len(idx)
            x, y = default_collate([self.data[i] for i in idx.tolist()])
            loss = nn.functional.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            ends.append(time.perf_counter())
        return [b - a for a, b in zip(ends, ends[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=None)
    a = ap.parse_args()
    rounds, chunk = a.rounds or (2 if a.quick else 7), a.chunk or (5 if a.quick else 40)
    print(f"# bench/own_model.py  {env_line()}")
    notebook_warmup()
    torch.manual_seed(0)
    lm = CharLM(len(VOCAB))
    root = runs_dir()
    common = dict(batch_size=32, lr=1e-3, optimizer="adam", max_steps=None, max_epochs=None, eval_every=0, seed=0,
                  runs_root=root, dataset=None)
    trainers = {"pairs": Trainer(model=copy.deepcopy(lm), train_data=Windows(), **common),
                "dict / HF": Trainer(model=HFWrapper(copy.deepcopy(lm)), train_data=Windows(as_dict=True), **common)}
    hand = HandLoop(lm, Windows(), seed=0, batch_size=32)
    for t in trainers.values():
        t.start(paused=True)
    sides = {k: (lambda t=t: run_trainer_chunk(t, chunk)) for k, t in trainers.items()}
    threads = trainer_threads(trainers["pairs"]) or torch.get_num_threads()

    def raw() -> list[float]:  # on the trainer's intra-op thread count: the same float reductions, same weights
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return hand.run(chunk)
        finally:
            torch.set_num_threads(before)
    sides["raw"] = raw
    order = list(sides)
    per_round: dict[str, list[list[float]]] = {k: [] for k in sides}
    for r in range(rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:
            time.sleep(0.2)
            got = sides[k]()
            if r:
                per_round[k].append(got)
    for t in trainers.values():
        t.stop().wait(120)
        t.join()
    same = all(torch.equal(p, q) for p, q in zip(trainers["pairs"].model.parameters(), hand.model.parameters()))
    rows = []
    for k, v in per_round.items():
        pooled = [x for rr in v for x in rr]
        rows.append([k, mean(pooled) * 1e3, median_ms(pooled), per_round_ratio(v, per_round["raw"], stat=mean),
                     per_round_ratio(v, per_round["raw"]), len(pooled)])
    print(f"\ncpu char-LM (2 layers, d 64, T 64, bs 32), {rounds - 1} timed rounds of {chunk} steps on "
          f"{threads} intra-op thread(s); "
          f"final weights of 'pairs' identical to the hand loop's: {same}")
    print(table(rows, ["side", "mean ms/step", "median ms/step", "mean / raw", "median / raw", "steps timed"]))
    print("\nratio workbench/raw, mean step (median step): " + ", ".join(
        f"{r[0]} {r[3]:.3f} ({r[4]:.3f})" for r in rows if r[0] != "raw"))


if __name__ == "__main__":
    main()
