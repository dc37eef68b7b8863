#!/usr/bin/env bash
# Set up the environment (no ComfyUI needed) and run the main job: train TopK, BatchTopK
# and ITDA dictionaries on the built-in synthetic superposition benchmark and print their metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --no-comfyui
exec .venv/bin/python -m training synthetic "$@"
