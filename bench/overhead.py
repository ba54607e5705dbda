"""Trainer vs a hand-written loop on the main thread: per-step time, and final-weight equality.

    .venv/bin/python bench/overhead.py [--quick] [--rounds R] [--chunk N] [--models tiny,medium,amp]

Sides, interleaved in chunks of N steps (A B C D, then B C D A, ...: the order rotates each round and
every chunk starts after the same short pause, so no side always runs in another's wake):

* workbench: ``Trainer`` with default instrumentation (recorder thread, SQLite, TensorBoard, per-layer
  stats, diagnosis), its own data path, started from the main thread after that thread ran torch work;
  driven by ``step(N).wait()`` while paused; per-step time from ``history["time"]``.
  ``--tensorboard off`` runs a second Trainer with ``tensorboard=False`` as a fourth side.
* raw: the same model copy, data tensors, batch order, Adam and loss, written by hand, on the main thread.
* thread: the raw loop in a fresh plain ``threading.Thread`` per chunk: the thread's cost without the workbench.

Models: tiny MLP 64-64-64-10 (bs 64) and medium MLP 64-1024-1024-10 (bs 128) on digits; on a GPU also
the PyTorch AMP recipe network (3 x Linear 4096 + ReLU, bs 512, random data, fp32 here).
The first round is warm-up and dropped. "mean ms/step" pools the per-step times of the other rounds: the
total time over the steps, what a user waits for, with the steps that pay for diagnosis ticks, layer
statistics and the recorder's writes. "mean / raw" is the median over rounds of (side's mean step / raw's
mean step in the same round): the figure the targets are set on. The median step is printed beside it; it
drops the periodic work. The plain-thread loop starts with the thread count last set in the process, the
trainer's, so "mean / plain thread" compares both on the same intra-op thread count. Chunks last ~0.5-1 s so
that the recorder's background writes (every 0.25 s) fall inside the workbench's chunks, as in a real run.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from _common import HandLoop, Trainer, env_line, mean, median_ms, notebook_warmup, per_round_ratio, run_trainer_chunk, \
    runs_dir, same_weights, table, trainer_threads

MODELS = {"tiny": dict(width=64, bs=64), "medium": dict(width=1024, bs=128), "amp": dict(width=4096, bs=512)}


def make_trainer(name: str, device: str, tensorboard: bool, root: str, seed: int = 0) -> Trainer:
    spec = MODELS[name]
    common = dict(lr=1e-3, optimizer="adam", batch_size=spec["bs"], max_steps=None, max_epochs=None, seed=seed,
                  eval_every=0, runs_root=root, device=device, tensorboard=tensorboard)
    if name == "amp":  # the PyTorch AMP recipe's network and random data
        torch.manual_seed(seed)
        layers = []
        for _ in range(3):
            layers += [torch.nn.Linear(4096, 4096), torch.nn.ReLU()]
        net = torch.nn.Sequential(*layers[:-1])
        g = torch.Generator().manual_seed(seed)
        data = torch.utils.data.TensorDataset(torch.randn(8192, 4096, generator=g), torch.randn(8192, 4096, generator=g))
        return Trainer(model=net, train_data=data, loss_fn=torch.nn.MSELoss(), **common)
    return Trainer(dataset="digits", model="mlp", model_options={"depth": 2, "width": spec["width"]},
                   val_fraction=0.0, **common)


def bench_model(name: str, device: str, rounds: int, chunk: int, tb_off: bool, settle: float = 0.4) -> dict:
    root = runs_dir()
    trainers = {"workbench": make_trainer(name, device, True, root)}
    if tb_off:
        trainers["workbench (tensorboard off)"] = make_trainer(name, device, False, root)
    tr = trainers["workbench"]
    x, y = (t.to(tr.device) for t in tr.train_data.tensors)
    hand = {k: HandLoop(tr.model, x, y, seed=tr.cfg.seed, batch_size=tr.cfg.batch_size, lr=1e-3,
                        loss_fn=tr.loss_fn, device=tr.device) for k in ("raw (main thread)", "raw (plain thread)")}
    for t in trainers.values():
        t.start(paused=True)
    rounds_t: dict[str, list[list[float]]] = {k: [] for k in (*trainers, *hand)}
    sides: dict[str, Callable[[], list[float]]] = {k: (lambda t=t: run_trainer_chunk(t, chunk))
                                                   for k, t in trainers.items()}
    sides["raw (main thread)"] = lambda: hand["raw (main thread)"].run(chunk)
    sides["raw (plain thread)"] = lambda: hand["raw (plain thread)"].run_in_thread(chunk)
    order = list(sides)
    for r in range(rounds):
        got: dict[str, list[float]] = {}
        for k in order[r % len(order):] + order[:r % len(order)]:  # rotate: no side always follows another
            time.sleep(settle)  # every side starts after the same pause (the recorder writes the last chunk)
            got[k] = sides[k]()
        if r:  # round 0 is warm-up
            for k, v in got.items():
                rounds_t[k].append(v)
    for t in trainers.values():
        t.stop().wait(120)
        t.join()
    # each side against the workbench: the Trainer may run a small model on one intra-op thread
    # (workbench.cputhreads.choose_threads) where the main-thread loop uses torch's default, and the
    # thread count can change the order of a float reduction; a new plain thread starts with the count
    # last set in the process, so it runs the trainer's count while that one is live.
    equal = {k: same_weights(tr.model, m) for k, m in [*((k, h.model) for k, h in hand.items()),
                                                       *((k, t.model) for k, t in trainers.items() if t is not tr)]}
    equal["trainer threads"] = trainer_threads(tr) if device == "cpu" else None
    pooled = {k: [x for r in v for x in r] for k, v in rounds_t.items()}
    raw = rounds_t["raw (main thread)"]
    plain = rounds_t["raw (plain thread)"]
    return {"ms": {k: median_ms(v) for k, v in pooled.items()}, "mean": {k: mean(v) * 1e3 for k, v in pooled.items()},
            "n": {k: len(v) for k, v in pooled.items()},
            "ratio": {k: per_round_ratio(v, raw) for k, v in rounds_t.items()},
            "mean_ratio": {k: per_round_ratio(v, raw, stat=mean) for k, v in rounds_t.items()},
            "same_threads": {k: per_round_ratio(v, plain, stat=mean) for k, v in rounds_t.items()}, "equal": equal}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few steps per side (seconds)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--models", default=None, help="comma list of tiny, medium, amp (amp needs a GPU)")
    ap.add_argument("--tensorboard", choices=("on", "both"), default="both",
                    help="both: also time a Trainer with tensorboard=False")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cpu, plus cuda when present)")
    a = ap.parse_args()
    rounds = a.rounds or (2 if a.quick else 10)
    devices = [a.device] if a.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"# bench/overhead.py  {env_line()}")
    notebook_warmup()
    ratios = []
    for device in devices:
        names = a.models.split(",") if a.models else ["tiny", "medium"] + (["amp"] if device == "cuda" else [])
        for name in names:
            # chunks of ~0.5-1 s: long enough that the recorder's writes (every 0.25 s) fall inside them
            chunk = a.chunk or (5 if a.quick else (800 if name == "tiny" else 100))
            res = bench_model(name, device, rounds, chunk, a.tensorboard == "both", 0.05 if a.quick else 0.4)
            rows = [[side, v, res["ms"][side], res["mean_ratio"][side], res["same_threads"][side], res["ratio"][side],
                     res["n"][side]] for side, v in res["mean"].items()]
            spec = MODELS[name]
            print(f"\n{device} {name} (width {spec['width']}, bs {spec['bs']}), {rounds - 1} timed rounds of "
                  f"{chunk} steps; trainer's intra-op threads: {res['equal'].pop('trainer threads')} "
                  f"(main thread: {torch.get_num_threads()}); final weights identical to the workbench's: "
                  + ", ".join(f"{k} {v}" for k, v in res["equal"].items()))
            print(table(rows, ["side", "mean ms/step", "median ms/step", "mean / raw", "mean / plain thread",
                               "median / raw", "steps timed"]))
            ratios.append(f"{device}/{name} {res['mean_ratio']['workbench']:.3f} (same threads "
                          f"{res['same_threads']['workbench']:.3f}; median {res['ratio']['workbench']:.3f})")
    print("\nratio workbench/raw, mean step (against the plain-thread loop on the trainer's thread count; median "
          "step): " + ", ".join(ratios))


if __name__ == "__main__":
    main()
