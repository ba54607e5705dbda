"""workbench.rollback: going back to a good state after a divergence.

With ``on_divergence="rollback"``, a run pushed into divergence (lr x100) rewinds to the newest good state
from before the detection window, lowers the lr (never above the good state's), carries on and ends
finite, near where it was before the push; the rollback and the lr change are logged (source policy), and a
non-finite state never becomes a checkpoint.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workbench import Trainer
from workbench.checkpoint import load_checkpoint


def test_rollback_recovers_from_a_pushed_divergence(runs_root):
    """lr x100 via set(): the run rewinds to the last good state, lowers the lr, carries on, ends finite."""
    tr = Trainer(dataset="digits", model="mlp", optimizer="sgd", lr=0.05, momentum=0.9, max_steps=500,
                 max_epochs=None, on_divergence="rollback", good_state_every=25, checkpoint_every=50,
                 keep_checkpoints=20, eval_every=50, seed=0, runs_root=str(runs_root), tensorboard=False)

    def hook(ctx):
        if ctx.step == 150:
            tr.set(lr=5.0, source="notebook")
    tr.on("step_end", hook)
    tr.run()
    assert tr.status == "finished"
    h = tr.history.set_index("step")
    before = float(h.loc[130:150, "train_loss"].median())
    div = [a for a in tr.alerts if a.kind == "divergence"]
    assert div and div[0].step > 150
    ev = tr.events
    rb = ev[ev["kind"] == "rollback"]
    assert len(rb) >= 1
    first = rb.iloc[0]["data"]
    assert first["to_state_of_step"] <= 150
    assert first["lr_new"] == pytest.approx(min(first["lr_old"] * 0.1, 0.05))  # never above the good state's lr
    episode = h.loc[151:div[-1].step, "train_loss"]
    worst = episode[np.isfinite(episode)].max() if np.isfinite(episode).any() else math.inf
    final = float(h["train_loss"].iloc[-20:].median())
    assert math.isfinite(final) and final < worst and final < before * 1.5
    assert tr.controls.lr < 5.0
    assert ((ev["kind"] == "control") & (ev["source"] == "policy")).any()
    # a non-finite state never became a checkpoint
    for path in tr.checkpoints["path"]:
        state = load_checkpoint(path)["state"]["model"]
        assert all(torch.isfinite(t).all() for t in state.values())
