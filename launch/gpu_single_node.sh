#!/usr/bin/env bash
# Single-node GPU run: one process drives every local GPU (the mesh's data axis spans them).
#
#   launch/gpu_single_node.sh --gin_file=configs/experiments/t0_mhr.gin --gin.MODEL_DIR="'/ckpt/t0_mhr'"
#
# Arguments go to `python -m mhr_jax.train` unchanged; --dry-run prints the command instead of running it.
# Re-running the same command resumes from the latest checkpoint in MODEL_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
args=()
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then dry_run=1; else args+=("$arg"); fi
done

# Leave headroom for NCCL and cuDNN workspaces; overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

cmd=("${PYTHON:-python3}" -m mhr_jax.train "${args[@]}")
if (( dry_run )); then
  printf 'XLA_FLAGS=%q XLA_PYTHON_CLIENT_MEM_FRACTION=%q ' "$XLA_FLAGS" "$XLA_PYTHON_CLIENT_MEM_FRACTION"
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
