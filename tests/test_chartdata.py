"""workbench.chartdata: the chart data both views draw from.

``chart_data`` gives the same series from a Trainer and from a RunView of its directory, downsampled to at
most ``n_out`` points, with markers for live changes (labelled old -> new) and checkpoints;
``layer_matrix`` lays the per-layer rows out as a (layer x step) matrix.
"""
from __future__ import annotations

import numpy as np

from workbench.chartdata import chart_data, layer_matrix
from workbench.runview import RunView


def test_chart_data_is_the_same_for_a_trainer_and_a_view_of_its_directory(finished_run):
    a, b = chart_data(finished_run, n_out=100), chart_data(RunView(finished_run.run_dir), n_out=100)
    for name in ("train_loss", "lr", "grad_norm", "val_loss", "val_acc"):
        np.testing.assert_array_equal(a.series[name][1], b.series[name][1])
    assert a.points <= 100
    kinds = {m["kind"] for m in a.markers}
    assert {"control", "checkpoint"} <= kinds
    assert any(m["label"] == "lr: 0.001 -> 0.002" for m in a.markers)
    steps, layers, z = layer_matrix(a.layers)
    assert layers[0].endswith("weight") and z.shape == (len(layers), len(steps))
