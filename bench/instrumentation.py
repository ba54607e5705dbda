"""Per-layer instrumentation on vs off: grad norms, parameter norms and update/weight ratios per layer.

    .venv/bin/python bench/instrumentation.py [--quick] [--rounds R] [--chunk N] [--every K]

Two Trainers with identical config except ``layer_every`` (K, default 25 = the config default, vs 0 = off),
both started paused from the main thread after it ran torch work, driven in interleaved chunks of N
steps. A layer-stats step costs more than the others (a parameter copy before the optimizer step and
three foreach norms), so the cost is amortised over K steps: the figure is the mean step time (chunk
time / steps, from ``history["time"]``), as a median over rounds of the per-round on/off ratio. The
median step time is shown too (it does not see a cost paid once every K steps).
"""
from __future__ import annotations

import argparse
import time

from _common import Trainer, env_line, mean, median_ms, notebook_warmup, per_round_ratio, run_trainer_chunk, \
    runs_dir, same_weights, table

MODELS = {"tiny": dict(width=64, bs=64), "medium": dict(width=1024, bs=128)}


def make(name: str, every: int, root: str) -> Trainer:
    spec = MODELS[name]
    return Trainer(dataset="digits", model="mlp", model_options={"depth": 2, "width": spec["width"]},
                   val_fraction=0.0, lr=1e-3, batch_size=spec["bs"], max_steps=None, max_epochs=None, seed=0,
                   eval_every=0, runs_root=root, device="cpu", layer_every=every)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--every", type=int, default=25, help="layer_every of the 'on' side (default: the config's 25)")
    ap.add_argument("--models", default="tiny,medium")
    a = ap.parse_args()
    rounds = a.rounds or (2 if a.quick else 8)
    print(f"# bench/instrumentation.py  {env_line()}")
    notebook_warmup()
    finals = []
    for name in a.models.split(","):
        chunk = a.chunk or (a.every if a.quick else (300 if name == "tiny" else 100))
        root = runs_dir()
        trs = {"on": make(name, a.every, root), "off": make(name, 0, root)}
        for t in trs.values():
            t.start(paused=True)
        per: dict[str, list[list[float]]] = {"on": [], "off": []}
        for r in range(rounds):
            for k, t in trs.items():
                got = run_trainer_chunk(t, chunk)
                time.sleep(0.05 if a.quick else 0.4)
                if r:
                    per[k].append(got)
        for t in trs.values():
            t.stop().wait(120)
            t.join()
        layer_rows = len(trs["on"].layer_history)
        pooled = {k: [x for rr in v for x in rr] for k, v in per.items()}
        ratio = per_round_ratio(per["on"], per["off"], stat=mean)
        rows = [[k, mean(v) * 1e3, median_ms(v), len(v)] for k, v in pooled.items()]
        print(f"\ncpu {name} (width {MODELS[name]['width']}, bs {MODELS[name]['bs']}): layer_every={a.every} vs 0, "
              f"{rounds - 1} timed rounds of {chunk} steps; per-layer rows logged: {layer_rows}; "
              f"same weights: {same_weights(trs['on'].model, trs['off'].model)}")
        print(table(rows, ["layer stats", "mean ms/step", "median ms/step", "steps timed"]))
        print(f"on/off (mean step, median of rounds): {ratio:.3f}; on/off (median step): "
              f"{per_round_ratio(per['on'], per['off']):.3f}")
        finals.append(f"{name} {ratio:.3f}")
    print("\nratio instrumentation on/off: " + ", ".join(finals))


if __name__ == "__main__":
    main()
