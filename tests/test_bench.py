"""Every benchmark script runs in --quick mode, exits 0 and ends with its ratio line (no timing assertions)."""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import PYTHON, ROOT

SCRIPTS = ["overhead.py", "instrumentation.py", "precision.py", "checkpoint_stall.py",
           "checkpoint_stall.py --breakdown", "refresh.py", "control_latency.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_runs_quick(script, tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the benches' run directories go under tmp_path
    name, *args = script.split()
    proc = subprocess.run([PYTHON, str(ROOT / "bench" / name), "--quick", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("ratio"), f"{script}: no final ratio line\n{proc.stdout[-3000:]}"
