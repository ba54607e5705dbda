"""workbench.cputhreads: how many intra-op threads a CPU run's trainer thread uses.

One thread for a step under SMALL_STEP_WORK multiply-adds, else the caller's count; ``cpu_threads``
overrides; the choice is deterministic (it depends on sizes only) and says why. How the trainer thread
applies it is specified in test_loop.py.
"""
from __future__ import annotations

from workbench.cputhreads import SMALL_STEP_WORK, choose_threads


def test_a_small_step_gets_one_thread_a_large_one_the_callers_count_and_cpu_threads_overrides():
    assert choose_threads(None, 10_000, 64, 8)[0] == 1
    assert choose_threads(None, SMALL_STEP_WORK, 1, 8, cpus=16)[0] == 8
    n, why = choose_threads(3, 10, 1, 8)
    assert n == 3 and "cpu_threads=3" in why


def test_a_large_step_leaves_one_cpu_to_the_views_watching_it():
    """A team on every core stalls whenever a browser or a notebook kernel runs: one core stays free."""
    n, why = choose_threads(None, SMALL_STEP_WORK, 1, 2, cpus=2)
    assert n == 1 and "less one of the 2 CPUs" in why
    assert choose_threads(None, SMALL_STEP_WORK, 1, 8, cpus=8)[0] == 7
    assert choose_threads(None, SMALL_STEP_WORK, 1, 1, cpus=1)[0] == 1
    assert choose_threads(2, SMALL_STEP_WORK, 1, 2, cpus=2)[0] == 2  # cpu_threads is the user's word
