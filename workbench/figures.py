"""Plot builders: pure functions from stored series (``chartdata.ChartData``) to plotly figures.

Shared by the notebook panel and the Streamlit dashboard, so both draw the same charts from the same
numbers. They read only the data they are given — never a trainer — and every trace holds at most
the downsampled points (about 2,000), so a long run draws as fast as a short one.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from .chartdata import ChartData, layer_matrix
from .rundir.tb import PRECISION_CODES

COLORS = {"train": "#1f77b4", "val": "#ff7f0e", "lr": "#2ca02c", "grad": "#9467bd", "acc": "#d62728"}
MARKER_COLORS = {"control": "#17becf", "checkpoint": "#7f7f7f", "alert": "#d62728", "rollback": "#e377c2",
                 "policy": "#bcbd22", "fork": "#8c564b", "resume": "#8c564b"}
# plotly_white, cut to what 2-D line charts and heatmaps read. The whole template (every trace type's defaults,
# 3-D scenes, maps, polar axes) is validated and deep-copied into each figure: 22 of the 23 ms a figure took
# to build, paid for every chart at every live refresh, and 7 kB more JSON per chart for the browser to parse.
_WHITE = pio.templates["plotly_white"]
TEMPLATE = go.layout.Template(
    layout={k: _WHITE.layout[k] for k in ("autotypenumbers", "colorway", "font", "hovermode", "hoverlabel",
                                          "paper_bgcolor", "plot_bgcolor", "colorscale", "xaxis", "yaxis",
                                          "shapedefaults", "annotationdefaults", "title")},
    data={"scatter": _WHITE.data.scatter, "heatmap": _WHITE.data.heatmap}).to_plotly_json()
# Title top left, the legend on its own row under it, the modebar standing on the right edge (lying along the
# top it would cover long titles). ``uirevision`` keeps a user's zoom and hidden legend entries while the data
# changes; a view showing another run can set its own value to start that run unzoomed.
LAYOUT = dict(height=300, margin=dict(l=60, r=40, t=62, b=40),
              title=dict(x=0.01, xanchor="left", y=0.98, yanchor="top", font=dict(size=14)),
              legend=dict(orientation="h", x=0, xanchor="left", y=1.0, yanchor="bottom", font=dict(size=11)),
              modebar=dict(orientation="v"), hovermode="x unified", template=TEMPLATE, uirevision="run")
# Log-axis tick labels written out in full (plotly's default abbreviates 2x and 5x ticks to "2" and "5", and
# writes small numbers with SI prefixes: 100µ): plain numbers where they are short, exponents for the lr.
PLAIN_TICKS = dict(tickformat="~g")
EXP_TICKS = dict(tickformat=".0e")
ACCURACY_RANGE = (0, 1.02)
PRECISIONS = {float(code): name for name, code in PRECISION_CODES.items()}   # the step rows' codes -> names
EMPTY_NOTE = dict(xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False, font=dict(color="#888"))


def _xy(data: ChartData, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Float arrays of one series. plotly cannot draw inf; NaN draws as a gap, which is what a diverged step
    should look like. Arrays rather than lists: a widget sends them as binary buffers and a JSON export
    writes NaN as null, where a list holding NaN is JSON no browser accepts."""
    x, y = data.series.get(name, (np.array([]), np.array([])))
    y = np.asarray(y, dtype=float)
    return np.asarray(x, dtype=float), np.where(np.isfinite(y), y, np.nan)


def _add_markers(fig: go.Figure, data: ChartData) -> None:
    """Vertical lines at live changes, checkpoints and rollbacks; alerts as labelled points on top."""
    if not data.markers:
        return
    shapes = []
    hover_x, hover_text, hover_color = [], [], []
    for m in data.markers:
        color = MARKER_COLORS.get(m["kind"], "#999")
        x = m.get("x", m["step"])
        shapes.append(dict(type="line", xref="x", yref="paper", x0=x, x1=x, y0=0, y1=1,
                           line=dict(color=color, width=1, dash="dot" if m["kind"] == "checkpoint" else "dash"),
                           layer="below"))
        hover_x.append(x)
        hover_text.append(f"step {m['step']}: {m['label']}")
        hover_color.append(color)
    fig.update_layout(shapes=shapes)
    fig.add_trace(go.Scatter(x=hover_x, y=[1.0] * len(hover_x), yaxis="y2", mode="markers", name="events",
                             marker=dict(symbol="triangle-down", size=9, color=hover_color),
                             text=hover_text, hovertemplate="%{text}<extra></extra>"))
    fig.update_layout(yaxis2=dict(overlaying="y", range=[0, 1.05], visible=False, fixedrange=True))


