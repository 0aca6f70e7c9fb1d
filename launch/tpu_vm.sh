#!/usr/bin/env bash
# Cloud TPU VM slices: create, set up, run, read logs, stop and delete, with `gcloud compute tpus`.
#
#   launch/tpu_vm.sh create --name=mhr-v4 --zone=us-central2-b --accelerator=v4-16 [--queued] [--spot]
#   launch/tpu_vm.sh setup  --name=mhr-v4 --zone=us-central2-b
#   launch/tpu_vm.sh run    --name=mhr-v4 --zone=us-central2-b --accelerator=v4-16 \
#       --gin_file=configs/experiments/t0_mhr.gin --gin.MODEL_DIR="'/mnt/gcs/t0_mhr'" ...
#   launch/tpu_vm.sh logs   --name=mhr-v4 --zone=us-central2-b [--worker=1|all] [--follow]
#   launch/tpu_vm.sh kill   --name=mhr-v4 --zone=us-central2-b
#   launch/tpu_vm.sh delete --name=mhr-v4 --zone=us-central2-b [--queued]
#   launch/tpu_vm.sh keep-running --name=mhr-v4 --zone=us-central2-b --accelerator=v4-16 --spot \
#       --gin_file=configs/experiments/t0_mhr.gin --gin.MODEL_DIR="'gs://BUCKET/runs/t0_mhr'" ...
#
# --dry-run prints every command (local and remote) instead of running it. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh COMMAND --name=TPU --zone=ZONE [flags] [-- MODULE_ARGS...]

commands:
  create   create the slice (--accelerator; --queued: through a queued resource of the same name)
  setup    copy this checkout to ~/REMOTE_DIR on every worker, install the pinned requirements plus
           jax[tpu] of the pinned jax version in REMOTE_DIR/.venv, print each worker's device counts
  run      stop stale runs (as `kill`), then start `python -m MODULE` on every worker; each worker's
           output goes to LOG_DIR/worker-N.log, its exit status to LOG_DIR/worker-N.exit, and the
           first worker to fail is reported. Safe to re-issue: the run resumes from MODEL_DIR's latest
           checkpoint. Ctrl-C detaches (the run goes on); `kill` stops it.
  logs     show a worker's log of the current run (tail on the worker)
  kill     SIGTERM the training processes on every worker (they save a checkpoint and exit), SIGKILL
           what is left after --grace seconds, remove /tmp/libtpu_lockfile
  delete   delete the slice (--queued: the queued resource and its slice)
  keep-running
           run through preemptions: create the slice when it is missing (when it is PREEMPTED,
           TERMINATED, SUSPENDED or FAILED: delete it first), set it up, run; after an exit status
           other than 0, 2 (bad config) or 3 (non-finite loss), look at the slice again and rerun
           the same command, which resumes from MODEL_DIR (e.g. gs://BUCKET/...); at most
           --max-restarts times

flags:
  --name=TPU            TPU VM (and queued resource) name              (required)
  --zone=ZONE           zone, e.g. us-central2-b                       (required)
  --project=PROJECT     Google Cloud project (default: gcloud's)
  --accelerator=TYPE    e.g. v4-16, v5litepod-64, v6e-16 (create; run derives the worker count from
                        v2/v3/v4/v5p types, which count 8 TensorCores per host)
  --version=RUNTIME     TPU runtime (create; default from the accelerator family)
  --queued              create/delete through `gcloud compute tpus queued-resources`
  --spot                spot capacity (create)
  --workers=N           hosts in the slice (run; default: from --accelerator, else asked of gcloud)
  --module=MODULE       python module to run (run; default mhr_jax.train; mhr_jax.experiment runs the
                        whole experiment)
  --env=KEY=VALUE       environment variable for the run on every worker (run; repeatable)
  --python=PYTHON       interpreter for the workers' virtualenv (setup; default python3.11)
  --setup-command=CMD   shell command that setup runs on every worker after the install, e.g. to
                        mount a bucket (setup; keep-running sets up every new slice)
  --remote-dir=DIR      checkout on the workers, relative to the home directory (default mhr-jax)
  --log-dir=DIR         local per-worker logs and exit statuses (run; default runs/tpu/TPU)
  --grace=SECONDS       time a stopped run gets to save its checkpoint (run, kill; default 300)
  --max-restarts=N      restarts keep-running may make: reruns of the command, failed creates,
                        deletes and state queries (default 20)
  --poll=SECONDS        how often keep-running asks gcloud for the slice's state while it changes,
                        and its pause after a failed run (default 60)
  --worker=N|all        which worker's log (logs; default 0)
  --lines=N             log lines to show (logs; default 100)
  --follow              keep following the log (logs)
  --dry-run             print the commands instead of running them
  MODULE_ARGS           --gin_file=..., --gin.KEY=VALUE, --gin_bindings=..., --gin_search_paths=...
                        (run, keep-running), or anything after `--`; passed to `python -m MODULE` unchanged
                        (plus --multihost on multi-host slices)
EOF
}

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"
repo=$(cd "$(dirname "$0")/.." && pwd)
self="$repo/launch/$(basename "$0")"
cd "$repo"

# Runs a command, or prints it under --dry-run.
run_or_print() {
  if (( dry_run )); then
    join_args "$@"
    echo
  else
    "$@"
  fi
}

# ---------------------------------------------------------------------------------------- flags

command=${1:-}
case "$command" in
  create | setup | run | logs | kill | delete | keep-running) shift ;;
  -h | --help | help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
  *) die "unknown command '$command' (expected create, setup, run, logs, kill, delete or keep-running; see --help)" ;;
