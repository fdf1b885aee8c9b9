#!/usr/bin/env bash
# Create ./.venv (once) and install poa_hpc with its test extras into it.
# Usage: source scripts/setup_env.sh   (or run it; the demo/test scripts source it)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${POA_VENV:-$here/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.poa_installed"
if [ ! -f "$stamp" ] || [ "$here/setup.py" -nt "$stamp" ] || [ "$here/constraints.txt" -nt "$stamp" ]; then
  echo "[setup] installing poa_hpc and its dependencies (torch, torchvision, timm, ...)"
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -c "$here/constraints.txt" -e "$here[dev]"
  touch "$stamp"
fi
