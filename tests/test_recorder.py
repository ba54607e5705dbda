"""workbench.recorder: the thread that carries a run's records to SQLite and TensorBoard.

What reaches TensorBoard is what the run recorded (train loss, lr, grad norm, val loss/acc, at the same
steps, the same float32 values); the recorder's own flushes are paced (a few rows at a time, pauses
between), a flush someone waits for is not, and both write the same rows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workbench import Trainer
from workbench.rundir import RunDB, TBWriter


def test_tensorboard_reader_sees_the_same_train_loss(runs_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr = Trainer(dataset="moons", model="mlp", max_steps=80, max_epochs=None, seed=0, eval_every=20,
                 runs_root=str(runs_root))
    tr.run()
    acc = EventAccumulator(str(tr.run_dir / "tb"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "val/loss", "val/acc"} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("train/loss")
    h = tr.history
    assert [e.step for e in events] == h["step"].tolist()
    np.testing.assert_array_equal(np.array([e.value for e in events], dtype=np.float32),
                                  h["train_loss"].to_numpy(dtype=np.float32))
    assert [e.step for e in acc.Scalars("val/loss")] == tr.evals["step"].tolist()


def test_recorder_paces_its_own_flush_and_not_a_waited_one(tmp_path: Path) -> None:
    """The recorder thread's flush converts and encodes rows a few at a time with pauses between them;
    what reaches SQLite and TensorBoard is the same as an unpaced flush writes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from workbench.pacing import Pacer
    from workbench.recorder import Recorder

    def rows(lo: int, hi: int) -> list[dict]:
        return [{"step": s, "epoch": 0, "train_loss": 1.0 / s, "lr": 0.1, "batch_size": 32, "precision": "fp32",
                 "grad_norm": 2.0, "samples_per_s": 100.0, "time": 1.8e9 + s} for s in range(lo, hi)]

    pacer = Pacer(duty=0.5)
    paced = Recorder(RunDB(tmp_path / "a.db"), TBWriter(tmp_path / "tb"), pacer=pacer)
    plain = Recorder(RunDB(tmp_path / "b.db"), None)
    for rec in (paced, plain):
        rec.steps.extend(rows(1, 2001))
    paced.flush(paced=True)
    plain.flush()
    assert pacer.pauses > 0  # 2,000 rows: the recorder stopped between pieces
    a, b = paced.db.read_steps(), plain.db.read_steps()
    pd.testing.assert_frame_equal(a, b)
    assert a["step"].tolist() == list(range(1, 2001))
    before = pacer.pauses
    paced.steps.extend(rows(2001, 3001))
    paced.flush()  # someone waits (end of run, checkpoint): no pauses
    assert pacer.pauses == before and len(paced.db.read_steps()) == 3000
    paced.close()
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 3001)) and loss[9].value == pytest.approx(0.1)
