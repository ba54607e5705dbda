"""Live plotly charts for the notebook panel: FigureWidgets built once, then updated in place.

The look of every chart comes from the shared builders in :mod:`workbench.figures` (the dashboard draws
the same ones). Rebuilding a figure per refresh costs ~100 ms for six charts, so :class:`LiveCharts`
builds them once and afterwards only assigns the new (downsampled) arrays to the existing traces inside
``fig.batch_update()``, one message per figure. Change/checkpoint/alert markers are drawn as a few line
traces (``x = [s, s, None, ...]``) rather than hundreds of layout shapes, whose validation alone takes
tens of milliseconds; the newest alerts are labelled in text next to their marker. Every trace holds a
bounded number of points: the metric store's downsampled series (``n_out``), the newest markers
(chartdata.markers_of) and ``max_cols`` heatmap columns, however long the run.

Updates only touch trace data, never the axes' ranges, and the figures carry ``uirevision``: a zoom or a
legend entry the user hid stays while the run goes on. Series go to the browser as float arrays (binary
buffers, where NaN is allowed); the heatmap's 2-D values as rows holding None, since JSON has no NaN.
"""
from __future__ import annotations

import time
from typing import Any, Iterable

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .. import figures
from ..chartdata import ChartData, chart_data, layer_matrix, markers_of, thin_steps

CHART_NAMES = ("loss", "lr", "grad_norm", "val_acc", "layer_grad_norm", "update_ratio")
LINE_CHARTS = ("loss", "lr", "grad_norm", "val_acc")           # charts that carry markers
MARKER_GROUPS: dict[str, tuple[str, ...]] = {                    # one line trace per group
    "changes": ("control", "rollback", "policy", "fork", "resume"),
    "checkpoints": ("checkpoint",),
    "alerts": ("alert",),
}
_UNSET = object()
ACK_TIMEOUT = 5.0          # s: stop waiting for a frontend's answer to a chart update after this
SERIES = {"loss": ("train_loss", "val_loss"), "lr": ("lr",), "grad_norm": ("grad_norm",), "val_acc": ("val_acc",)}
CHART_WIDTH = 480          # px per live chart, two per row: fits JupyterLab's notebook at a 1,100 px wide window
MAX_ALERT_NOTES = 8        # alert labels shown per chart (the newest); every alert still has its marker


def empty_data() -> ChartData:
    """A ChartData with no points (the charts' starting state)."""
    layers = pd.DataFrame({"step": pd.Series(dtype="int64"), "layer": pd.Series(dtype=str),
                           "grad_norm": pd.Series(dtype=float), "update_ratio": pd.Series(dtype=float)})
    return ChartData(series={}, layers=layers, markers=[], points=0)


def _arrays(data: ChartData, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) float arrays of one series; inf becomes NaN (a gap), as in figures._xy."""
    x, y = data.series.get(name, (np.array([]), np.array([])))
    y = np.asarray(y, dtype=float)
    return np.asarray(x, dtype=float), np.where(np.isfinite(y), y, np.nan)


def _alert_text(label: str) -> str:
    """An alert marker's label on the chart: its kind (the colour and the hover text give the severity)."""
    return label.split(": ", 1)[-1]


def _marker_group(markers: Iterable[dict[str, Any]], kinds: tuple[str, ...], x_end: float = 0.0) -> dict[str, Any]:
    """The markers of some kinds as arrays: vertical lines (x = [s, s, nan, ...], y = [0, 1, nan, ...], NaN
    breaks the line) and one hover point per marker (step, label, colour). Alert labels sit under their
    triangle, written leftwards unless the marker is in the first third of the run (``x_end``: its last
    step), so that no label runs off the chart's edge."""
    ms = [m for m in markers if m["kind"] in kinds]
    steps = np.array([m["step"] for m in ms], dtype=float)
    line_x = np.repeat(steps, 3)
    line_x[2::3] = np.nan
    line_y = np.tile([0.0, 1.0, np.nan], len(ms))
    labels = [m["label"] for m in ms]
    shown = len(ms) - MAX_ALERT_NOTES
    return {"key": tuple((m["step"], m["kind"], m["label"]) for m in ms), "line_x": line_x, "line_y": line_y,
            "x": steps, "y": np.ones(len(ms)), "labels": labels,
            "text": ["" if i < shown else _alert_text(t) for i, t in enumerate(labels)] if "alert" in kinds else [],
            "position": ["bottom right" if s < x_end / 3 else "bottom left" for s in steps],
            "color": [figures.MARKER_COLORS.get(m["kind"], "#999") for m in ms]}


