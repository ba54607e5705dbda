"""workbench.figures: the plotly figures both views show, built from chart data.

A run gives seven figures (loss, lr, grad norm, val acc, layer grad-norm heatmap, update ratio, batch size and
precision), each bounded by the chart data's point budget, the loss on a log axis on request; a comparison
draws one trace per run. Every chart's x counts steps, seconds or samples, as the view asks.
"""
from __future__ import annotations

from workbench import figures
from workbench.chartdata import chart_data
from workbench.runview import RunView


def test_a_run_gives_seven_bounded_figures_and_a_comparison_one_trace_per_run(finished_run):
    a, b = chart_data(finished_run, n_out=100), chart_data(RunView(finished_run.run_dir), n_out=100)
    figs = figures.all_figures(a, log_y=True)
    assert set(figs) == {"loss", "lr", "grad_norm", "val_acc", "layer_grad_norm", "update_ratio", "batch_precision"}
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


def test_x_axis_counts_steps_seconds_or_samples_and_batch_precision_draws_the_changes(tmp_path):
    """A run whose batch size goes 64 -> 128 and precision fp32 -> bf16 at step 60: against samples, step 120
    sits at 60 x 64 + 60 x 128 samples; against time, the first step is at 0 s and the axis grows with the
    wall clock; the same from the run's directory; the batch/precision chart holds only the change points."""
    import numpy as np
    import pytest

    from workbench import Trainer
    from workbench.scenarios import scenario_config

    tr = Trainer(scenario_config("healthy", runs_root=str(tmp_path), tensorboard=False, max_steps=120, eval_every=40))
    tr.on("step_end", lambda ctx: tr.set(batch_size=128, precision="bf16") if ctx.step == 60 else None)
    tr.run()
    for run in (tr, RunView(tr.run_dir)):
        by_step, by_samples, by_time = (chart_data(run, x=x) for x in ("step", "samples", "time"))
        xs, bs = by_step.series["batch_size"]
        assert xs.tolist() == [1, 61, 120] and bs.tolist() == [64, 128, 128]
        assert by_step.series["precision"][1].tolist() == [0, 1, 1]
        assert by_samples.series["train_loss"][0][-1] == 60 * 64 + 60 * 128
        assert by_samples.series["val_loss"][0].tolist() == [40 * 64, 60 * 64 + 20 * 128, 60 * 64 + 60 * 128]
        t = by_time.series["train_loss"][0]
        assert t[0] == 0 and np.all(np.diff(t) >= 0) and t[-1] > 0
        assert by_time.x_title == "seconds since the first step" and by_samples.x_title == "samples trained on"
        m = next(m for m in by_samples.markers if m["kind"] == "control")
        assert m["step"] == 61 and m["x"] == pytest.approx(60 * 64 + 128)   # the first step at 128
        fig = figures.batch_precision_figure(by_samples)
        assert fig.layout.xaxis.title.text == "samples trained on"
        assert [t.customdata[-1] for t in fig.data if t.name == "precision"] == ["bf16"]
        last_layer_step = figures.layer_heatmap(by_step).data[0].x[-1]
        assert figures.layer_heatmap(by_time).data[0].x[-1] == pytest.approx(
            np.interp(last_layer_step, by_step.series["train_loss"][0], t))
    with pytest.raises(ValueError, match="x axis 'epochs': allowed: step, time, samples"):
        chart_data(tr, x="epochs")
