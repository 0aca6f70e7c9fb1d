"""Launch scripts: --dry-run prints the exact command and runs nothing."""
import os
import shlex
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_single_node_dry_run_prints_train_command():
  script = os.path.join(REPO, "launch", "gpu_single_node.sh")
  out = subprocess.run(
      ["bash", script, "--dry-run", "--gin_file=configs/tiny.gin", "--gin.MODEL_DIR='/tmp/x y'"],
      capture_output=True, text=True, check=True, env={**os.environ, "PYTHON": "python3"}).stdout
  words = shlex.split(out)
  assert words[0].startswith("XLA_FLAGS=") and "--xla_gpu_enable_latency_hiding_scheduler=true" in words[0]
  command = words[words.index("python3"):]
  assert command == ["python3", "-m", "mhr_jax.train", "--gin_file=configs/tiny.gin",
                     "--gin.MODEL_DIR='/tmp/x y'"]
