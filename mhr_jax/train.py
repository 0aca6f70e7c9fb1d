r"""Multi-task pre-training or few-shot adaptation of one run, from gin configs, with T5X's flag habits.

  python -m mhr_jax.train --gin_file=configs/tiny.gin --gin.MODEL_DIR="'/tmp/tiny'" --gin.TRAIN_STEPS=40

Flags and exit statuses: mhr_jax/cli.py (0 done, 2 bad configuration, 3 non-finite loss, 143 stopped by
SIGTERM after saving). RunConfig.mode "pretrain" runs mhr_jax/stages/pretrain.py, "adapt" mhr_jax/stages/fewshot.py; the
run directory (RunConfig.model_dir) receives the operative config.gin, metrics.jsonl, TensorBoard events,
orbax checkpoints and results.json. The same command on the same directory resumes from its latest
checkpoint, exactly. MODEL_DIR may be a gs:// URL (mhr_jax/storage.py). Configuration mistakes, a malformed
URL or a bucket that does not exist end the run with one `error:` line before anything is written.
JAX_COMPILATION_CACHE_DIR=... makes repeated runs skip compilation.
"""
from __future__ import annotations

import argparse
import json
import sys

from mhr_jax import cli, partitioning, storage
from mhr_jax.stages import fewshot, pretrain
from mhr_jax import config as config_lib
from mhr_jax.logging_utils import banner, log


def run(args: argparse.Namespace) -> int:
  """Everything after flag parsing; returns the process exit status."""
  banner("setup")
  cfg, config_text = config_lib.load_run_config(args.gin_file, args.gin_bindings, args.gin_search_paths)
  log.info("config: %s", json.dumps(config_lib.describe(cfg)))
  log.info("run directory: %s", storage.absolute(cfg.run.model_dir))
  # Config errors about where the run starts, before anything is built or written.
  if cfg.run.mode == "adapt":
    fewshot.starting_point(cfg)
  else:
    pretrain.check_start(cfg)
  banner("mesh")
  mesh = config_lib.build_mesh(cfg)
  log.info("%s", partitioning.describe(mesh))
  if cfg.run.mode == "adapt":
    return fewshot.adapt(cfg, config_text, mesh)
  return pretrain.pretrain(cfg, config_text, mesh)


def main(argv: list[str] | None = None) -> int:
  parser = cli.flag_parser("python -m mhr_jax.train", __doc__.split("\n")[0])
  return cli.main(parser, run, argv)


if __name__ == "__main__":
  sys.exit(main())
