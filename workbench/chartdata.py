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

SERIES = ("train_loss", "lr", "grad_norm", "val_loss", "val_acc", "batch_size", "precision")
# what the charts' x axis can count, and its title: the step (as TensorBoard's STEP), the wall time since
# the run's first step (RELATIVE) and the samples trained on (W&B's custom x-axis)
X_AXES = {"step": "step", "time": "seconds since the first step", "samples": "samples trained on"}
MARKER_KINDS = ("control", "checkpoint", "alert", "rollback", "policy", "fork", "resume", "status", "command")
MAX_CHANGE_MARKERS = 40       # newest control changes, alerts, rollbacks, ... drawn on the charts
MAX_CHECKPOINT_MARKERS = 12   # newest checkpoints (periodic ones would crowd a long run's charts)
RATE_WINDOW_S = 2.0           # samples/s is the average over the newest steps of about this much wall time
RATE_TAIL = 1024              # at most this many step rows are read for it
RATE_COLUMNS = ("batch_size", "samples_per_s")


@dataclass
class ChartData:
    """Everything the charts draw, downsampled: (x, y) arrays per series, a layer table, markers."""

    series: dict[str, tuple[np.ndarray, np.ndarray]]
    layers: pd.DataFrame                    # step, layer, grad_norm, update_ratio (steps thinned to <= max_cols)
    markers: list[dict[str, Any]] = field(default_factory=list)   # step, x, kind, label
    points: int = 0                         # most points in any one trace
    x_title: str = "step"                   # what the x of every series, layer row and marker counts


def chart_data(run: Any, n_out: int = 2000, max_cols: int = 200, x: str = "step",
               samples_per_row: int = 1) -> ChartData:
    """Downsampled series of a run (anything with ``series``, ``layer_history`` and ``events``), plus its
    per-layer statistics at <= ``max_cols`` logged steps and its newest change/checkpoint/alert markers.

    ``x`` picks what the x values count (:data:`X_AXES`): steps, seconds since the first step, or samples
    trained on — the logged batch size of every step times ``samples_per_row`` (gradient accumulation x
    processes, which the step rows do not hold)."""
    if x not in X_AXES:
        raise ValueError(f"x axis {x!r}: allowed: {', '.join(X_AXES)}")
    names = [*SERIES, *(n for n in getattr(run, "eval_names", ()) if n not in SERIES)]   # and the other metrics
    series = {name: run.series(name, n_out) for name in names}
    batch = series["batch_size"]
    series["batch_size"], series["precision"] = changes_only(*batch), changes_only(*series["precision"])
    layers = run.layer_history
    if not layers.empty:
        layers = layers[thin_steps(layers["step"].to_numpy(), max_cols)]
        layers = layers[["step", "layer", "grad_norm", "update_ratio"]].reset_index(drop=True)
    events = run.events
    markers = markers_of(events[events["kind"].isin(MARKER_KINDS)].to_dict("records") if len(events) else [])
    data = ChartData(series=series, layers=layers, markers=markers)
    if x == "time":
        steps, t = run.series("time", n_out)
        rebase(data, (steps, t - t[0] if len(t) else t), X_AXES[x])
    elif x == "samples":
        rebase(data, samples_clock(*batch, samples_per_row), X_AXES[x])
    data.points = max((len(xs) for xs, _ in data.series.values()), default=0)
    return data


