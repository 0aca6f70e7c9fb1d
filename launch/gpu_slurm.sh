#!/usr/bin/env bash
# Multi-node GPU runs under SLURM: writes a batch script and submits it with sbatch.
#
#   launch/gpu_slurm.sh --nodes=2 --gpus-per-node=8 --partition=gpu --time=24:00:00 \
#       --gin_file=configs/experiments/t0_mhr.gin --gin.MODEL_DIR="'/shared/runs/t0_mhr'" ...
#
# srun starts the processes; `python -m MODULE --multihost` calls jax.distributed.initialize(), which
# reads the coordinator (first node of SLURM_STEP_NODELIST), SLURM_NTASKS and SLURM_PROCID itself.
# --dry-run prints the batch script and the sbatch command instead. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu_slurm.sh [flags] [-- MODULE_ARGS...]

flags:
  --nodes=N             nodes (default 1)
  --gpus-per-node=G     GPUs per node (default 8)
  --per=gpu|node        one process per GPU (default; JAX gives process i of a node its GPU
                        SLURM_LOCALID) or one process per node driving all its GPUs
  --partition=NAME      SLURM partition (default: the cluster's)
  --time=TIME           time limit, e.g. 24:00:00 (default: the partition's)
  --job-name=NAME       job name (default mhr-jax)
  --output-dir=DIR      batch script, job log and per-process logs (default runs/slurm; on a
                        filesystem that every node sees)
  --cpus-per-task=N     CPUs per process, for sbatch and srun (default: the node's CPUs shared evenly
                        among its processes; the input pipeline uses them)
  --mem=SIZE            memory per node, e.g. 500G (default 0: all of the node's memory); left out
                        when --sbatch-arg gives --mem-per-cpu or --mem-per-gpu
  --sbatch-arg=ARG      extra #SBATCH line, e.g. --sbatch-arg=--account=proj (repeatable)
  --env=KEY=VALUE       environment variable for every process (repeatable)
  --module=MODULE       python module to run (default mhr_jax.train; mhr_jax.experiment runs the
                        whole experiment)
  --python=PYTHON       interpreter on the nodes (default $PYTHON, else python3)
  --signal-grace=S      SIGTERM every process S seconds before the time limit, so the run saves a
                        checkpoint and exits 143 (default 300; 0: no signal)
  --requeue             let SLURM requeue the job after a node failure or preemption (the requeued
                        job resumes from the latest checkpoint)
  --dry-run             print the batch script and the sbatch command instead of submitting
  MODULE_ARGS           --gin_file=..., --gin.KEY=VALUE, --gin_bindings=..., --gin_search_paths=...,
                        or anything after `--`; passed to `python -m MODULE` unchanged
EOF
}

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

# ---------------------------------------------------------------------------------------- flags

nodes=1 gpus=8 per=gpu partition="" time_limit="" job_name="mhr-jax" output_dir="runs/slurm"
cpus="" mem=0 module="mhr_jax.train" python="${PYTHON:-python3}" grace=300 requeue=0 dry_run=0
sbatch_args=() envs=() module_args=()
while (( $# )); do
  case "$1" in
    --nodes=*) nodes=${1#*=} ;;
    --gpus-per-node=*) gpus=${1#*=} ;;
    --per=*) per=${1#*=} ;;
    --partition=*) partition=${1#*=} ;;
    --time=*) time_limit=${1#*=} ;;
    --job-name=*) job_name=${1#*=} ;;
    --output-dir=*) output_dir=${1#*=} ;;
    --cpus-per-task=*) cpus=${1#*=} ;;
    --mem=*) mem=${1#*=} ;;
    --sbatch-arg=*) sbatch_args+=("${1#*=}") ;;
    --env=*) envs+=("${1#*=}") ;;
    --module=*) module=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --signal-grace=*) grace=${1#*=} ;;
    --requeue) requeue=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; module_args+=("$@"); break ;;
    --gin_file=* | --gin_search_paths=* | --gin_bindings=* | --gin.*=*) module_args+=("$1") ;;
    --*) die "unknown flag ${1%%=*} (see --help; other arguments for python -m MODULE go after --)" ;;
    *) die "unexpected argument '$1' (flags take --flag=value; arguments for python -m MODULE go after --)" ;;
  esac
  shift
done