def loss_figure(data: ChartData, log_y: bool = False, title: str = "Loss") -> go.Figure:
    """Train loss (line) and val loss (line + points) vs step, with change/checkpoint/alert markers."""
    fig = go.Figure(layout=dict(LAYOUT, title=_title(title)))
    x, y = _xy(data, "train_loss")
    fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name="train loss", line=dict(color=COLORS["train"])))
    x, y = _xy(data, "val_loss")
    fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name="val loss", line=dict(color=COLORS["val"])))
    fig.update_yaxes(type="log" if log_y else "linear", title="loss", **PLAIN_TICKS)
    fig.update_xaxes(title=data.x_title)
    _add_markers(fig, data)
    return fig


def _title(text: str) -> dict[str, Any]:
    return dict(LAYOUT["title"], text=text)


def line_figure(data: ChartData, name: str, title: str, *, log_y: bool = False, color: str = "#1f77b4",
                y_title: str | None = None, ticks: Mapping[str, Any] | None = None) -> go.Figure:
    """One downsampled series vs step (lr, grad norm, val acc), with markers."""
    fig = go.Figure(layout=dict(LAYOUT, title=_title(title)))
    x, y = _xy(data, name)
    mode = "lines+markers" if name.startswith("val_") else "lines"
    fig.add_trace(go.Scatter(x=x, y=y, mode=mode, name=name, line=dict(color=color)))
    fig.update_yaxes(type="log" if log_y else "linear", title=y_title or name, **(ticks or {}))
    fig.update_xaxes(title=data.x_title)
    _add_markers(fig, data)
    return fig


def lr_figure(data: ChartData) -> go.Figure:
    return line_figure(data, "lr", "Learning rate", log_y=True, color=COLORS["lr"], y_title="lr", ticks=EXP_TICKS)


def grad_norm_figure(data: ChartData) -> go.Figure:
    return line_figure(data, "grad_norm", "Global gradient norm (before clipping)", log_y=True, color=COLORS["grad"],
                       y_title="grad norm", ticks=PLAIN_TICKS)


def accuracy_figure(data: ChartData) -> go.Figure:
    """Validation accuracy on a fixed 0-1 axis; until the first evaluation a note says why it is empty."""
    fig = line_figure(data, "val_acc", "Validation accuracy", color=COLORS["acc"], y_title="accuracy",
                      ticks=dict(range=list(ACCURACY_RANGE), tickformat=".0%"))
    if not np.isfinite(_xy(data, "val_acc")[1]).any():
        fig.update_layout(annotations=[accuracy_note()])
    return fig


def accuracy_note() -> dict[str, Any]:
    """The note an accuracy chart without points shows (no evaluation yet, or a task without accuracy)."""
    return dict(EMPTY_NOTE, text="no accuracy yet: it appears at the first evaluation")


def other_metrics(data: ChartData) -> list[str]:
    """The evaluation metrics beyond loss and accuracy a run records (perplexity, F1, AUC, the user's own)."""
    return [n for n in data.series if n.startswith("val_") and n not in ("val_loss", "val_acc")]


def batch_precision_figure(data: ChartData) -> go.Figure:
    """The batch size (left axis) and the precision (right axis, by name) in force at each step, drawn as
    steps: the two controls that change the meaning of a step's loss and speed when they change mid-run."""
    fig = go.Figure(layout=dict(LAYOUT, title=_title("Batch size and precision")))
    x, y = _xy(data, "batch_size")
    fig.add_trace(go.Scatter(x=x, y=y, mode="lines", line_shape="hv", name="batch size",
                             line=dict(color=COLORS["train"])))
    x, y = _xy(data, "precision")
    fig.add_trace(go.Scatter(x=x, y=y, mode="lines", line_shape="hv", name="precision", yaxis="y3",
                             line=dict(color=COLORS["val"], dash="dot"), customdata=[PRECISIONS.get(v, "") for v in y],
                             hovertemplate="%{customdata}<extra>precision</extra>"))
    fig.update_yaxes(title="batch size", rangemode="tozero")
    fig.update_layout(yaxis3=dict(overlaying="y", side="right", range=[-0.3, len(PRECISIONS) - 0.7], fixedrange=True,
                                  tickvals=list(PRECISIONS), ticktext=list(PRECISIONS.values()), showgrid=False))
    fig.update_xaxes(title=data.x_title)
    fig.update_layout(margin=dict(LAYOUT["margin"], r=64))   # room for the precision names on the right
    _add_markers(fig, data)
    return fig


