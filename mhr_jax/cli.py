"""What every command-line entry point shares: T5X's flag habits, multi-host start-up, exit statuses.

Flags: --gin_file (repeatable; later files override earlier ones), --gin_search_paths (comma separated,
repeatable), --gin.KEY=VALUE and --gin_bindings='KEY = VALUE' (applied after the files, in order; values are
gin literals, so strings carry quotes). Multi-host: --coordinator_address, --num_processes, --process_id (or
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), or --multihost to let JAX detect the cluster
(TPU pods, SLURM). Exit status: 0 done, 2 bad configuration, 3 non-finite loss, 143 stopped by SIGTERM after
saving (EXIT_*).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import jax

from mhr_jax.errors import ConfigError, NonFiniteLoss, RunError
from mhr_jax.logging_utils import setup_console

EXIT_CONFIG_ERROR = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 143  # 128 + SIGTERM, after the checkpoint is written


def _env_int(name: str) -> int | None:
  return int(os.environ[name]) if os.environ.get(name) else None


def flag_parser(prog: str, description: str) -> argparse.ArgumentParser:
  """The shared flags; a CLI may add its own before calling `parse_flags`."""
  parser = argparse.ArgumentParser(prog=prog, description=description)
  parser.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
  parser.add_argument("--gin_search_paths", action="append", default=[],
                      help="comma-separated directories for gin files and includes")
  parser.add_argument("--gin_bindings", action="append", default=[], help="'KEY = VALUE' (repeatable)")
  parser.add_argument("--coordinator_address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
  parser.add_argument("--num_processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
  parser.add_argument("--process_id", type=int, default=_env_int("JAX_PROCESS_ID"))
  parser.add_argument("--multihost", action="store_true",
                      help="jax.distributed.initialize() with cluster auto-detection")
  return parser


def parse_flags(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
  """T5X flag habits: --gin.KEY=VALUE is shorthand for --gin_bindings='KEY = VALUE' (order kept)."""
  rewritten = []
  for arg in argv:
    if arg.startswith("--gin."):
      key, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        raise ConfigError(f"{arg}: expected --gin.KEY=VALUE")
      arg = f"--gin_bindings={key} = {value}"
    rewritten.append(arg)
  args = parser.parse_args(rewritten)
  if not args.gin_file:
    parser.error("at least one --gin_file is required")
  args.gin_search_paths = [p for group in args.gin_search_paths for p in group.split(",") if p]
  return args


def init_distributed(args: argparse.Namespace) -> None:
  """jax.distributed.initialize() when a coordinator is given (or --multihost); before any JAX use."""
  explicit = args.coordinator_address is not None or args.num_processes not in (None, 1)
  if not (explicit or args.multihost):
    return
  if explicit and None in (args.coordinator_address, args.num_processes, args.process_id):
    raise ConfigError(
        "multi-host: give all of --coordinator_address, --num_processes and --process_id "
        "(or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # Collectives between CPU processes (tests, CPU clusters) need an explicit implementation.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  else:
    jax.distributed.initialize()


def main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
         argv: list[str] | None = None) -> int:
  """Parses flags, starts multi-host JAX and the console log, runs `run(args)`; returns the exit status.

  Errors the user can fix end the process with one `error:` line on stderr.
  """
  argv = sys.argv[1:] if argv is None else argv

  def body() -> int:
    args = parse_flags(parser, argv)
    init_distributed(args)
    setup_console()  # tags lines with the process index: after jax.distributed is up
    return run(args)
  return guarded(body)


def guarded(body: Callable[[], int]) -> int:
  """body()'s exit status; an error the user can fix becomes one `error:` line on stderr and its status."""
  try:
    return body()
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_NONFINITE
  except (ConfigError, RunError, FileNotFoundError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return EXIT_CONFIG_ERROR
