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


def test_figures_read_well_and_export_as_strict_json(finished_run):
    """Log axes write their ticks out (no bare "2" and "5", no SI prefixes on the lr), the title sits above
    the legend, zoom and legend state survive an update (uirevision), accuracy has a 0-1 axis and a note
    until the first evaluation, and a series holding NaN exports as JSON a browser accepts (null, not NaN)."""
    import json

    import numpy as np

    from workbench.chartdata import ChartData

    figs = figures.all_figures(chart_data(finished_run), log_y=True)
    assert figs["loss"].layout.yaxis.tickformat == "~g" and figs["grad_norm"].layout.yaxis.tickformat == "~g"
    assert figs["lr"].layout.yaxis.tickformat == ".0e" and figs["update_ratio"].layout.yaxis.tickformat == ".0e"
    for fig in figs.values():
        assert fig.layout.uirevision == "run" and fig.layout.legend.yanchor == "bottom"
        assert fig.layout.title.yanchor == "top" and fig.layout.modebar.orientation == "v"
    assert not figs["val_acc"].layout.annotations and list(figs["val_acc"].layout.yaxis.range) == [0, 1.02]
    empty = ChartData(series={"train_loss": (np.arange(3.0), np.array([1.0, np.nan, np.inf]))},
                      layers=chart_data(finished_run).layers.iloc[0:0], markers=[])
    acc = figures.accuracy_figure(empty)
    assert "first evaluation" in acc.layout.annotations[0].text
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    for fig in (figures.loss_figure(empty), acc, *figs.values()):
        json.loads(fig.to_json(), parse_constant=refuse)      # a browser's JSON.parse accepts it
