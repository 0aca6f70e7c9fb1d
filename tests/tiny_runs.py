"""What the end-to-end tests share: the smallest experiment (gin text that later lines may override) and a
command that kills itself at a chosen moment."""

# The smallest experiment on the synthetic suite: tiny model, 4 training tasks, a few steps per stage.
TINY_EXPERIMENT = """
include 'configs/models/tiny.gin'
MODEL_DIR = %gin.REQUIRED
Experiment.model_dir = %MODEL_DIR
DataConfig.source = 'synthetic'
DataConfig.task = 'synthetic_train'
DataConfig.synthetic_train_tasks = 4
DataConfig.synthetic_test_tasks = 1
DataConfig.synthetic_instances = 110
DataConfig.batch_size = 8
DataConfig.input_len = 32
DataConfig.target_len = 16
AdapterConfig.n_tasks = 4
AdapterConfig.n_skills = 2
AdapterConfig.n_splits = 2
AdapterConfig.gumbel = False
OptimizerConfig.name = 'adamw'
OptimizerConfig.adapter_lr = 1e-2
OptimizerConfig.routing_lr = 1.0
OptimizerConfig.warmup_steps = 0
RunConfig.model_dir = %MODEL_DIR
RunConfig.log_every = 1
RunConfig.keep_checkpoints = 1
base/DataConfig.prompt = 'definition'
base/DataConfig.input_len = 96
adapt/AdaptConfig.shots = 4
"""

# Two steps per stage from a base trained here, on 2 held-out tasks, one method's stages only (later lines name
# them): the end-to-end tests that run many processes or many cells.
TWO_STEP_EXPERIMENT = TINY_EXPERIMENT + """
DataConfig.synthetic_test_tasks = 2
Experiment.controls = ()
Experiment.zero_shot = ()
Experiment.analysis = False
OptimizerConfig.adapter_lr = 1e-3
OptimizerConfig.routing_lr = 0.1
base/DataConfig.prompt = None
base/DataConfig.input_len = 32
base/RunConfig.train_steps = 2
pretrain/RunConfig.train_steps = 2
adapt/RunConfig.train_steps = 2
"""


def kill_at_checkpointer(module: str) -> str:
  """Python source that runs `python -m MODULE ARGS` (argv[2:]) and SIGKILLs it as soon as it opens a run
  checkpoint directory under argv[1]: the kill lands at that moment whatever the machine's speed or load (a
  watcher polling for the directory sees it late when it is starved of CPU)."""
  return f"""
import os, runpy, signal, sys
from mhr_jax.checkpoints import run_state
prefix, init = sys.argv[1], run_state.RunCheckpointer.__init__

def init_then_kill(self, directory, *args, **kwargs):
  init(self, directory, *args, **kwargs)
  if os.path.abspath(directory).startswith(prefix):
    os.kill(os.getpid(), signal.SIGKILL)

run_state.RunCheckpointer.__init__ = init_then_kill
sys.argv = [{module!r}, *sys.argv[2:]]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""