def changes_only(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A piecewise-constant series (batch size, precision) reduced to the points where it changes and its
    last point: drawn as steps (``line_shape="hv"``), it is the same curve in a few points."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(y) < 3:
        return x, y
    keep = np.r_[True, y[1:] != y[:-1]]
    keep[-1] = True
    return x[keep], y[keep]


def samples_clock(steps: np.ndarray, batch: np.ndarray, per_row: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(step, samples trained on by the end of that step) from a (downsampled) batch-size series: the batch
    size at a point holds for the steps since the previous point (exact where no point was dropped)."""
    steps, batch = np.asarray(steps, dtype=float), np.nan_to_num(np.asarray(batch, dtype=float))
    if not len(steps):
        return steps, steps
    width = np.diff(steps, prepend=0.0)
    return steps, np.cumsum(batch * width) * per_row


def rebase(data: ChartData, clock: tuple[np.ndarray, np.ndarray], title: str) -> None:
    """Move every x of ``data`` from steps to the clock's values, (step, value) points interpolated between
    (a run without steps yet keeps its steps)."""
    cx, cy = (np.asarray(a, dtype=float) for a in clock)
    ok = np.isfinite(cx) & np.isfinite(cy)
    cx, cy = cx[ok], cy[ok]
    if not len(cx):
        return

    def at(steps: Any) -> np.ndarray:
        return np.interp(np.asarray(steps, dtype=float), cx, cy)

    data.series = {n: (at(xs), ys) for n, (xs, ys) in data.series.items()}
    if not data.layers.empty:
        data.layers = data.layers.assign(step=at(data.layers["step"].to_numpy()))
    for m in data.markers:
        m["x"] = float(at(m["step"]))
    data.x_title = title


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
    ev = [e for e in events if e["kind"] in MARKER_KINDS and _worth_a_marker(e)]
    best = [i for i, e in enumerate(ev) if e["kind"] == "checkpoint" and (e["data"] or {}).get("reason") == "best"]
    saves = [i for i, e in enumerate(ev) if e["kind"] == "checkpoint" and i not in best[:-1]]
    saves = saves[-MAX_CHECKPOINT_MARKERS:]   # of the "best" saves only the newest: the others are superseded
    others = [i for i, e in enumerate(ev) if e["kind"] != "checkpoint"][-MAX_CHANGE_MARKERS:]
    return [{"step": int(ev[i]["step"]), "x": float(ev[i]["step"]), "kind": ev[i]["kind"],
             "label": marker_label(ev[i]["kind"], ev[i]["data"], ev[i].get("source"))} for i in sorted(saves + others)]


def _worth_a_marker(e: Mapping[str, Any]) -> bool:
    """Pause and resume (a status event between paused and running after the start) and the step and stop
    commands mark the charts; the run's own start and end do not."""
    d = e.get("data") or {}
    if e["kind"] == "status":
        return d.get("status") in ("paused", "running") and int(e["step"]) > 0
    if e["kind"] == "command":
        return d.get("action") in ("step", "stop")
    return True


def layer_matrix(layers: pd.DataFrame, value: str = "grad_norm") -> tuple[np.ndarray, list[str], np.ndarray]:
    """(steps, layer names in model order, values[layer, step]) of a per-layer table, for a heatmap."""
    if layers.empty:
        return np.array([]), [], np.zeros((0, 0))
    li, names = pd.factorize(layers["layer"])      # codes in order of first appearance = model order
    steps, si = np.unique(layers["step"].to_numpy(), return_inverse=True)
    z = np.full((len(names), len(steps)), np.nan)
    z[li, si] = layers[value].to_numpy(dtype=float)
    return steps.astype(float), [str(n) for n in names], z


def marker_label(kind: str, data: Mapping[str, Any] | None, source: str | None = None) -> str:
    """A short text for a chart marker."""
    d = dict(data or {})
    if kind == "control":
        return f"{d.get('field')}: {_short(d.get('old'))} -> {_short(d.get('new'))}"
    if kind == "checkpoint":
        return f"saved ({d.get('reason', '')})"
    if kind == "status":
        what = "paused" if d.get("status") == "paused" else "resumed"
        return f"{what} ({source})" if source else what
    if kind == "command":
        return f"step {d.get('n')}" if d.get("action") == "step" else "stop requested"
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


def samples_per_s(tail: Mapping[str, np.ndarray], status: str) -> float | None:
    """Training throughput for a status line: the samples of the newest steps over their wall time (about
    RATE_WINDOW_S of it), from ``tail`` (the last step rows' RATE_COLUMNS); None unless the run is running.

    Each step row holds its own rate (its samples over the time since the previous step). The mean of such
    rates overstates throughput (a fast step counts as much as a slow one) and one step's rate swings with
    every eval and checkpoint, so the window's samples are summed and divided by the sum of its step times.
    A paused, stopped or finished run has no throughput: its last rate is not shown as if it still held.
    """
    if status != "running":
        return None
    b = np.asarray(tail.get("batch_size", ()), dtype=float)
    r = np.asarray(tail.get("samples_per_s", ()), dtype=float)
    ok = np.isfinite(b) & np.isfinite(r) & (r > 0) & (b > 0)
    b, r = b[ok], r[ok]
    if not len(b):
        return None
    dt = b / r                                  # each step's time (over its micro-batches; the ratio is the same)
    back = np.cumsum(dt[::-1])
    n = max(1, int(np.searchsorted(back, RATE_WINDOW_S, side="right")))
    return float(b[-n:].sum() / dt[-n:].sum())
