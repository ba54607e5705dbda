#!/usr/bin/env bash
# Make or refresh the project's virtual environment at .venv, installing only what is missing.
# torch comes first from an overridable spec: TORCH_SPEC (default torch==2.13.0, a CPU build here).
# A bare `torch` or a range would pull a CUDA build of several GB; users with a GPU set TORCH_SPEC.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
venv="$root/.venv"
pip="$venv/bin/python -m pip --disable-pip-version-check -q"

if [ ! -x "$venv/bin/python" ]; then
    echo "bootstrap: creating $venv with $($py --version 2>&1)"
    "$py" -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: installing $torch_spec"
    $pip install "$torch_spec"
fi
# Everything else is installed when pyproject.toml changed since the last successful install.
stamp="$venv/.workbench-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "bootstrap: installing the workbench and its dependencies"
    $pip install -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
    "$venv/bin/python" -c "import workbench, streamlit, ipywidgets, pytest" 
    "$venv/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
    echo "$want" >"$stamp"
fi
