"""Compare runs: a table of final/best metrics and a field-by-field diff of their configs."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

IGNORED_PREFIXES = ("resolved.versions", "run_dir")   # always differ, or say nothing about the run


def metrics_row(name: str, source: Any) -> dict[str, Any]:
    """Final and best numbers of one run (a run handle: workbench.handle)."""
    snap = source.snapshot()
    ev = source.evals
    row: dict[str, Any] = {"run": name, "status": snap.get("status"), "steps": snap.get("step"),
                           "final train loss": _num(snap.get("train_loss")),
                           "best val loss": math.nan, "at step": None, "best val acc": math.nan,
                           "final val loss": math.nan}
    if len(ev):
        vl = ev.dropna(subset=["val_loss"])
        if len(vl):
            best = vl.loc[vl["val_loss"].idxmin()]
            row.update({"best val loss": float(best["val_loss"]), "at step": int(best["step"]),
                        "final val loss": float(vl["val_loss"].iloc[-1])})
        va = ev["val_acc"].dropna()
        if len(va):
            row["best val acc"] = float(va.max())
    return row


def metrics_table(sources: Mapping[str, Any]) -> pd.DataFrame:
    """One row per run: status, steps, final train loss, best/final val loss (and its step), best val acc."""
    return pd.DataFrame([metrics_row(n, s) for n, s in sources.items()])


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"model_options": {"depth": 2}} -> {"model_options.depth": 2}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(configs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Fields as rows, runs as columns, plus a ``differs`` column; differing fields first."""
    flat = {name: flatten(cfg) for name, cfg in configs.items()}
    keys = sorted({k for f in flat.values() for k in f if not k.startswith(IGNORED_PREFIXES)})
    rows = []
    for k in keys:
        vals = [flat[n].get(k, "—") for n in flat]
        texts = [_text(v) for v in vals]
        rows.append({"field": k, **dict(zip(flat, texts)), "differs": len(set(texts)) > 1})
    df = pd.DataFrame(rows, columns=["field", *flat, "differs"])
    return df.sort_values(["differs", "field"], ascending=[False, True], kind="stable").reset_index(drop=True)


def highlight_differences(df: pd.DataFrame) -> Any:
    """A pandas Styler that shades the rows whose values differ between runs."""
    def shade(row: pd.Series) -> list[str]:
        color = "background-color: #fff3cd; font-weight: 600" if row["differs"] else ""
        return [color] * len(row)

    return df.style.apply(shade, axis=1)


def _text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if np.isfinite(f) else math.nan
