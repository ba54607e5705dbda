"""The live view's data and figures: one function from a run handle to everything the fragment draws.

``live_payload(run)`` refreshes the run handle (incrementally), takes its status snapshot, builds the
downsampled ``ChartData`` with ``workbench.chartdata.chart_data`` and the plotly figures with the
builders shared with the notebook views (``workbench.figures``). It never calls streamlit, so the
benchmark (bench/dashboard_refresh.py) times exactly what a refresh of the page computes.
"""
from __future__ import annotations

import gc
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from workbench import figures
from workbench.chartdata import ChartData, chart_data

N_OUT = 2000            # points per trace
RECENT_EVENTS = 8


@dataclass
class LivePayload:
    """What one refresh of the live view shows."""

    snapshot: dict[str, Any]
    data: ChartData
    figures: dict[str, go.Figure]
    lr_now: float | None
    recent: pd.DataFrame          # the newest change/checkpoint/alert markers: step, kind, what


# figure name -> (builder, the ChartData series it draws, whether it draws the markers, whether it draws layers)
FIGURES: dict[str, tuple[Callable[..., go.Figure], tuple[str, ...], bool, bool]] = {
    "loss": (figures.loss_figure, ("train_loss", "val_loss"), True, False),
    "lr": (figures.lr_figure, ("lr",), True, False),
    "grad_norm": (figures.grad_norm_figure, ("grad_norm",), True, False),
    "val_acc": (figures.accuracy_figure, ("val_acc",), True, False),
    "layer_grad_norm": (figures.layer_heatmap, (), False, True),
    "update_ratio": (figures.update_ratio_figure, (), False, True),
}
_figure_cache: OrderedDict[tuple, tuple[tuple, go.Figure]] = OrderedDict()
_figure_lock = threading.Lock()
FIGURE_CACHE_SIZE = 96


def _signature(data: ChartData, names: tuple[str, ...], markers: bool, layers: bool, log_y: bool) -> tuple:
    """Changes whenever what a figure draws changes (length, last point and sum of each series)."""
    sig: list[Any] = [log_y]
    for n in names:
        x, y = data.series.get(n, ((), ()))
        y = np.asarray(y, dtype=float)
        sig.append((len(x), float(x[-1]) if len(x) else None, float(np.nansum(y)) if len(y) else None))
    if markers:
        sig.append(tuple((m["step"], m["label"]) for m in data.markers))
    if layers:
        L = data.layers
        sig.append((len(L), int(L["step"].iloc[-1]) if len(L) else None,
                    float(np.nansum(L["grad_norm"].to_numpy(float))) if len(L) else None))
    return tuple(sig)


def build_figures(key: str, data: ChartData, log_y: bool = True) -> dict[str, go.Figure]:
    """The live view's figures (those of ``figures.all_figures``); a figure whose data did not change since
    the last refresh of the same run is reused instead of rebuilt (a paused or ended run costs no plotly work,
    and between two evaluations only the per-step charts are redrawn)."""
    out: dict[str, go.Figure] = {}
    for name, (builder, names, markers, layers) in FIGURES.items():
        sig = _signature(data, names, markers, layers, log_y)
        ck = (key, name)
        with _figure_lock:
            hit = _figure_cache.get(ck)
        if hit is not None and hit[0] == sig:
            out[name] = hit[1]
            continue
        fig = builder(data, log_y=log_y) if name == "loss" else builder(data)
        with _figure_lock:
            _figure_cache[ck] = (sig, fig)
            _figure_cache.move_to_end(ck)
            while len(_figure_cache) > FIGURE_CACHE_SIZE:
                _figure_cache.popitem(last=False)
        out[name] = fig
    return out


def live_payload(run: Any, log_y: bool = True, n_out: int = N_OUT, cache: bool = True) -> LivePayload:
    """Refresh ``run`` (a run handle: workbench.handle) and build the live view's figures."""
    run.refresh()
    snap = run.snapshot()
    data = chart_data(run, n_out=n_out)
    key = str(run.run_dir)
    figs = build_figures(key, data, log_y) if cache else figures.all_figures(data, log_y=log_y)
    _, lr = data.series.get("lr", ([], []))
    lr_now = float(lr[-1]) if len(lr) and math.isfinite(float(lr[-1])) else None
    recent = pd.DataFrame([{"step": m["step"], "event": m["kind"], "what": m["label"]}
                           for m in reversed(data.markers[-RECENT_EVENTS:])], columns=["step", "event", "what"])
    return LivePayload(snapshot=snap, data=data, figures=figs, lr_now=lr_now, recent=recent)


def freeze_long_lived() -> None:
    """Take the objects alive now (the imported modules of torch, plotly, pandas, streamlit: ~200k) out of
    the garbage collector's full collections, which otherwise rescan them all and add ~100 ms to an
    occasional refresh. Called once per process, after the imports (``gc.freeze``)."""
    gc.collect()
    gc.freeze()


def fmt(value: Any, spec: str = ".4g", missing: str = "-") -> str:
    """A number for a status line, or ``missing`` when it is None/NaN."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return missing
    return format(v, spec) if math.isfinite(v) else missing
