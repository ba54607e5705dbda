#!/usr/bin/env bash
# Install what is missing, then start the main job: the built-in demo run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/workbench" train --config "$root/configs/demo.yaml" "$@"
