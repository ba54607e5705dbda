"""Cost and time: the time left to a run's planned end, and the 6·N·D FLOPs of a Transformer-like model."""
from __future__ import annotations

import pytest

from own_cases import trainer
from workbench import cost


def test_projection_is_the_samples_left_over_the_rate_and_flops_follow_the_rate():
    p = cost.projection(200.0, step=40, total_steps=100, samples_per_step=32, flops=1e6)
    assert p == {"eta_s": pytest.approx(60 * 32 / 200), "flops_per_sample": 1e6, "flop_s": pytest.approx(2e8)}
    assert cost.projection(None, 40, 100, 32, 1e6) == {"eta_s": None, "flops_per_sample": 1e6, "flop_s": None}
    assert cost.projection(200.0, 40, None, 32, None)["eta_s"] is None  # no end set: no projection


def test_a_transformer_lm_gets_6nd_flops_per_sample_and_an_mlp_none(tmp_path):
    lm = trainer("lm", tmp_path / "lm")
    n = sum(p.numel() for p in lm.model.parameters() if p.requires_grad)
    seen = []
    lm.on("step_end", lambda ctx: seen.append(lm.snapshot()) if ctx.step == 30 else None)
    lm.run()
    assert lm.snapshot()["flops_per_sample"] == 6 * n * 32  # 32 tokens a window
    running = seen[0]
    assert running["samples_per_s"] > 0  # the rate of a window of steps (chartdata)
    assert running["flop_s"] == pytest.approx(running["samples_per_s"] * 6 * n * 32)
    assert running["eta_s"] == pytest.approx((60 - 30) * 16 / running["samples_per_s"])
    mlp = trainer("dict", tmp_path / "dict")
    assert mlp.snapshot()["flops_per_sample"] is None and mlp.snapshot()["world_size"] == 1