esac

name="" zone="" project="" accelerator="" version="" queued=0 spot=0 workers="" module="mhr_jax.train"
python="python3.11" remote_dir="mhr-jax" log_dir="" grace=300 worker=0 lines=100 follow=0 dry_run=0
setup_command="" max_restarts=20 poll=60
# given: the flags as given, less keep-running's own, which it passes on to the commands it runs.
envs=() module_args=() given=()
while (( $# )); do
  case "$1" in
    --dry-run | --max-restarts=* | --poll=* | --gin* | --) ;;
    --*) given+=("$1") ;;
  esac
  case "$1" in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --workers=*) workers=${1#*=} ;;
    --module=*) module=${1#*=} ;;
    --env=*) envs+=("${1#*=}") ;;
    --python=*) python=${1#*=} ;;
    --setup-command=*) setup_command=${1#*=} ;;
    --max-restarts=*) max_restarts=${1#*=} ;;
    --poll=*) poll=${1#*=} ;;
    --remote-dir=*) remote_dir=${1#*=} ;;
    --log-dir=*) log_dir=${1#*=} ;;
    --grace=*) grace=${1#*=} ;;
    --worker=*) worker=${1#*=} ;;
    --lines=*) lines=${1#*=} ;;
    --follow) follow=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; module_args+=("$@"); break ;;
    --gin_file=* | --gin_search_paths=* | --gin_bindings=* | --gin.*=*) module_args+=("$1") ;;
    --*) die "unknown flag ${1%%=*} (see --help; other arguments for python -m MODULE go after --)" ;;
    *) die "unexpected argument '$1' (flags take --flag=value; arguments for python -m MODULE go after --)" ;;
  esac
  shift
done