def _marker_traces() -> list[go.Scatter]:
    """The fixed marker traces of a line chart: per group a line trace (the vertical lines) and a points
    trace (a triangle on top of each line, its label on hover), as figures._add_markers draws them."""
    lines, points = [], []
    for group, kinds in MARKER_GROUPS.items():
        kind = kinds[0]
        lines.append(go.Scatter(x=[], y=[], yaxis="y2", mode="lines", name=group, hoverinfo="skip",
                                showlegend=False, line=dict(color=figures.MARKER_COLORS.get(kind, "#999"), width=1,
                                                            dash="dot" if kind == "checkpoint" else "dash")))
        # alerts: "markers+text", the newest MAX_ALERT_NOTES labelled under their triangle (the live
        # counterpart of layout annotations, which cost ~8 ms per chart to validate on every change)
        points.append(go.Scatter(x=[], y=[], yaxis="y2", mode="markers+text" if group == "alerts" else "markers",
                                 name=f"{group} (events)", text=[], customdata=[], showlegend=False,
                                 textposition="bottom left", cliponaxis=False,
                                 textfont=dict(size=10, color=figures.MARKER_COLORS.get(kind, "#999")),
                                 marker=dict(symbol="triangle-down", size=9,
                                             color=figures.MARKER_COLORS.get(kind, "#999")),
                                 hovertemplate="step %{x}: %{customdata}<extra></extra>"))
    return lines + points


def alert_annotations(markers: list[dict[str, Any]], limit: int = MAX_ALERT_NOTES,
                      x_end: float = 0.0) -> list[dict[str, Any]]:
    """Text annotations (newest ``limit``) for the alert markers, hanging down from the top of their line
    inside the plot (above it they would cover the legend), written towards the middle of the chart."""
    alerts = [m for m in markers if m["kind"] == "alert"][-limit:]
    return [dict(x=m["step"], y=1.0, xref="x", yref="paper", text=_alert_text(m["label"]), showarrow=False,
                 yanchor="top", xanchor="left" if m["step"] < x_end / 3 else "right",
                 font=dict(size=10, color=figures.MARKER_COLORS["alert"]), bgcolor="rgba(255,255,255,0.8)")
            for m in alerts]


def _x_end(data: ChartData) -> float:
    x, _ = data.series.get("train_loss", (np.array([]), np.array([])))
    return float(x[-1]) if len(x) else 0.0


def static_figures(data: ChartData, log_y: bool = True) -> dict[str, go.Figure]:
    """The shared builders' figures (figures.all_figures) with alert annotations: the no-widget fallback."""
    figs = figures.all_figures(data, log_y=log_y)
    notes = alert_annotations(data.markers, x_end=_x_end(data))
    if notes:
        for name in LINE_CHARTS:
            figs[name].update_layout(annotations=list(figs[name].layout.annotations) + notes)
    return figs


