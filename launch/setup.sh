#!/usr/bin/env bash
# Create (or update) .venv with pinned torch and coap_dist plus the extras its tests use.
#
#   bash launch/setup.sh                 # CPU/CUDA torch as pinned in .ci/constraints.txt
#   EXTRAS=hydra,wandb bash launch/setup.sh
#
# Every pip call goes through .ci/constraints.txt so that no dependency can swap torch.
# Environment overrides: PYTHON (default python3), VENV (default .venv), EXTRAS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-dev,hydra,wandb,deepspeed,fairscale,bench,hf}"
CONSTRAINTS=".ci/constraints.txt"
TORCH_PIN="$(grep -E '^torch==' "$CONSTRAINTS")"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
pip_install() {
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS" "$@"
}
pip_install --upgrade pip
pip_install "$TORCH_PIN"
pip_install -e ".[${EXTRAS}]"
echo "coap_dist is installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
