"""workbench.pacing: the Pacer that spreads a background thread's work over time.

How it paces a checkpoint write (pauses between pieces, none while someone waits or a newer save is queued)
is specified with the writers in test_checkpoint.py, and a recorder flush in test_recorder.py; here, what a
Pacer accepts.
"""
from __future__ import annotations

import pytest

from workbench.pacing import Pacer


def test_duty_must_be_a_fraction_above_zero():
    with pytest.raises(ValueError, match=r"duty: got 0; allowed"):
        Pacer(duty=0)
