#!/usr/bin/env bash
# Train with the DeepSpeed launcher: this machine, or several listed in a hostfile (reached
# with passwordless ssh/pdsh; see launch/hostfile.example).
#
#   launch/deepspeed_local.sh                                   # all GPUs here, ZeRO-2
#   NPROC=2 launch/deepspeed_local.sh model=60m                 # 2 processes (CPU: gloo)
#   HOSTFILE=launch/hostfile.example launch/deepspeed_local.sh strategy=deepspeed_zero3 model=1b
#   DRY_RUN=1 NPROC=8 launch/deepspeed_local.sh                 # print the command only
#
# Environment overrides:
#   NPROC        processes per node (default: all GPUs of each node; without GPUs, 1)
#   HOSTFILE     DeepSpeed hostfile for several nodes (default: this machine only)
#   PYTHON       interpreter with coap_dist and deepspeed (default: python3)
#   DEEPSPEED    DeepSpeed launcher command (default: deepspeed on PATH, else
#                "$PYTHON -m deepspeed.launcher.runner")
#   STRATEGY     strategy used unless an argument sets strategy=... (default: deepspeed_zero2)
#   MASTER_PORT  rendezvous port (default: a free port of this machine)
#   CONFIG, CONFIG_DIR, RUN_DIR, DRY_RUN=1  as in launch/torchrun_local.sh
# Arguments are Hydra overrides.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
if [[ -n "${DEEPSPEED:-}" ]]; then
  read -r -a launcher <<<"$DEEPSPEED"
elif command -v deepspeed >/dev/null 2>&1; then
  launcher=(deepspeed)
else
  launcher=("$PYTHON" -m deepspeed.launcher.runner)
fi
CONFIG="${CONFIG:-train}"
RUN_DIR="${RUN_DIR:-outputs/$(date +%Y-%m-%d/%H-%M-%S)}"
if [[ -z "${MASTER_PORT:-}" ]]; then
  MASTER_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
fi

overrides=("hydra.run.dir=${RUN_DIR}")
if [[ " $* " != *" strategy="* ]]; then
  overrides+=("strategy=${STRATEGY:-deepspeed_zero2}")
fi

cmd=("${launcher[@]}" --master_port "$MASTER_PORT")
if [[ -n "${HOSTFILE:-}" ]]; then
  cmd+=(--hostfile "$HOSTFILE")
fi
if [[ -n "${NPROC:-}" ]]; then
  cmd+=(--num_gpus "$NPROC")
fi
# --no_local_rank: ranks read LOCAL_RANK from the environment; Hydra takes no --local_rank.
cmd+=(--no_local_rank --module coap_dist.train "--config-name=${CONFIG}")
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