class LiveSource:
    """The ChartData of a live Trainer, collected incrementally (what ``chartdata.chart_data`` returns, cheaper).

    ``chart_data`` rebuilds the whole per-layer table (one row per parameter tensor every ``layer_every``
    steps, with names) and every marker on each call, a cost that grows with the run. Here the series come
    from the metric store's downsampled views every time (bounded by ``n_out``), the val series only after a
    new evaluation, the layer table from the store's numeric columns only when new rows arrived (numpy,
    thinned to ``max_cols`` steps) and the markers only when the event log grew. Everything is read through
    the Trainer's public polling calls (``layer_count``/``layer_columns``, ``event_count``/``event_list``);
    an object without them (a run read from disk) falls back to ``chart_data``.
    """

    def __init__(self, tr: Any, n_out: int = 2000, max_cols: int = 200) -> None:
        self.tr, self.n_out, self.max_cols = tr, int(n_out), int(max_cols)
        self.names = np.asarray(tr.layer_names if hasattr(tr, "layer_names") else
                                [n for n, p in tr.model.named_parameters() if p.requires_grad], dtype=object)
        self._val: tuple[Any, dict] = (None, {})
        self._layers: tuple[Any, pd.DataFrame] = (None, empty_data().layers)
        self._markers: tuple[Any, list] = (None, [])
        self.checkpoint_events = 0            # how many checkpoint events the run has logged (seen at collect)

    def collect(self) -> ChartData:
        tr = self.tr
        if not (hasattr(tr, "layer_columns") and hasattr(tr, "event_list")):
            return chart_data(tr, n_out=self.n_out, max_cols=self.max_cols)
        series = {name: tr.series(name, self.n_out) for name in ("train_loss", "lr", "grad_norm")}
        key = tr.last_eval.get("step")
        if key != self._val[0] or not self._val[1]:
            self._val = (key, {name: tr.series(name, self.n_out) for name in ("val_loss", "val_acc")})
        series.update(self._val[1])
        key = tr.layer_count
        if key != self._layers[0]:
            self._layers = (key, self._layer_table())
        n_events = tr.event_count
        if n_events != self._markers[0]:
            self._markers = (n_events, self._marker_list())
        points = max((len(x) for x, _ in series.values()), default=0)
        return ChartData(series=series, layers=self._layers[1], markers=self._markers[1], points=points)

    def _layer_table(self) -> pd.DataFrame:
        cols = self.tr.layer_columns(("step", "layer", "grad_norm", "update_ratio"))
        steps = cols["step"]
        if not len(steps):
            return empty_data().layers
        mask = thin_steps(steps, self.max_cols)   # rows arrive step by step
        idx = cols["layer"][mask].astype(int)
        return pd.DataFrame({"step": steps[mask].astype("int64"), "layer": self.names[idx],
                             "grad_norm": cols["grad_norm"][mask], "update_ratio": cols["update_ratio"][mask]})

    def _marker_list(self) -> list[dict[str, Any]]:
        events = self.tr.event_list()        # the log's dicts (tr.events builds a DataFrame: slower)
        self.checkpoint_events = sum(1 for e in events if e["kind"] == "checkpoint")
        return markers_of(events)


