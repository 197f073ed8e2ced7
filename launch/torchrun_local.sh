#!/usr/bin/env bash
# Train on this machine with torchrun (one process per GPU, or CPU processes with gloo).
#
#   launch/torchrun_local.sh                                  # NPROC processes, strategy=ddp
#   NPROC=4 launch/torchrun_local.sh strategy=fsdp2 model=60m compare=false
#   DRY_RUN=1 NPROC=8 launch/torchrun_local.sh strategy=hsdp  # print the command only
#
# Environment overrides:
#   NPROC       processes (default: the number of GPUs, or 2 without GPUs)
#   STRATEGY    strategy used unless an argument sets strategy=... (default: ddp)
#   CONFIG      Hydra config name (default: train); CONFIG_DIR adds a directory of your configs
#   RUN_DIR     Hydra run dir shared by all ranks (default: outputs/<date>/<time>)
#   PYTHON      Python interpreter (default: python3)
#   DRY_RUN=1   print the command instead of running it
# Arguments are Hydra overrides. torchrun --standalone picks a free rendezvous port.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
if [[ -z "${NPROC:-}" ]]; then
  NPROC=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC="$(nvidia-smi --list-gpus | wc -l)"
  fi
  if [[ "$NPROC" -eq 0 ]]; then
    NPROC=2
  fi
fi
CONFIG="${CONFIG:-train}"
RUN_DIR="${RUN_DIR:-outputs/$(date +%Y-%m-%d/%H-%M-%S)}"

overrides=("hydra.run.dir=${RUN_DIR}")
if [[ " $* " != *" strategy="* ]]; then
  overrides+=("strategy=${STRATEGY:-ddp}")
fi

cmd=("$PYTHON" -m torch.distributed.run --standalone --nnodes=1 "--nproc-per-node=${NPROC}"
  -m coap_dist.train "--config-name=${CONFIG}")
if [[ -n "${CONFIG_DIR:-}" ]]; then
  cmd+=("--config-dir=${CONFIG_DIR}")
fi
cmd+=("${overrides[@]}" "$@")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
