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

N_OUT = 1000            # points per trace (a 1,000-pixel-wide chart shows no more; each costs the browser)
RECENT_EVENTS = 8


@dataclass
class LivePayload:
    """What one refresh of the live view shows."""

    snapshot: dict[str, Any]
    data: ChartData
    figures: dict[str, go.Figure]
    lr_now: float | None
    recent: pd.DataFrame          # the newest change/checkpoint/alert markers: step, kind, what


def cost_text(snap: dict[str, Any]) -> str:
    """Effective batch (per-process batch x accumulation x processes), time to the planned end and, for
    Transformer-like models, the 6·N·D FLOP/s achieved (workbench.cost), from a run's snapshot."""
    c, world = snap.get("controls") or {}, int(snap.get("world_size") or 1)
    batch = int(c.get("batch_size") or 0) * int(c.get("accumulate") or 1)
    parts = [f"effective batch {batch * world:,}" + (f" ({batch:,} x {world} processes)" if world > 1 else "")]
    eta = snap.get("eta_s")
    if eta is not None:
        parts.append(f"about {eta / 60:.1f} min to the end" if eta >= 90 else f"about {eta:.0f} s to the end")
    if snap.get("flop_s"):
        parts.append(f"{snap['flop_s'] / 1e9:,.2f} GFLOP/s (6·N·D)")
    return " · ".join(parts)


# figure name -> (builder, the ChartData series it draws, whether it draws the markers, whether it draws layers)
FIGURES: dict[str, tuple[Callable[..., go.Figure], tuple[str, ...], bool, bool]] = {
    "loss": (figures.loss_figure, ("train_loss", "val_loss"), True, False),
    "lr": (figures.lr_figure, ("lr",), True, False),
    "grad_norm": (figures.grad_norm_figure, ("grad_norm",), True, False),
    "val_acc": (figures.accuracy_figure, ("val_acc",), True, False),
    "layer_grad_norm": (figures.layer_heatmap, (), False, True),
    "update_ratio": (figures.update_ratio_figure, (), False, True),
    "batch_precision": (figures.batch_precision_figure, ("batch_size", "precision"), True, False),
    "metrics": (figures.metrics_figure, (), False, False),   # the other eval metrics, drawn when a run has any
}
_figure_cache: OrderedDict[tuple, tuple[tuple, go.Figure]] = OrderedDict()
_figure_lock = threading.Lock()
FIGURE_CACHE_SIZE = 96


def _signature(data: ChartData, names: tuple[str, ...], markers: bool, layers: bool, log_y: bool) -> tuple:
    """Changes whenever what a figure draws changes (length, last point and sum of each series)."""
    sig: list[Any] = [log_y, data.x_title]
    for n in names:
        x, y = data.series.get(n, ((), ()))
        y = np.asarray(y, dtype=float)
        sig.append((len(x), float(x[-1]) if len(x) else None, float(np.nansum(y)) if len(y) else None))
    if markers:
        sig.append(tuple((m.get("x", m["step"]), m["label"]) for m in data.markers))
    if layers:
        L = data.layers
        sig.append((len(L), int(L["step"].iloc[-1]) if len(L) else None,
                    float(np.nansum(L["grad_norm"].to_numpy(float))) if len(L) else None))
    return tuple(sig)


def build_figures(key: str, data: ChartData, log_y: bool = True, smooth: float = 0.0,
                  cache: bool = True) -> dict[str, go.Figure]:
    """The live view's figures (those of ``figures.all_figures``); a figure whose data did not change since
    the last refresh of the same run is reused instead of rebuilt (a paused or ended run costs no plotly work,
    and between two evaluations only the per-step charts are redrawn).

    Each figure's ``uirevision`` names the run, the chart and its axis type: plotly keeps a user's zoom,
    pan and hidden legend entries across refreshes while it stays the same, and resets them when the view
    shows another run or switches between linear and log scale."""
    out: dict[str, go.Figure] = {}
    for name, (builder, names, markers, layers) in FIGURES.items():
        if name == "metrics":
            names = tuple(figures.other_metrics(data))
            if not names:
                continue
        sig = (_signature(data, names, markers, layers, log_y), smooth if name in SMOOTHED else 0.0)
        ck = (key, name)
        with _figure_lock:
            hit = _figure_cache.get(ck) if cache else None
        if hit is not None and hit[0] == sig:
            out[name] = hit[1]
            continue
        fig = builder(data, log_y=log_y) if name == "loss" else builder(data)
        if name in SMOOTHED and smooth > 0:
            add_smoothed(fig, SMOOTHED[name], smooth)
        fig.update_layout(uirevision=f"{key}|{name}|{'log' if log_y and name == 'loss' else 'lin'}|{data.x_title}")
        if not cache:
            out[name] = fig
            continue
        with _figure_lock:
            _figure_cache[ck] = (sig, fig)
            _figure_cache.move_to_end(ck)
            while len(_figure_cache) > FIGURE_CACHE_SIZE:
                _figure_cache.popitem(last=False)
        out[name] = fig
    return out


# figure -> the name of its trace that a smoothing weight applies to (the noisy per-step ones)
SMOOTHED = {"loss": "train loss", "grad_norm": "grad_norm"}


def ema(y: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average with weight ``weight`` (0: none), debiased so
    the first points are not pulled toward zero; NaN points are skipped and stay NaN."""
    y = np.asarray(y, dtype=float)
    out = np.full(len(y), np.nan)
    acc, n = 0.0, 0
    for i, v in enumerate(y):
        if not math.isfinite(v):
            continue
        acc = acc * weight + (1 - weight) * v
        n += 1
        out[i] = acc / (1 - weight ** n)
    return out


def add_smoothed(fig: go.Figure, trace_name: str, weight: float) -> None:
    """Draw ``trace_name`` faint and its smoothed curve on top, as TensorBoard does."""
    raw = next((t for t in fig.data if (t.name or "").lower() == trace_name), None)
    if raw is None or raw.y is None or not len(raw.y):
        return
    raw.update(opacity=0.3, showlegend=True)
    fig.add_trace(go.Scatter(x=raw.x, y=ema(np.asarray(raw.y, dtype=float), weight), mode="lines",
                             name=f"{trace_name} (smoothed {weight:.2f})", line=dict(color=raw.line.color, width=2),
                             yaxis=raw.yaxis))


def live_payload(run: Any, log_y: bool = True, n_out: int = N_OUT, cache: bool = True,
                 smooth: float = 0.0, x: str = "step") -> LivePayload:
    """Refresh ``run`` (a run handle: workbench.handle) and build the live view's figures, against ``x``
    (workbench.chartdata.X_AXES: step, time or samples)."""
    run.refresh()
    snap = run.snapshot()
    c = snap.get("controls") or {}
    data = chart_data(run, n_out=n_out, x=x,
                      samples_per_row=int(c.get("accumulate") or 1) * int(snap.get("world_size") or 1))
    key = str(run.run_dir)
    figs = build_figures(key, data, log_y, smooth, cache)
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


def kpi(value: Any, missing: str = "-") -> str:
    """A headline number short enough for a metric tile (at most ~8 characters: 0.0001234 -> 1.23e-04)."""
    text = fmt(value, ".4g", missing)
    return fmt(value, ".2e", missing) if len(text) > 8 else text


def fmt(value: Any, spec: str = ".4g", missing: str = "-") -> str:
    """A number for a status line, or ``missing`` when it is None/NaN."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return missing
    return format(v, spec) if math.isfinite(v) else missing