# GCE resource names: lower case letters, digits and hyphens, starting with a letter.
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name='$name': expected a TPU name such as mhr-v4 (a-z, 0-9, -)"
[[ -n "$zone" ]] || die "--zone is required, e.g. --zone=us-central2-b"
[[ "$module" =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]] || die "--module='$module': expected a python module name such as mhr_jax.experiment"
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace='$grace': expected seconds"
[[ "$lines" =~ ^[0-9]+$ ]] || die "--lines='$lines': expected a number"
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts='$max_restarts': expected a number"
[[ "$poll" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--poll='$poll': expected seconds"
[[ "$worker" =~ ^([0-9]+|all)$ ]] || die "--worker='$worker': expected a worker index or all"
[[ -z "$workers" || "$workers" =~ ^[1-9][0-9]*$ ]] || die "--workers='$workers': expected a positive number"
[[ "$remote_dir" =~ ^[A-Za-z0-9_.-][A-Za-z0-9_./-]*$ ]] || die "--remote-dir='$remote_dir': expected a path relative to the home directory"
for env in "${envs[@]}"; do
  [[ "$env" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env='$env': expected KEY=VALUE"
done
if (( ${#module_args[@]} )) && [[ "$command" != run && "$command" != keep-running ]]; then
  die "${module_args[0]}: arguments for python -m MODULE only go with 'run' or 'keep-running'"
fi
log_dir=${log_dir:-runs/tpu/$name}

gcloud_tpus=(gcloud compute tpus)
location=("--zone=$zone")
[[ -n "$project" ]] && location+=("--project=$project")

# The training CLIs as they show in `ps`, e.g. `.venv/bin/python -m mhr_jax.train ...`. The brackets
# keep the pattern from matching the remote shell that runs pkill (its command line holds the
# pattern text, not "python -m mhr_jax."); it does match the shell that a previous `run` left
# waiting on its process, which is stale too.
stale_pattern='[p]ython[0-9.]* -m mhr_jax[.]'

# ---------------------------------------------------------------------------------------- commands

# ssh gives up on a worker that stops answering for 5 minutes (a host lost without closing its
# connections), so that `run` ends and keep-running can look at the slice; the run itself goes on
# where the worker still lives.
ssh_keepalive=(--ssh-flag=-oServerAliveInterval=60 --ssh-flag=-oServerAliveCountMax=5)

ssh_cmd() {  # ssh_cmd WORKER REMOTE_COMMAND
  printf '%s\0' "${gcloud_tpus[@]}" tpu-vm ssh "$name" "${location[@]}" "${ssh_keepalive[@]}" "--worker=$1" \
    "--command=$2"
}

# The remote command that stops stale runs: SIGTERM first, because the training CLI then saves a
# checkpoint at the next step (on every host at the same step, through JAX's preemption service);
# SIGKILL what is left after the grace period; then free the TPU: libtpu refuses to start while
# /tmp/libtpu_lockfile exists.
kill_remote() {
  printf '%s' "pkill -TERM -f \"$stale_pattern\"; for _ in \$(seq $grace); do pgrep -f \"$stale_pattern\" > /dev/null || break; sleep 1; done; pkill -KILL -f \"$stale_pattern\"; sudo rm -f /tmp/libtpu_lockfile"
}

run_ssh() {  # run_ssh WORKER REMOTE_COMMAND
  local words
  mapfile -d '' -t words < <(ssh_cmd "$1" "$2")
  run_or_print "${words[@]}"
}

default_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

# Hosts of a v2/v3/v4/v5p slice: the suffix counts TensorCores, 8 per host (4 chips of 2 cores).
# v5e/v6e hosts hold 4 or 8 chips depending on the slice, so those are asked of gcloud instead.
workers_of() {
  local cores
  [[ "$1" =~ ^v(2|3|4|5p)-([0-9]+)$ ]] || return 1
  cores=${BASH_REMATCH[2]}
  echo $(( cores < 8 ? 1 : cores / 8 ))
}

do_create() {
  [[ -n "$accelerator" ]] || die "--accelerator is required for create, e.g. --accelerator=v4-16"
  if [[ -z "$version" ]]; then
    version=$(default_version "$accelerator") || die "--version is required for --accelerator=$accelerator (a TPU runtime such as tpu-ubuntu2204-base)"
  fi
  local capacity=()
  (( spot )) && capacity=(--spot)
  if (( queued )); then
    # The queued resource and the node it brings up share the name, so every other command
    # addresses the node as usual.
    run_or_print "${gcloud_tpus[@]}" queued-resources create "$name" "${location[@]}" "--node-id=$name" \
      "--accelerator-type=$accelerator" "--runtime-version=$version" "${capacity[@]}"
    echo "# the slice exists once the queued resource is ACTIVE:" \
      "$(join_args "${gcloud_tpus[@]}" queued-resources describe "$name" "${location[@]}" "--format=value(state.state)")"
  else
    run_or_print "${gcloud_tpus[@]}" tpu-vm create "$name" "${location[@]}" \
      "--accelerator-type=$accelerator" "--version=$version" "${capacity[@]}"
  fi
}

do_setup() {
  local jax_version tarball remote
  # requirements.txt pins CPU jax and jaxlib; jax[tpu] at the same version adds libtpu (the TPU
  # runtime, pinned by that jax release), so the TPU build always matches the pinned jax.
  jax_version=$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' requirements.txt)
  [[ -n "$jax_version" ]] || die "requirements.txt: no jax==VERSION pin to match jax[tpu] to"
  tarball="${TMPDIR:-/tmp}/$name-checkout.tgz"
  # This checkout without what is built or generated locally (the virtualenv, runs, git history).
  run_or_print tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude='*.whl' .
  run_or_print "${gcloud_tpus[@]}" tpu-vm scp "$tarball" "$name:${tarball##*/}" "${location[@]}" --worker=all
  # python3.11 comes from the distribution when the runtime image lacks it (Ubuntu 22.04 images
  # ship 3.10; the pinned jax needs 3.11).
  remote="mkdir -p $remote_dir && tar -xzf ${tarball##*/} -C $remote_dir && rm ${tarball##*/} && cd $remote_dir"
  remote+=" && { command -v $python > /dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $python $python-venv; }; }"
  remote+=" && $python -m venv .venv && .venv/bin/pip install -q --upgrade pip"
  remote+=" && .venv/bin/pip install -q -r requirements.txt $(quote_word "jax[tpu]==$jax_version")"
  run_ssh all "$remote"
  # Anything else a new worker needs, e.g. a bucket mounted where the run reads its data.
  if [[ -n "$setup_command" ]]; then
    run_ssh all "$setup_command"
  fi
  # Every worker at once, as a run would: each prints its process index and device counts.
  run_ssh all "cd $remote_dir && .venv/bin/python -c \"import jax; print(\\\"process %d of %d: %d local devices, %d in the slice (%s)\\\" % (jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind))\""
  run_or_print rm -f "$tarball"
}

do_kill() {
  run_ssh all "$(kill_remote)"
}

do_logs() {
  local tail_flags="-n $lines"
  (( follow )) && tail_flags+=" -F"
  run_ssh "$worker" "tail $tail_flags $remote_dir/logs/worker-*.log"
}

do_delete() {
  if (( queued )); then
    # --force deletes the slice with the queued resource.
    run_or_print "${gcloud_tpus[@]}" queued-resources delete "$name" "${location[@]}" --force --quiet
  else
    run_or_print "${gcloud_tpus[@]}" tpu-vm delete "$name" "${location[@]}" --quiet
  fi
}

count_workers() {
  if [[ -n "$workers" ]]; then
    echo "$workers"
  elif [[ -n "$accelerator" ]] && workers_of "$accelerator"; then
    :
  elif (( dry_run )); then
    die "--dry-run needs --workers=N, or --accelerator=TYPE of a v2/v3/v4/v5p slice, to list the per-worker commands"
  else
    # One network endpoint per host.
    local endpoints
    endpoints=$("${gcloud_tpus[@]}" tpu-vm describe "$name" "${location[@]}" "--format=value(networkEndpoints[].ipAddress)")
    endpoints=${endpoints//;/ }
    read -r -a endpoints_array <<< "$endpoints"
    (( ${#endpoints_array[@]} )) || die "--name=$name: gcloud lists no workers for this TPU (give --workers=N)"
    echo "${#endpoints_array[@]}"
  fi
}

# The remote command of one worker. The run is detached from the ssh session (nohup, output to a file
# on the worker) so a dropped connection does not stop it; `tail --pid` streams the file back while
# the run lives and `wait` hands back its exit status.
run_remote() {  # run_remote WORKER N_WORKERS
  local log="logs/worker-$1.log" python_cmd=() env
  for env in "${envs[@]}"; do python_cmd+=("$env"); done
  (( ${#python_cmd[@]} )) && python_cmd=(env "${python_cmd[@]}")
  python_cmd+=(.venv/bin/python -m "$module")
  # jax.distributed.initialize() finds the other hosts of a slice by itself (TPU metadata).
  (( $2 > 1 )) && python_cmd+=(--multihost)
  python_cmd+=("${module_args[@]}")
  printf '%s' "cd $remote_dir && mkdir -p logs || exit 1; nohup $(join_args "${python_cmd[@]}") > $log 2>&1 < /dev/null & pid=\$!; tail -n +1 -F --pid=\$pid $log 2> /dev/null; wait \$pid"
}

do_run() {
  local n i first rc failed_worker
  n=$(count_workers)
  # Re-issuing `run` (after a preemption, or to restart) first stops what is left of the last run.
  do_kill
  run_or_print mkdir -p "$log_dir"
  if (( dry_run )); then
    for (( i = 0; i < n; i++ )); do
      mapfile -d '' -t words < <(ssh_cmd "$i" "$(run_remote "$i" "$n")")
      # Worker 0 (process 0, which logs the metrics) is also shown on the terminal.
      if (( i == 0 )); then
        echo "$(join_args "${words[@]}") 2>&1 | tee -a $(quote_word "$log_dir/worker-$i.log") &"
      else
        echo "$(join_args "${words[@]}") >> $(quote_word "$log_dir/worker-$i.log") 2>&1 &"
      fi
    done
    echo "wait"
    echo "# exit statuses: $log_dir/worker-N.exit; the first worker to fail is reported"
    return 0
  fi
  : > "$log_dir/finished"
  for (( i = 0; i < n; i++ )); do
    rm -f "$log_dir/worker-$i.exit"
    (
      mapfile -d '' -t words < <(ssh_cmd "$i" "$(run_remote "$i" "$n")")
      rc=0
      if (( i == 0 )); then
        "${words[@]}" 2>&1 | tee -a "$log_dir/worker-$i.log" || rc=$?
      else
        "${words[@]}" >> "$log_dir/worker-$i.log" 2>&1 || rc=$?
      fi
      echo "$rc" > "$log_dir/worker-$i.exit"
      # Appends of one short line land whole: this file lists the workers in the order they ended.
      echo "$i $rc" >> "$log_dir/finished"
    ) &
  done
  wait
  echo "run on $name ($n workers): logs in $log_dir/"
  for (( i = 0; i < n; i++ )); do
    echo "  worker $i: exit $(cat "$log_dir/worker-$i.exit" 2> /dev/null || echo '?'), $log_dir/worker-$i.log"
  done
  first=$(awk '$2 != 0 { print; exit }' "$log_dir/finished")
  if [[ -z "$first" ]]; then
    echo "all $n workers exited 0"
    return 0
  fi
  read -r failed_worker rc <<< "$first"
  echo "first failing worker: $failed_worker (exit $rc); the end of $log_dir/worker-$failed_worker.log:"
  tail -n 20 "$log_dir/worker-$failed_worker.log" | sed 's/^/  | /'
  case "$rc" in
    143) echo "exit 143: stopped by SIGTERM after saving a checkpoint (preemption or kill); re-issue the same run to resume" ;;
    255) echo "exit 255: the ssh connection failed or dropped; the run may still be going: launch/tpu_vm.sh logs --name=$name --zone=$zone --worker=$failed_worker" ;;
  esac
  return "$rc"
}

# ---------------------------------------------------------------------------------------- keep-running

# The slice's state, as gcloud describes it: READY, PREEMPTED, TERMINATED, ... for a TPU VM; ACTIVE,
# WAITING_FOR_RESOURCES, SUSPENDED, FAILED, ... for a queued resource.
if (( queued )); then
  state_query=("${gcloud_tpus[@]}" queued-resources describe "$name" "${location[@]}" "--format=value(state.state)")
else
  state_query=("${gcloud_tpus[@]}" tpu-vm describe "$name" "${location[@]}" "--format=value(state)")
fi
# States after which the slice never comes back: delete it and create it anew (a SUSPENDED queued
# resource is no longer eligible for allocation; UNKNOWN follows a failed repair).
lost_states=(PREEMPTED TERMINATED UNKNOWN SUSPENDED FAILED)

# The state, or MISSING when gcloud does not find the slice, or UNREADABLE when gcloud fails
# otherwise (its error stays in LOG_DIR/gcloud-describe.err).
slice_state() {
  local state errors="$log_dir/gcloud-describe.err"
  if state=$("${state_query[@]}" 2> "$errors"); then
    echo "${state:-UNREADABLE}"
  elif grep -q NOT_FOUND "$errors"; then
    echo MISSING
  else
    echo UNREADABLE
  fi
}

# This script's COMMAND with the flags that keep-running was given, as words in own_words.
own_command() {
  own_words=(launch/tpu_vm.sh "$1" "${given[@]}")
  if [[ "$1" == run ]]; then
    own_words+=(-- "${module_args[@]}")
  fi
}

# Runs this script's COMMAND in a process of its own, so that it stops at its own first error.
run_own() {
  own_command "$1"
  echo "keep-running: $(join_args "${own_words[@]}")"
  "$BASH" "$self" "${own_words[@]:1}"
}

# Counts a restart, or gives up with EXIT_STATUS when --max-restarts are spent.
count_restart() {  # count_restart REASON EXIT_STATUS
  if (( restarts >= max_restarts )); then
    echo "error: $1; giving up after $restarts restarts (--max-restarts=$max_restarts)" >&2
    exit "$2"
  fi
  restarts=$(( restarts + 1 ))
  echo "keep-running: $1; restart $restarts of $max_restarts"
}

# Returns once the slice is READY (a queued resource ACTIVE): creates it when it is missing, deletes
# it when it is lost, and waits while it changes state. Sets slice_created when it created one.
bring_up_slice() {
  local state shown=""
  slice_created=0
  while :; do
    state=$(slice_state)
    if [[ "$state" != "$shown" ]]; then
      echo "keep-running: $name is $state"
      shown=$state
    fi
    if [[ "$state" == READY || "$state" == ACTIVE ]]; then
      return 0
    elif [[ "$state" == MISSING ]]; then
      if run_own create; then
        slice_created=1
      else
        count_restart "create failed" 1
        sleep "$poll"
      fi
    elif [[ " ${lost_states[*]} " == *" $state "* ]]; then
      # A slice lost before it was ever ready (a queued request that FAILED) costs a restart, so that a
      # request that can never be met does not loop forever.
      if (( slice_created )); then
        count_restart "$name became $state before it was ready" 1
        sleep "$poll"
      fi
      # `delete` waits until the slice is gone; the next state shows whether it is.
      if ! run_own delete; then
        count_restart "delete failed" 1
        sleep "$poll"
      fi
    elif [[ "$state" == UNREADABLE ]]; then
      count_restart "gcloud could not describe $name: $(tail -n 1 "$log_dir/gcloud-describe.err")" 1
      sleep "$poll"
    elif [[ "$state" == STOPPED ]]; then
      die "--name=$name is STOPPED: start it (gcloud compute tpus tpu-vm start) or delete it"
    else
      sleep "$poll"  # CREATING, WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDING, REPAIRING, ...
    fi
  done
}

do_keep_running() {
  local rc needs_setup=1 step
  [[ -n "$accelerator" ]] || die "--accelerator is required for keep-running (it creates the slice), e.g. --accelerator=v4-16"
  if (( dry_run )); then
    echo "# keep-running: until the run exits 0, 2 or 3, at most $max_restarts restarts"
    echo "# 1. the slice's state, every $poll s while it changes:"
    join_args "${state_query[@]}"
    echo
    echo "# 2. not found: create; lost (${lost_states[*]}): delete, then create:"
    for step in delete create setup run; do
      case "$step" in
        setup) echo "# 3. on a new slice, and at the start:" ;;
        run) echo "# 4. the run; after an exit status other than 0, 2 or 3: a $poll s pause, then 1 again:" ;;
      esac
      own_command "$step"
      join_args "${own_words[@]}"
      echo
    done
    return 0
  fi
  mkdir -p "$log_dir"
  restarts=0
  while :; do
    bring_up_slice
    (( slice_created )) && needs_setup=1
    if (( needs_setup )); then
      rc=0
      run_own setup || rc=$?
      if (( rc )); then
        count_restart "setup failed (exit $rc)" "$rc"
        sleep "$poll"
        continue
      fi
      needs_setup=0
    fi
    rc=0
    run_own run || rc=$?
    case "$rc" in
      0) echo "keep-running: the run finished"; return 0 ;;
      2 | 3) echo "keep-running: the run exited $rc (2: bad config, 3: non-finite loss); not restarted"; return "$rc" ;;
    esac
    count_restart "the run exited $rc" "$rc"
    # A preempted slice changes state a little after its run ends: ask after a pause.
    sleep "$poll"
  done
}

"do_${command//-/_}"
