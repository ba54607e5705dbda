#!/usr/bin/env bash
# Fill .whl with the cp312 manylinux wheels that the lent GPU machine lacks (it reaches no network): the
# engine's own compiled dependencies beyond what that machine's image holds. bench/gpu_check.sh installs
# them there before it runs. .whl is ignored by git and travels with the device tool's `carry`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$root/.venv/bin/python"
[ -x "$py" ] || py=python3
mkdir -p "$root/.whl"
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms="$platforms --platform $p"
done
# tsdownsample (series downsampling, workbench/metrics.py) and crc32c (TensorBoard checksums, workbench/tbevents.py)
for spec in "tsdownsample==$("$py" -c 'import importlib.metadata as m; print(m.version("tsdownsample"))')" \
            "crc32c==$("$py" -c 'import importlib.metadata as m; print(m.version("crc32c"))')"; do
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $platforms -d "$root/.whl" "$spec"
done
ls -l "$root/.whl"
