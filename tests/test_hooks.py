"""workbench.hooks: user callbacks on the trainer thread.

A hook runs at its event (step_end, eval_end, checkpoint, alert, status) on the trainer thread; one that
raises is disabled with a warning and an event, and the run and the other hooks go on; an unknown event
name is refused. From inside a hook the run can be steered (set, stop) like from anywhere else.
"""
from __future__ import annotations

import pytest

from workbench import Trainer


def test_failing_hook_is_disabled_not_fatal(runs_root):
    calls = []

    def bad(ctx):
        calls.append(ctx.step)
        raise KeyError("oops")
    tr = Trainer(dataset="wine", max_steps=20, max_epochs=None, seed=0, runs_root=str(runs_root),
                 eval_every=0, tensorboard=False)
    tr.on("step_end", bad)
    good = []
    handle = tr.on("step_end", lambda ctx: good.append(ctx.step))
    with pytest.warns(UserWarning, match="disabled"):
        tr.run()
    assert tr.status == "finished" and calls == [1]
    assert good == list(range(1, 21))
    assert (tr.events["kind"] == "hook_error").sum() == 1
    handle.remove()
    with pytest.raises(ValueError, match="step_end"):
        tr.on("step_ended", print)


def test_stop_and_set_from_inside_a_hook(runs_root):
    tr = Trainer(dataset="wine", max_steps=10_000, max_epochs=None, seed=0, runs_root=str(runs_root),
                 eval_every=0, tensorboard=False)

    def hook(ctx):
        if ctx.step == 5:
            tr.set(lr=0.002)
        if ctx.step == 9:
            tr.stop()
    tr.on("step_end", hook)
    tr.start()
    assert tr.join(20) == "stopped"
    assert tr.step_count == 9
    assert tr.history.set_index("step").loc[6, "lr"] == pytest.approx(0.002)
