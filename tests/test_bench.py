"""Every benchmark script runs in --quick mode, exits 0 and ends with its ratio line (no timing assertions)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import PYTHON, ROOT

SCRIPTS = ["overhead.py", "instrumentation.py", "precision.py", "checkpoint_stall.py",
           "checkpoint_stall.py --breakdown", "refresh.py", "control_latency.py", "own_model.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_runs_quick(script, tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the benches' run directories go under tmp_path
    name, *args = script.split()
    proc = subprocess.run([PYTHON, str(ROOT / "bench" / name), "--quick", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("ratio"), f"{script}: no final ratio line\n{proc.stdout[-3000:]}"


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_section(tmp_path):
    """bench/gpu_check.sh --dry: the GPU tests collect (and skip without CUDA), every section of the GPU
    figures runs on the CPU with the view libraries blocked, and the files a GPU run brings back are written."""
    out = tmp_path / "out"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["dry"] and set(results["sections"]) == {"syncs", "overhead", "checkpoint", "batch_size",
                                                           "find_batch_size"}
    assert all(s["ok"] for s in results["sections"].values()), results
    assert results["sections"]["batch_size"]["value"]["every_sample_once"]
    assert "Dry run" in (out / "gpu_check.md").read_text()
    report = (out / "gpu_tests.txt").read_text()
    assert "skipped" in report and "failed" not in report and "error" not in report.lower()
