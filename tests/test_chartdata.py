"""workbench.chartdata: the chart data both views draw from.

``chart_data`` gives the same series from a Trainer and from a RunView of its directory, downsampled to at
most ``n_out`` points, with markers for live changes (labelled old -> new) and checkpoints;
``layer_matrix`` lays the per-layer rows out as a (layer x step) matrix.
"""
from __future__ import annotations

import numpy as np
import pytest

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


def test_samples_per_s_is_the_window_average_and_blank_unless_running():
    """Samples over the step time of the newest ~2 s: the mean of per-step rates overstates it (one eval-slowed
    step among fast ones), and a run that is not training has no throughput."""
    from workbench.chartdata import RATE_WINDOW_S, samples_per_s

    b = np.full(10, 64.0)
    dt = np.r_[np.full(9, 0.01), 0.1]
    tail = {"batch_size": b, "samples_per_s": b / dt}
    assert samples_per_s(tail, "running") == pytest.approx(640 / 0.19)
    assert np.mean(b / dt) > 1.5 * samples_per_s(tail, "running")
    for status in ("paused", "stopped", "finished", "failed", "idle"):
        assert samples_per_s(tail, status) is None
    assert samples_per_s({"batch_size": np.array([]), "samples_per_s": np.array([])}, "running") is None
    # only the newest steps count: 500 slow ones (1 s each) then 500 fast ones (0.01 s each)
    b = np.full(1000, 10.0)
    tail = {"batch_size": b, "samples_per_s": np.r_[np.full(500, 10.0), np.full(500, 1000.0)]}
    assert samples_per_s(tail, "running") == pytest.approx(1000.0)
    assert RATE_WINDOW_S < 500 * 0.01


def test_markers_show_pause_step_resume_and_only_the_newest_best_checkpoint():
    from workbench.chartdata import markers_of

    def e(step, kind, data, source="dashboard"):
        return {"step": step, "kind": kind, "data": data, "source": source}

    events = [e(0, "status", {"status": "running"}, "api"),
              *[e(s, "checkpoint", {"reason": "best"}, "trainer") for s in (50, 100, 150)],
              e(160, "status", {"status": "paused"}), e(160, "command", {"action": "step", "n": 3}),
              e(164, "status", {"status": "running"}), e(200, "checkpoint", {"reason": "periodic"}, "trainer"),
              e(230, "command", {"action": "stop"}), e(230, "status", {"status": "stopped"}, "trainer")]
    labels = [(m["step"], m["label"]) for m in markers_of(events)]
    assert labels == [(150, "saved (best)"), (160, "paused (dashboard)"), (160, "step 3"),
                      (164, "resumed (dashboard)"), (200, "saved (periodic)"), (230, "stop requested")]