def metrics_figure(data: ChartData) -> go.Figure:
    """The other evaluation metrics, one line per metric (workbench.evalmetrics); a note while there are none."""
    fig = go.Figure(layout=dict(LAYOUT, title=_title("Validation metrics"), hovermode="x unified"))
    for name in other_metrics(data):
        x, y = _xy(data, name)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name[4:]))
    if not fig.data:
        fig.update_layout(annotations=[dict(EMPTY_NOTE, text="no other metrics: perplexity, F1/AUC and your "
                                                              "metrics= appear here")])
    fig.update_xaxes(title=data.x_title)
    return fig


def layer_heatmap(data: ChartData, value: str = "grad_norm", title: str | None = None) -> go.Figure:
    """Per-layer heatmap (layers x steps) of log10(value): vanishing/exploding gradients show as bands."""
    steps, layers, z = layer_matrix(data.layers, value)
    with np.errstate(divide="ignore", invalid="ignore"):
        logz = np.where(z > 0, np.log10(z), np.nan)
    fig = go.Figure(layout=dict(LAYOUT, title=_title(title or f"Per-layer {value.replace('_', ' ')} (log10)"),
                                height=max(250, 40 + 22 * len(layers)), hovermode="closest"))
    xs = steps.astype(int).tolist() if data.x_title == "step" else steps.tolist()
    fig.add_trace(go.Heatmap(x=xs, y=layers, z=np.where(np.isfinite(logz), logz, None).tolist(),
                             colorscale="Viridis", colorbar=dict(title="log10"),
                             hovertemplate=f"{data.x_title} %{{x}}<br>%{{y}}<br>log10 = %{{z:.2f}}<extra></extra>"))
    fig.update_xaxes(title=data.x_title)
    fig.update_yaxes(autorange="reversed")
    return fig


def update_ratio_figure(data: ChartData) -> go.Figure:
    """Update/weight ratio ||dW||/||W|| per weight tensor (log y) with the ~1e-3 rule-of-thumb line."""
    fig = go.Figure(layout=dict(LAYOUT, title=_title("Update / weight ratio per layer"), hovermode="closest"))
    L = data.layers
    if not L.empty:
        for name, g in L[L["layer"].str.endswith("weight")].groupby("layer", sort=False):
            fig.add_trace(go.Scatter(x=g["step"].to_numpy(float), y=g["update_ratio"].to_numpy(float), mode="lines",
                                     name=name))
    fig.add_hline(y=1e-3, line=dict(color="#999", dash="dot"), annotation_text="~1e-3 healthy")
    fig.update_yaxes(type="log", title="ratio", **EXP_TICKS)
    fig.update_xaxes(title=data.x_title)
    return fig


def compare_figure(runs: Mapping[str, ChartData], metric: str = "train_loss", log_y: bool = False) -> go.Figure:
    """The same metric of several runs overlaid (forks and their parent, or any runs)."""
    fig = go.Figure(layout=dict(LAYOUT, title=_title(f"{metric} — comparison"), hovermode="closest"))
    for name, data in runs.items():
        x, y = _xy(data, metric)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers" if metric.startswith("val_") else "lines",
                                 name=name))
    fig.update_yaxes(type="log" if log_y else "linear", title=metric, **(PLAIN_TICKS if log_y else {}))
    fig.update_xaxes(title=next((d.x_title for d in runs.values()), "step"))
    return fig


def lr_find_figure(lrs: list[float], losses: list[float], suggestion: float | None = None) -> go.Figure:
    """Loss vs learning rate from an lr range test (log x), with the suggested lr marked."""
    fig = go.Figure(layout=dict(LAYOUT, title=_title("LR range test"), hovermode="closest"))
    fig.add_trace(go.Scatter(x=list(lrs), y=list(losses), mode="lines", name="smoothed loss"))
    if suggestion:
        fig.add_vline(x=suggestion, line=dict(color="#d62728", dash="dash"),
                      annotation_text=f"suggested {suggestion:.2g}")
    fig.update_xaxes(type="log", title="learning rate", **EXP_TICKS)
    fig.update_yaxes(title="loss")
    return fig


def all_figures(data: ChartData, log_y: bool = False) -> dict[str, go.Figure]:
    """Every chart of a run, by name (the dashboard and the static notebook fallback use this)."""
    return {"loss": loss_figure(data, log_y=log_y), "lr": lr_figure(data), "grad_norm": grad_norm_figure(data),
            "val_acc": accuracy_figure(data), "layer_grad_norm": layer_heatmap(data),
            "update_ratio": update_ratio_figure(data), "batch_precision": batch_precision_figure(data), **({"metrics": metrics_figure(data)} if other_metrics(data)
                                                          else {})}


def trace_points(fig: go.Figure) -> int:
    """Most points in any one trace of a figure (to check the per-trace bound)."""
    counts: list[Any] = [len(t.x) if getattr(t, "x", None) is not None else 0 for t in fig.data]
    return max(counts, default=0)
