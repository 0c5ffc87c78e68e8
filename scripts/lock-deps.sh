#!/usr/bin/env bash
# Refreshes constraints.txt on purpose: installs the newest versions pyproject.toml allows into a fresh
# environment, runs the whole test suite there, and only if it passes writes that environment's versions.
# Usage: scripts/lock-deps.sh [pytest args]    (takes as long as the suite: ~15-20 minutes)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
KESTREL_VENV="$venv" KESTREL_CONSTRAINTS="" "$root/scripts/setup-env.sh"
(cd "$root" && HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$venv/bin/python" -m pytest -q "$@")
{
  echo "# Versions the test suite passed with on $(date -u +%Y-%m-%d) (scripts/lock-deps.sh); setup-env.sh installs these."
  "$venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | sed 's/^torch==\(.*\)+cpu$/torch==\1/'
} > "$root/constraints.txt"
echo "wrote $root/constraints.txt"
