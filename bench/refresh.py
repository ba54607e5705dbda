"""Chart refresh cost vs run length: downsampled series from the in-memory store + a plotly figure.

    .venv/bin/python bench/refresh.py [--quick] [--reps R] [--n-out 2000]

One refresh = ``SeriesStore.series("train_loss", "step", n_out)`` (copy under the lock, MinMaxLTTB
plus global extremes) + a minimal ``plotly.graph_objects.Figure`` with one ``Scattergl`` trace built
from it + ``fig.to_json()`` (what a view sends to the browser). The same refresh is also timed with the
views' own builder, ``figures.loss_figure``, fed by the same series. Stores hold 10^3, 10^5 and 10^6 logged
steps (the trainer's step columns, a noisy decaying loss with spikes); sizes are timed interleaved
(A B C A B C ...), the first repetition is warm-up; figures are medians.

On long series the store answers from per-block extremes it keeps up to date as rows arrive
(``SeriesStore.series``). So that a static store does not flatter that, a "live" row times the 10^6
store with 1,000 new rows appended before every refresh (a run at 1,000 steps/s seen at 1 Hz), and
the first refresh of a fresh 10^6 store (which summarises every row once) is reported on its own.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import plotly.graph_objects as go

from _common import env_line, table
from workbench.metrics import SeriesStore
from workbench.runlog import STEP_COLUMNS

SIZES = (10**3, 10**5, 10**6)


def filled_store(n: int, seed: int = 0) -> SeriesStore:
    rng = np.random.default_rng(seed)
    step = np.arange(1, n + 1, dtype=float)
    loss = 2.3 * np.exp(-step / (n / 5)) + 0.05 * rng.standard_normal(n) + 0.1
    loss[rng.integers(0, n, max(1, n // 10_000))] += 3.0  # spikes the downsampler must keep
    cols = {c: np.zeros(n) for c in STEP_COLUMNS}
    cols.update(step=step, train_loss=loss, time=1.8e9 + step * 1e-3)
    store = SeriesStore(STEP_COLUMNS)
    store.extend(cols)
    return store


def minimal_figure(x: np.ndarray, y: np.ndarray) -> go.Figure:
    fig = go.Figure(go.Scattergl(x=x, y=y, mode="lines", name="train_loss"))
    fig.update_layout(xaxis_title="step", yaxis_title="train loss", uirevision="keep")
    return fig


def shared_figure(x: np.ndarray, y: np.ndarray) -> go.Figure:
    import pandas as pd

    from workbench.figures import loss_figure
    from workbench.chartdata import ChartData

    return loss_figure(ChartData(series={"train_loss": (x, y)}, layers=pd.DataFrame()))


def refresh(store: SeriesStore, n_out: int, build=minimal_figure) -> tuple[float, int]:
    t0 = time.perf_counter()
    x, y = store.series("train_loss", "step", n_out)
    fig = build(x, y)
    payload = fig.to_json()
    dt = time.perf_counter() - t0
    assert payload
    return dt, len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--n-out", type=int, default=2000)
    a = ap.parse_args()
    reps = a.reps or (4 if a.quick else 40)
    print(f"# bench/refresh.py  {env_line()}")
    stores = {n: filled_store(n) for n in SIZES}
    try:
        shared_figure(np.arange(3.0), np.ones(3))
        builders = {"minimal": minimal_figure, "shared loss_figure": shared_figure}
    except ImportError:
        builders = {"minimal": minimal_figure}
    times: dict[tuple, list[float]] = {(b, n): [] for b in builders for n in SIZES}
    points: dict = {}
    for r in range(reps):
        for b, build in builders.items():
            for n in SIZES:
                dt, pts = refresh(stores[n], a.n_out, build)
                points[n] = pts
                if r:
                    times[b, n].append(dt)
    live = filled_store(SIZES[-1], seed=1)
    t0 = time.perf_counter()
    live.series("train_loss", "step", a.n_out)
    first_ms = (time.perf_counter() - t0) * 1e3
    rng = np.random.default_rng(2)
    for r in range(reps):
        for b, build in builders.items():
            k = int(live.last()["step"])
            live.extend({"step": np.arange(k + 1, k + 1001, dtype=float), "train_loss": 0.1 + rng.random(1000)})
            dt, pts = refresh(live, a.n_out, build)
            if r:
                times.setdefault((b, "live"), []).append(dt)
                points["live"] = pts
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [[b, f"{n:,}" if n != "live" else "10^6 + 1,000 per refresh", med[b, n] * 1e3, min(times[b, n]) * 1e3,
             points[n], med[b, n] / med[b, SIZES[0]]] for b in builders for n in (*SIZES, "live")]
    print(f"\nn_out={a.n_out}, {reps - 1} timed refreshes per size and figure")
    print(table(rows, ["figure", "logged steps", "median ms", "min ms", "points per trace", "/ 10^3"]))
    print(f"\nfirst refresh of a fresh 10^6 store (summarises every row once): {first_ms:.1f} ms")
    print("\nratio refresh 10^6 / 10^3: " + ", ".join(f"{b} {med[b, SIZES[-1]] / med[b, SIZES[0]]:.2f} "
                                                    f"(live {med[b, 'live'] / med[b, SIZES[0]]:.2f})" for b in builders)
          + f" (points per trace at 10^6: {points[SIZES[-1]]})")


if __name__ == "__main__":
    main()
