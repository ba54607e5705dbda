#!/usr/bin/env bash
# Install what is missing, then start the main job: the dashboard, with the built-in demo run training in it.
# Extra arguments go to `workbench dashboard` (e.g. --port 8600, --runs DIR).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/workbench" dashboard --demo "$@"
