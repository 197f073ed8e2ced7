#!/usr/bin/env bash
# Train with the DeepSpeed launcher: this machine, or several listed in a hostfile (reached
# with passwordless ssh/pdsh; see launch/hostfile.example).
#
#   launch/deepspeed_local.sh                                   # all GPUs here, ZeRO-2
#   HOSTFILE=launch/hostfile.example launch/deepspeed_local.sh strategy=deepspeed_zero3 model=1b
#   DRY_RUN=1 NPROC=8 launch/deepspeed_local.sh                 # print the command only
#
# Environment overrides:
#   NPROC        GPUs per node (default: all of each node)
#   HOSTFILE     DeepSpeed hostfile for several nodes (default: this machine only)
#   STRATEGY     strategy used unless an argument sets strategy=... (default: deepspeed_zero2)
#   MASTER_PORT  rendezvous port (default: 29500)
#   CONFIG, CONFIG_DIR, RUN_DIR, DRY_RUN=1  as in launch/torchrun_local.sh
# Arguments are Hydra overrides.
set -euo pipefail

CONFIG="${CONFIG:-train}"
RUN_DIR="${RUN_DIR:-outputs/$(date +%Y-%m-%d/%H-%M-%S)}"

overrides=("hydra.run.dir=${RUN_DIR}")
if [[ " $* " != *" strategy="* ]]; then
  overrides+=("strategy=${STRATEGY:-deepspeed_zero2}")
fi

cmd=(deepspeed --master_port "${MASTER_PORT:-29500}")
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
