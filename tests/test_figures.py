"""workbench.figures: the plotly figures both views show, built from chart data.

A run gives six figures (loss, lr, grad norm, val acc, layer grad-norm heatmap, update ratio), each bounded
by the chart data's point budget, the loss on a log axis on request; a comparison draws one trace per run.
"""
from __future__ import annotations

from workbench import figures
from workbench.chartdata import chart_data
from workbench.runview import RunView


def test_a_run_gives_six_bounded_figures_and_a_comparison_one_trace_per_run(finished_run):
    a, b = chart_data(finished_run, n_out=100), chart_data(RunView(finished_run.run_dir), n_out=100)
    figs = figures.all_figures(a, log_y=True)
    assert set(figs) == {"loss", "lr", "grad_norm", "val_acc", "layer_grad_norm", "update_ratio"}
    assert all(figures.trace_points(f) <= 100 for f in figs.values())
    assert figs["loss"].layout.yaxis.type == "log"
    comp = figures.compare_figure({"a": a, "b": b})
    assert len(comp.data) == 2