[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes='$nodes': expected a positive number"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node='$gpus': expected a positive number"
[[ "$per" == gpu || "$per" == node ]] || die "--per='$per': expected gpu or node"
[[ -z "$cpus" || "$cpus" =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-task='$cpus': expected a positive number"
[[ "$mem" =~ ^[0-9]+[KMGT]?$ ]] || die "--mem='$mem': expected a size such as 500G, or 0 for all of a node's memory"
[[ "$grace" =~ ^[0-9]+$ ]] || die "--signal-grace='$grace': expected seconds"
[[ "$job_name" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job-name='$job_name': expected letters, digits, _ . -"
[[ "$module" =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]] || die "--module='$module': expected a python module name such as mhr_jax.experiment"
[[ -n "$output_dir" && "$output_dir" != *[[:space:]]* ]] || die "--output-dir='$output_dir': expected a path without spaces (SLURM's --output takes it unquoted)"
mem_line=1
for arg in "${sbatch_args[@]}"; do
  [[ "$arg" == --?* ]] || die "--sbatch-arg='$arg': expected an sbatch option such as --account=NAME"
  case "$arg" in
    --mem=*) die "--sbatch-arg='$arg': give the memory per node with --mem=SIZE" ;;
    # sbatch takes only one of --mem, --mem-per-cpu and --mem-per-gpu.
    --mem-per-cpu=* | --mem-per-gpu=*) mem_line=0 ;;
  esac
done
for env in "${envs[@]}"; do
  [[ "$env" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env='$env': expected KEY=VALUE"
done
[[ "$output_dir" == /* ]] || output_dir="$repo/$output_dir"

# ---------------------------------------------------------------------------------------- script

if [[ "$per" == gpu ]]; then
  tasks_per_node=$gpus
else
  tasks_per_node=1
fi
processes=$(( nodes * tasks_per_node ))

python_cmd=("$python" -m "$module")
# With one process there is no cluster to join; with more, JAX reads SLURM's environment.
(( processes > 1 )) && python_cmd+=(--multihost)
python_cmd+=("${module_args[@]}")

script_path="$output_dir/$job_name.sbatch"

batch_script() {
  echo "#!/usr/bin/env bash"
  echo "# Written by launch/gpu_slurm.sh: $nodes node(s) x $gpus GPU(s), one process per $per ($processes in all)."
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=$tasks_per_node"
  # All of a node's GPUs are visible to each of its processes; JAX picks each process's own
  # (per GPU) or uses them all (per node). Binding GPUs to tasks (--gpus-per-task, --gpu-bind)
  # would hide the device that SLURM_LOCALID names.
  echo "#SBATCH --gres=gpu:$gpus"
  echo "#SBATCH --exclusive"
  # An exclusive node still holds the job to the cluster's default memory limit unless --mem asks
  # for more; 8 processes that each load the float32 base (11.4 GB for T5-XL) need it.
  (( mem_line )) && echo "#SBATCH --mem=$mem"
  [[ -n "$cpus" ]] && echo "#SBATCH --cpus-per-task=$cpus"
  [[ -n "$partition" ]] && echo "#SBATCH --partition=$partition"
  [[ -n "$time_limit" ]] && echo "#SBATCH --time=$time_limit"
  echo "#SBATCH --output=$output_dir/%x-%j.out"
  # Without B:, SLURM signals the job steps (the training processes), not this batch shell.
  (( grace )) && echo "#SBATCH --signal=TERM@$grace"
  if (( requeue )); then
    echo "#SBATCH --requeue"
    echo "#SBATCH --open-mode=append"
  fi
  local arg env
  for arg in "${sbatch_args[@]}"; do echo "#SBATCH $arg"; done
  echo "set -euo pipefail"
  echo "cd $(quote_word "$repo")"
  # As launch/gpu_single_node.sh: headroom for NCCL and cuDNN workspaces; overlap collectives.
  echo "export XLA_PYTHON_CLIENT_MEM_FRACTION=\${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
  echo "export XLA_FLAGS=\"\${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true\""
  if [[ "$per" == node ]]; then
    # JAX's SLURM detection would give each process only GPU SLURM_LOCALID (= 0 here); name them all.
    echo "export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $(( gpus - 1 )))"
  fi
  for env in "${envs[@]}"; do echo "export ${env%%=*}=$(quote_word "${env#*=}")"; done
  # srun does not take --cpus-per-task from sbatch (Slurm 22.05 to 23.02) and otherwise gives each
  # process one CPU, which would leave the input pipeline one thread.
  if [[ -n "$cpus" ]]; then
    echo "cpus_per_task=$cpus"
  else
    echo "cpus_per_task=\$(( SLURM_CPUS_ON_NODE / $tasks_per_node > 0 ? SLURM_CPUS_ON_NODE / $tasks_per_node : 1 ))"
  fi
  # One log per process (%t: the task rank); a failing process ends the step instead of leaving
  # the others waiting in a collective.
  echo "srun --kill-on-bad-exit=1 --cpus-per-task=\$cpus_per_task --output=$output_dir/%x-%j-task%t.log $(join_args "${python_cmd[@]}")"
}

submit=(sbatch "$script_path")
if (( dry_run )); then
  echo "# $script_path"
  batch_script
  echo "# submit:"
  echo "mkdir -p $(quote_word "$output_dir")"
  join_args "${submit[@]}"
  echo
  exit 0
fi
mkdir -p "$output_dir"
batch_script > "$script_path"
echo "batch script: $script_path"
"${submit[@]}"
echo "logs: $output_dir/$job_name-<job id>.out and $output_dir/$job_name-<job id>-task<rank>.log;" \
  "per-task exit codes: sacct -j <job id> --format=JobID,NodeList,State,ExitCode"
echo "the same command again resumes from MODEL_DIR's latest checkpoint"
