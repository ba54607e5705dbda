"""Our lr finder's suggestion against torch-lr-finder's, on the same work: which trains better?

    .venv/bin/python bench/lr_finder_peer.py [--seeds 0 1 2] [--steps 300] [--quick]

For each seed: one MLP (digits, the built-in ``mlp``), the same training data, Adam. Both finders sweep the
same range (1e-7 to 10, 100 steps, exponential) on copies of the same initial weights: ours through
``Trainer.lr_find()`` (its suggestion), the peer through ``torch_lr_finder.LRFinder.range_test`` and its own
suggestion (the steepest point of its smoothed curve, what ``plot(suggest_lr=True)`` returns). Then two
runs from those same initial weights train ``--steps`` Adam steps at constant lr, one at each suggestion,
and the validation loss at their end is compared. The figure is the median over seeds of each side's final
val loss, and their ratio (ours / peer: at most 1.05 is the target, below 1 we train better).

The peer is not a project dependency: install it with ``pip install -r bench/requirements-peers.txt``.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile

import torch

os.environ.setdefault("MPLBACKEND", "Agg")   # the peer imports pyplot; nothing is drawn on screen

from workbench import Trainer  # noqa: E402

START_LR, END_LR, NUM_STEPS = 1e-7, 10.0, 100


def _peer():
    try:
        from torch_lr_finder import LRFinder
    except ImportError as e:
        raise SystemExit(f"bench/lr_finder_peer.py needs torch-lr-finder ({e}); install it with: "
                         f".venv/bin/pip install -r bench/requirements-peers.txt") from e
    return LRFinder


def _trainer(root: str, seed: int, steps: int, lr: float = 1e-3, model: torch.nn.Module | None = None) -> Trainer:
    cfg = dict(dataset="digits", model="mlp", optimizer="adam", lr=lr, batch_size=64, max_steps=steps,
               max_epochs=None, eval_every=max(1, steps // 10), seed=seed, runs_root=root, tensorboard=False,
               diagnose=False, checkpoint_every=None)
    return Trainer(cfg) if model is None else Trainer(cfg, model=model)


def peer_suggestion(tr: Trainer, seed: int) -> float:
    """torch-lr-finder on a copy of the run's initial model, its training data and loss, Adam."""
    LRFinder = _peer()
    model = copy.deepcopy(tr.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=START_LR)
    loader = torch.utils.data.DataLoader(tr.train_data, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    finder = LRFinder(model, optimizer, torch.nn.CrossEntropyLoss(), device="cpu")
    finder.range_test(loader, start_lr=START_LR, end_lr=END_LR, num_iter=NUM_STEPS)
    ax, lr = finder.plot(suggest_lr=True)
    import matplotlib.pyplot as plt
    plt.close("all")
    return float(lr)


def final_val_loss(root: str, seed: int, steps: int, lr: float, initial: torch.nn.Module) -> float:
    tr = _trainer(root, seed, steps, lr=lr, model=copy.deepcopy(initial))
    tr.run()
    ev = tr.evals.dropna(subset=["val_loss"])
    return float(ev["val_loss"].iloc[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="one seed, 40 training steps (checks the bench runs)")
    args = ap.parse_args(argv)
    seeds, steps = ([args.seeds[0]], 40) if args.quick else (args.seeds, args.steps)
    _peer()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for seed in seeds:
            tr = _trainer(root, seed, steps)
            initial = copy.deepcopy(tr.model)
            ours = tr.lr_find(start_lr=START_LR, end_lr=END_LR, num_steps=NUM_STEPS).suggestion
            theirs = peer_suggestion(tr, seed)
            v_ours = final_val_loss(root, seed, steps, ours, initial)
            v_theirs = final_val_loss(root, seed, steps, theirs, initial)
            rows.append((seed, ours, theirs, v_ours, v_theirs))
            print(f"seed {seed}: ours lr {ours:.3g} -> val {v_ours:.4f}; torch-lr-finder lr {theirs:.3g} -> "
                  f"val {v_theirs:.4f} (ratio {v_ours / v_theirs:.3f})", file=sys.stderr, flush=True)
    med_ours = statistics.median(r[3] for r in rows)
    med_theirs = statistics.median(r[4] for r in rows)
    print(f"\nval loss after {steps} Adam steps at each finder's suggestion, digits MLP, median of "
          f"{len(rows)} seed(s)")
    print("| seed | ours: lr | ours: val loss | torch-lr-finder: lr | torch-lr-finder: val loss | ours / peer |")
    print("|---|---|---|---|---|---|")
    for seed, lo, lt, vo, vt in rows:
        print(f"| {seed} | {lo:.3g} | {vo:.4f} | {lt:.3g} | {vt:.4f} | {vo / vt:.3f} |")
    print(f"| **median** | | {med_ours:.4f} | | {med_theirs:.4f} | **{med_ours / med_theirs:.3f}** |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
