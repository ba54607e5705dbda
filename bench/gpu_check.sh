#!/usr/bin/env bash
# The GPU check in one command: the CUDA tests (tests/test_gpu.py), then the GPU figures (bench/gpu_check.py).
#
#   bash bench/gpu_check.sh [--dry] [OUT_DIR]
#
# OUT_DIR defaults to $OUT (set by the device tool on a lent machine), else test-artifacts/gpu. It receives
# gpu_tests.txt (pytest's report: pass/fail of each CUDA test), gpu_check.json / gpu_check.md (the figures)
# and gpu_check.log. --dry runs every step that needs no CUDA (CI runs it, so the check cannot rot).
#
# On the lent machine: its own python3 (CUDA torch, pandas, pytest, ...) is used; the packages it lacks travel
# as wheels in .whl (bash bench/gpu_wheels.sh makes that folder here) and are installed to /tmp/site first.
# Here, the project's .venv is used.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dry=""
if [ "${1:-}" = "--dry" ]; then dry="--dry"; shift; fi
out="${1:-${OUT:-$root/test-artifacts/gpu}}"
mkdir -p "$out"
py="$root/.venv/bin/python"
if [ ! -x "$py" ]; then  # the lent machine: its own Python, plus the carried wheels
    py="${PYTHON:-python3}"
fi
if [ "$py" != "$root/.venv/bin/python" ] && compgen -G "$root/.whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$root"/.whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$out/gpu_check.log"
{
    echo "# $(date -u +%Y-%m-%dT%H:%MZ) $("$py" -c 'import torch; print("torch", torch.__version__,
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")')"
    # the CUDA tests: skipped, each with its reason, where CUDA is absent (the dry run checks they collect)
    timeout 300 "$py" -m pytest -q -rA -p no:cacheprovider -m gpu tests/test_gpu.py >"$out/gpu_tests.txt" 2>&1
    tests=$?
    tail -n 30 "$out/gpu_tests.txt"
    timeout 420 "$py" bench/gpu_check.py --out "$out" $dry
    figures=$?
    echo "tests rc $tests, figures rc $figures"
    [ $tests -eq 0 ] && [ $figures -eq 0 ]
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
