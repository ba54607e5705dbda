"""The tests whose verdict follows a float trajectory, again under other CPU kernel families.

torch picks its vectorised ATen kernels (``ATEN_CPU_CAPABILITY``), MKL its GEMM code path
(``MKL_ENABLE_INSTRUCTIONS``) and oneDNN its ISA (``ONEDNN_MAX_CPU_ISA``) from the CPU it runs on. Each
family rounds differently, so over a thousand Adam steps two machines part ways: a detector verdict that
holds on one CPU can fail on another. The rest of the suite runs on this machine's native kernels; these
tests rerun the trajectory-dependent ones in a subprocess pinned to older families, so a verdict that
holds only on one CPU fails here.
"""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT

FAMILIES = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
ORDER = ["DEFAULT", "AVX2", "AVX512"]   # as torch.backends.cpu.get_cpu_capability() names them

# Tests whose pass/fail depends on where a float trajectory goes (an alert's kind or step, a final loss or
# accuracy, a finder's suggestion, what the divergence policy and a rollback do). The oldest family, the one
# furthest from a modern CPU's, reruns them all; AVX2 reruns the teaching scenarios, the longest
# trajectories, and the diagnosis's verdicts on runs it was not tuned on (a lr that kills the ReLUs, a memorised
# training set, a blow-up in the first steps, a token-id model, a cosine schedule run to its end). Of the
# notebooks, those whose asserts read a detector's verdict: the lr finder and divergence (02), overfitting and its
# fixes (03), vanishing gradients (04). Notebook 08's asserts (a user's Transformer and classifier learn) follow
# test_own_training's Transformer test, which reruns here, and a whole notebook costs half a minute of CI.
NOTEBOOKS = [f"tests/test_notebooks.py::test_notebook_runs_top_to_bottom[{n}]"
             for n in ("02_learning_rate", "03_overfitting", "04_vanishing_gradients")]
TRAJECTORY_TESTS = {
    "default": ["tests/scenarios", "tests/test_diagnosis.py", "tests/test_watch.py", "tests/test_rollback.py",
                "tests/test_requests.py::test_apply_action_with_controls_and_advice", "tests/test_finders.py",
                "tests/test_cli.py::test_scenario_runs_from_the_cli_and_reports_its_alert",
                "tests/test_own_training.py::test_user_metrics_f1_auc_and_early_stopping_on_one",
                "tests/test_own_training.py::test_transformer_lm_live_lr_bf16_token_accuracy_and_perplexity",
                "tests/test_sweep.py::test_a_tpe_sweep_prunes_diverging_trials_and_finds_what_a_grid_search_finds",
                *NOTEBOOKS],
    "avx2": ["tests/scenarios", *[f"tests/test_diagnosis.py::{t}" for t in (
        "test_a_too_high_sgd_lr_that_kills_the_relus_is_lr_too_high",
        "test_memorising_a_tiny_training_set_is_overfitting_by_the_gap", "test_a_blow_up_within_3_steps_is_divergence",
        "test_a_healthy_token_id_model_raises_no_data_check_or_gradient_flow_alert",
        "test_a_cosine_schedule_run_to_its_end_raises_no_lr_too_low")]],
}


def _env(family: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FAMILIES["default"]}
    env.update(FAMILIES[family])
    return env


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_trajectory_dependent_tests_pass_on_another_kernel_family(family):
    native = torch.backends.cpu.get_cpu_capability()
    if native not in ORDER or ORDER.index(native) <= ORDER.index(family.upper()):
        pytest.skip(f"this CPU's native kernels are {native}: the main suite already ran them")
    probe = subprocess.run([PYTHON, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           env=_env(family), capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == family.upper(), probe.stderr
    done = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TRAJECTORY_TESTS[family]],
                          cwd=ROOT, env=_env(family), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"under {family} kernels:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
