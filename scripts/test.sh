#!/usr/bin/env bash
# Run the test suite in the project venv: bash scripts/test.sh [pytest args...]
# Installs or updates .venv first (scripts/setup_env.sh; a no-op when nothing changed).
# pytest's exit code is the script's exit code (5, "no tests collected", included).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
bash "$repo/scripts/setup_browser.sh"
cd "$repo"
exec "$repo/.venv/bin/python" -m pytest -q "$@"
