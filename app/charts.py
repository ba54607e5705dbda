"""Charts that update in place: a Streamlit custom component (app/charts_frontend/index.html) that keeps one
plotly.js plot per chart across refreshes.

``st.plotly_chart`` derives its element's identity from the figure itself, so a figure with one new point is
a new element: the browser tears the plot down and builds it again at every refresh of a live view. That
costs the browser most of a core while a run trains beside it, blanks the charts, and loses the user's zoom
whatever the figure's ``uirevision`` says. Here the component's identity is its key; a refresh sends each
figure's JSON, the page redraws only the charts whose JSON changed (``Plotly.react`` on the existing plot),
and the figure's ``uirevision`` keeps zoom, pan and legend choices.

plotly.js is the copy the installed plotly package ships (``plotly/package_data/plotly.min.js``), served by
Streamlit as a second component's static file: nothing is downloaded, nothing is copied.
"""
from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any, Mapping

import plotly
import plotly.graph_objects as go
import streamlit.components.v1 as components

FRONTEND = Path(__file__).resolve().parent / "charts_frontend"
PLOTLY_JS = Path(plotly.__file__).resolve().parent / "package_data"
CONFIG = {"displaylogo": False}

_grid = components.declare_component("chart_grid", path=str(FRONTEND))
_plotly = components.declare_component("plotly_js", path=str(PLOTLY_JS))
_json: dict[int, tuple["weakref.ref[go.Figure]", str]] = {}   # id(figure) -> (the figure, its JSON)
_json_lock = threading.Lock()


def figure_json(fig: go.Figure) -> str:
    """A figure's JSON, made once per figure object (the live view reuses a figure while its data stands);
    entries go with their figures."""
    with _json_lock:
        hit = _json.get(id(fig))
        if hit is not None and hit[0]() is fig:
            return hit[1]
    text = fig.to_json(validate=False)
    with _json_lock:
        for k in [k for k, (ref, _) in _json.items() if ref() is None]:
            del _json[k]
        _json[id(fig)] = (weakref.ref(fig), text)
    return text


def chart_grid(figures: Mapping[str, go.Figure], key: str, columns: int = 2,
               config: Mapping[str, Any] | None = None) -> None:
    """Draw ``figures`` (name -> figure, in order) in a grid of ``columns``, updated in place under ``key``."""
    _grid(figures={n: figure_json(f) for n, f in figures.items()}, order=list(figures), columns=columns,
          config=dict(config or CONFIG), plotly_src=f"../{_plotly.name}/plotly.min.js", key=key, default=None)
