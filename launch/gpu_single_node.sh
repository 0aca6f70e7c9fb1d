#!/usr/bin/env bash
# Single-node GPU run: one process drives every local GPU (the mesh's data axis spans them).
#
#   launch/gpu_single_node.sh --gin_file=configs/experiments/t0_mhr.gin --gin.MODEL_DIR="'/ckpt/t0_mhr'"
#
# Re-running the same command resumes from the latest checkpoint in MODEL_DIR. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/gpu_single_node.sh [flags] [-- MODULE_ARGS...]

flags:
  --module=MODULE       python module to run (default mhr_jax.train; mhr_jax.experiment runs the
                        whole experiment)
  --python=PYTHON       interpreter (default $PYTHON, else python3)
  --dry-run             print the command instead of running it
  MODULE_ARGS           --gin_file=..., --gin.KEY=VALUE, --gin_bindings=..., --gin_search_paths=...,
                        or anything after `--`; passed to `python -m MODULE` unchanged
USAGE
}

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

module="mhr_jax.train" python="${PYTHON:-python3}" dry_run=0
module_args=()
while (( $# )); do
  case "$1" in
    --module=*) module=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; module_args+=("$@"); break ;;
    --gin_file=* | --gin_search_paths=* | --gin_bindings=* | --gin.*=*) module_args+=("$1") ;;
    --*) die "unknown flag ${1%%=*} (see --help; other arguments for python -m MODULE go after --)" ;;
    *) die "unexpected argument '$1' (flags take --flag=value; arguments for python -m MODULE go after --)" ;;
  esac
  shift
done
[[ "$module" =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]] || die "--module='$module': expected a python module name such as mhr_jax.experiment"

# Leave headroom for NCCL and cuDNN workspaces; overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

cmd=("$python" -m "$module" "${module_args[@]}")
if (( dry_run )); then
  printf 'XLA_FLAGS=%q XLA_PYTHON_CLIENT_MEM_FRACTION=%q ' "$XLA_FLAGS" "$XLA_PYTHON_CLIENT_MEM_FRACTION"
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