def _heatmap_z(z: np.ndarray) -> list[list[float | None]]:
    """log10 of the per-layer values (as figures.layer_heatmap draws them); non-positive -> None. Rows of
    Python floats: a 2-D array goes to the browser as JSON, where NaN is not allowed (jupyter_client
    prints a warning for every such message)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logz = np.where(z > 0, np.log10(z), np.nan)
    return np.where(np.isfinite(logz), logz, None).tolist()


def _placeholder(layer_names: list[str] | None) -> ChartData:
    """Empty data that still names the layers, so the update-ratio chart gets one trace per weight tensor
    from the start (rebuilding traces at the first data would cost that refresh ~70 ms)."""
    data = empty_data()
    if layer_names:
        data.layers = pd.DataFrame({"step": 0, "layer": list(layer_names), "grad_norm": np.nan,
                                    "update_ratio": np.nan})
    return data


class LiveCharts:
    """The panel's six FigureWidgets: loss (train/val, log-y toggle), lr, grad norm, val accuracy, per-layer
    gradient-norm heatmap (layers x steps) and update/weight ratio per layer."""

    def __init__(self, log_y: bool = True, layer_names: list[str] | None = None) -> None:
        start = static_figures(_placeholder(layer_names), log_y=log_y)
        self.figs: dict[str, go.FigureWidget] = {}
        for name in CHART_NAMES:
            fig = start[name]
            # a fixed width: a FigureWidget rendered into a grid cell cannot always measure the cell and would
            # fall back to plotly's 700 px, wider than the cell (the panel's grid wraps to one column instead)
            fig.update_layout(width=CHART_WIDTH)
            if name in LINE_CHARTS:
                fig.add_traces(_marker_traces())
                fig.update_layout(yaxis2=dict(overlaying="y", range=[0, 1.05], visible=False, fixedrange=True))
            self.figs[name] = go.FigureWidget(fig)
        self._n_series = {name: (2 if name == "loss" else 1) for name in LINE_CHARTS}
        self._marker_keys: dict[tuple[str, str], tuple] = {}   # (chart, marker group) -> markers drawn
        self._layers_key: dict[str, tuple] = {}                 # layer chart -> layer table drawn
        self._drawn: dict[tuple[str, str], Any] = {}            # (chart, series) -> the (x, y) tuple drawn
        self._acked: set[str] = set()                           # charts a frontend has answered for
        self._sent: dict[str, float] = {}
        self.pending = False      # a chart was skipped while its frontend was busy: update again soon
        self.log_y = log_y
        for name, fig in self.figs.items():
            fig.observe(lambda change, name=name: self._acked.add(name) if change["new"] else None,
                        names="_js2py_traceDeltas")

    # ------------------------------------------------------------------ updates
    def set_log_y(self, on: bool) -> None:
        """Log or linear y axis of the loss chart."""
        self.log_y = bool(on)
        self.figs["loss"].layout.yaxis.type = "log" if on else "linear"

    def invalidate(self) -> None:
        """Forget what was drawn: the next update rewrites every trace."""
        self._marker_keys.clear()
        self._layers_key.clear()
        self._drawn.clear()

    def reset(self, layer_names: list[str] | None = None) -> None:
        """Clear the charts for another run (with its parameter names), unzoomed."""
        self.invalidate()
        self._sent.clear()
        for name, fig in self.figs.items():
            with fig.batch_update():
                fig.layout.xaxis.autorange = True
                if name == "val_acc":
                    fig.layout.yaxis.range = list(figures.ACCURACY_RANGE)
                else:
                    fig.layout.yaxis.autorange = "reversed" if name == "layer_grad_norm" else True
        self._rebuild_ratio(_placeholder(layer_names))
        self.update(empty_data())

    def _rebuild_ratio(self, data: ChartData) -> None:
        """Replace the update-ratio traces by the shared builder's (a new set of layers)."""
        fig = self.figs["update_ratio"]
        fresh = figures.update_ratio_figure(data)
        fig.data = ()                    # adding/removing traces is not allowed inside batch_update
        fig.add_traces(list(fresh.data))

    def _busy(self, name: str, now: float) -> bool:
        """Backpressure: a frontend that has answered before has not yet drawn this chart's last update.

        After each update every view of a FigureWidget sends the drawn traces back to the kernel, which
        processes them on its main thread; sending faster than the browser draws piles up messages and
        delays button clicks by seconds. Without a frontend (tests, nbconvert) nothing ever answers, so
        nothing is held back; an answer lost for ``ACK_TIMEOUT`` seconds stops holding back too.
        """
        fig = self.figs[name]
        return (name in self._acked and bool(getattr(fig, "_trace_edit_in_process", False))
                and now - self._sent.get(name, 0.0) < ACK_TIMEOUT)

    def update(self, data: ChartData) -> None:
        """Put new downsampled data into the existing traces (one batched message per figure); a chart
        whose frontend is still drawing the previous update is skipped and :attr:`pending` set."""
        self.pending = False
        now = time.monotonic()
        x_end = _x_end(data)
        groups = {g: _marker_group(data.markers, kinds, x_end) for g, kinds in MARKER_GROUPS.items()}
        n_groups = len(MARKER_GROUPS)
        for name, names in SERIES.items():
            fig = self.figs[name]
            fresh = [s for s in names if self._drawn.get((name, s), _UNSET) is not data.series.get(s)]
            stale = [g for g in MARKER_GROUPS if self._marker_keys.get((name, g)) != groups[g]["key"]]
            if not fresh and not stale:
                continue  # e.g. the val series between two evaluations: the same arrays as last time
            if self._busy(name, now):
                self.pending = True
                continue
            with fig.batch_update():
                for s in fresh:
                    i = names.index(s)
                    x, y = _arrays(data, s)
                    fig.data[i].x, fig.data[i].y = x, y
                    self._drawn[(name, s)] = data.series.get(s)
                    if s == "val_acc":   # the "no accuracy yet" note goes at the first point
                        notes = () if np.isfinite(y).any() else (figures.accuracy_note(),)
                        if len(fig.layout.annotations) != len(notes):
                            fig.layout.annotations = notes
                k = self._n_series[name]
                for j, g in enumerate(MARKER_GROUPS):
                    if g not in stale:
                        continue
                    m = groups[g]
                    line, pts = fig.data[k + j], fig.data[k + n_groups + j]
                    line.x, line.y = m["line_x"], m["line_y"]
                    pts.x, pts.y, pts.customdata = m["x"], m["y"], m["labels"]
                    if g == "alerts":
                        pts.text, pts.textposition = m["text"], m["position"]
                    if g == "changes":   # control, rollback, policy, fork, resume: one colour each
                        pts.marker.color = m["color"]
                    self._marker_keys[(name, g)] = m["key"]
            self._sent[name] = now
        self._update_layers(data, now)

    def _update_layers(self, data: ChartData, now: float) -> None:
        L = data.layers
        key = (len(L), int(L["step"].iloc[-1]) if len(L) else -1, int(L["step"].iloc[0]) if len(L) else -1)
        todo = [n for n in ("layer_grad_norm", "update_ratio") if self._layers_key.get(n) != key]
        if not todo:
            return
        steps, layers, z = layer_matrix(L, "grad_norm")
        if "layer_grad_norm" in todo:
            if self._busy("layer_grad_norm", now):
                self.pending = True
            else:
                heat = self.figs["layer_grad_norm"]
                with heat.batch_update():
                    tr = heat.data[0]
                    tr.x, tr.y, tr.z = steps, layers, _heatmap_z(z)
                    height = max(250, 40 + 22 * len(layers))
                    if heat.layout.height != height:
                        heat.layout.height = height
                self._layers_key["layer_grad_norm"] = key
                self._sent["layer_grad_norm"] = now
        if "update_ratio" not in todo:
            return
        if self._busy("update_ratio", now):
            self.pending = True
            return
        fig = self.figs["update_ratio"]
        self._layers_key["update_ratio"] = key
        self._sent["update_ratio"] = now
        weights = [name for name in layers if name.endswith("weight")]
        if L.empty:                            # no layer statistics yet: keep the traces, without points
            with fig.batch_update():
                for trace in fig.data:
                    trace.x, trace.y = [], []
            return
        if [t.name for t in fig.data] != weights:
            self._rebuild_ratio(data)          # another set of layers than the traces show
            return
        _, _, ratio = layer_matrix(L, "update_ratio")
        rows = {name: i for i, name in enumerate(layers)}
        with fig.batch_update():
            for trace in fig.data:
                y = ratio[rows[trace.name]]
                ok = ~np.isnan(y)              # a layer missing at a step: no point (the builder has none either)
                trace.x, trace.y = steps[ok], y[ok]

    # ------------------------------------------------------------------ reading back
    def points(self) -> int:
        """Most points in any one trace of any chart (bounded by n_out, the marker cap and max_cols)."""
        most = 0
        for fig in self.figs.values():
            for t in fig.data:
                if t.type == "heatmap":
                    most = max(most, len(t.x) if t.x is not None else 0)
                elif t.x is not None:
                    most = max(most, len(t.x))
        return most
