"""What the charts draw, as plain data: downsampled series, a thinned per-layer table, and markers.

``chart_data(run)`` reads any run handle (a Trainer, or a run read from its directory: workbench.handle)
and returns a :class:`ChartData`; the figure builders (workbench.figures) draw it, so the notebook panel
and the dashboard draw the same charts from the same numbers. Everything is bounded however long the run:
``n_out`` points per series, ``max_cols`` logged steps in the layer table, the newest markers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

SERIES = ("train_loss", "lr", "grad_norm", "val_loss", "val_acc")
MARKER_KINDS = ("control", "checkpoint", "alert", "rollback", "policy", "fork", "resume")
MAX_CHANGE_MARKERS = 40       # newest control changes, alerts, rollbacks, ... drawn on the charts
MAX_CHECKPOINT_MARKERS = 12   # newest checkpoints (periodic ones would crowd a long run's charts)


@dataclass
class ChartData:
    """Everything the charts draw, downsampled: (x, y) arrays per series, a layer table, markers."""

    series: dict[str, tuple[np.ndarray, np.ndarray]]
    layers: pd.DataFrame                    # step, layer, grad_norm, update_ratio (steps thinned to <= max_cols)
    markers: list[dict[str, Any]] = field(default_factory=list)   # step, kind, label
    points: int = 0                         # most points in any one trace


def chart_data(run: Any, n_out: int = 2000, max_cols: int = 200) -> ChartData:
    """Downsampled series of a run (anything with ``series``, ``layer_history`` and ``events``), plus its
    per-layer statistics at <= ``max_cols`` logged steps and its newest change/checkpoint/alert markers."""
    series = {name: run.series(name, n_out) for name in SERIES}
    layers = run.layer_history
    if not layers.empty:
        layers = layers[thin_steps(layers["step"].to_numpy(), max_cols)]
        layers = layers[["step", "layer", "grad_norm", "update_ratio"]].reset_index(drop=True)
    events = run.events
    markers = markers_of(events[events["kind"].isin(MARKER_KINDS)].to_dict("records") if len(events) else [])
    points = max((len(x) for x, _ in series.values()), default=0)
    return ChartData(series=series, layers=layers, markers=markers, points=points)


def thin_steps(steps: np.ndarray, max_cols: int) -> np.ndarray:
    """A mask of the rows (ordered by step, several rows per step) that belong to at most ``max_cols``
    evenly spread steps: the columns a per-layer heatmap can show."""
    if len(steps) == 0:
        return np.zeros(0, dtype=bool)
    unique = steps[np.flatnonzero(np.r_[True, steps[1:] != steps[:-1]])]
    if len(unique) <= max_cols:
        return np.ones(len(steps), dtype=bool)
    keep = unique[np.linspace(0, len(unique) - 1, max_cols).round().astype(int)]
    return np.isin(steps, keep)


def markers_of(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The events worth a marker, as (step, kind, label): the newest checkpoints and the newest other changes,
    in log order. Every marker is drawn on every chart (a plotly shape costs about 0.1 ms to build): a long
    run that saves every few thousand steps would otherwise spend more time on markers than on curves."""
    ev = [e for e in events if e["kind"] in MARKER_KINDS]
    saves = [i for i, e in enumerate(ev) if e["kind"] == "checkpoint"][-MAX_CHECKPOINT_MARKERS:]
    others = [i for i, e in enumerate(ev) if e["kind"] != "checkpoint"][-MAX_CHANGE_MARKERS:]
    return [{"step": int(ev[i]["step"]), "kind": ev[i]["kind"], "label": marker_label(ev[i]["kind"], ev[i]["data"])}
            for i in sorted(saves + others)]


def layer_matrix(layers: pd.DataFrame, value: str = "grad_norm") -> tuple[np.ndarray, list[str], np.ndarray]:
    """(steps, layer names in model order, values[layer, step]) of a per-layer table, for a heatmap."""
    if layers.empty:
        return np.array([]), [], np.zeros((0, 0))
    li, names = pd.factorize(layers["layer"])      # codes in order of first appearance = model order
    steps, si = np.unique(layers["step"].to_numpy(), return_inverse=True)
    z = np.full((len(names), len(steps)), np.nan)
    z[li, si] = layers[value].to_numpy(dtype=float)
    return steps.astype(float), [str(n) for n in names], z


def marker_label(kind: str, data: Mapping[str, Any] | None) -> str:
    """A short text for a chart marker."""
    d = dict(data or {})
    if kind == "control":
        return f"{d.get('field')}: {_short(d.get('old'))} -> {_short(d.get('new'))}"
    if kind == "checkpoint":
        return f"checkpoint ({d.get('reason', '')})"
    if kind == "alert":
        return f"{d.get('severity', '')}: {d.get('kind', '')}"
    if kind == "rollback":
        return f"rollback to step {d.get('to_state_of_step')}"
    return kind


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def time_since(t: float | None) -> str:
    """'12 s ago' style text for status lines."""
    if t is None or not math.isfinite(t):
        return "-"
    d = max(0.0, time.time() - t)
    return f"{d:.0f} s ago" if d < 120 else f"{d / 60:.0f} min ago" if d < 7200 else f"{d / 3600:.0f} h ago"
