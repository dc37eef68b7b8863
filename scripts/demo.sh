#!/usr/bin/env bash
# Set up the environment (no ComfyUI needed) and run the main job offline: the whole loop on the
# committed model organism (capture -> TopK + ITDA -> eval -> atlas -> steering flip rates).
# Options pass through: bash scripts/demo.sh --quick, --model organism-unet, --out DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --no-comfyui
exec .venv/bin/python -m training demo "$@"
