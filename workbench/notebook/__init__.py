"""Jupyter views of a run: ``panel(trainer)`` (or ``trainer.panel()``) shows one widget to watch and steer it;
``await watch(trainer)`` waits in a cell for the run without holding the kernel, so the panel keeps drawing.

This subpackage is the only place in ``workbench`` that imports ipywidgets. See :mod:`.widget` for what the
panel holds, :mod:`.charts` for the live FigureWidgets and :mod:`.poller` for how updates reach them.
"""
from __future__ import annotations

from .charts import LiveCharts, static_figures
from .sections import parse_changes
from .widget import Panel, StaticView, panel, static_html, status_text
from .poller import Poller, watch

__all__ = ["Panel", "StaticView", "LiveCharts", "Poller", "panel", "parse_changes", "static_figures",
           "static_html", "status_text", "watch"]
