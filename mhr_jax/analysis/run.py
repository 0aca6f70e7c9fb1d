r"""Analysis of a pre-training run as in the MHR paper: routing heatmaps, task similarity, gradient alignment.

  python -m mhr_jax.analysis --run_dir=runs/tiny [--step=N] [--out=runs/tiny/analysis] \
      [--grad_batches=4] [--batch_size=8]

Reads the run directory's config.gin and one checkpoint (--step, default the latest) and writes into --out
(default RUN_DIR/analysis), each file atomically (mhr_jax/storage.py; both may be gs:// URLs):
  routing_<layer>.png      routing weights of every training task (rows) over heads x skills (columns) of
                           the first, middle and last adapted layers ('/' in the layer path becomes '.');
  routing_mean.png         the same, averaged over all adapted layers;
  routing_weights.npz      the numbers behind them: one (T, S, K) array per layer (key: the layer path with
                           '.' for '/'), plus `task_ids` and `tasks`;
  routing_similarity.csv   cosine similarity between tasks' routing vectors (every layer's weights
                           concatenated), in training-task order, task names as header row and column;
  routing_similarity.png   the same matrix, tasks ordered by average-linkage clustering on 1 - cosine;
  gradient_alignment.json  per-task gradient cosines (below); gradient_alignment.png its matrix;
  analysis.json            what was written, the step, the tasks, the adapted layer count.
Routing weights are those the model uses at evaluation: w = s / (sum_k s + 1e-12), s = sigmoid(Z), per head
(adapters.layers.routing_weights). Non-routed kinds (lora, private_lora, ia3, none) have no routing outputs.

Gradient alignment: for each training task, the gradient of the training objective (LossConfig of the run)
over --grad_batches batches of --batch_size examples of that task alone (the exact gradient of their
token-mean loss), with respect to the adapter weights (the "adapters" group of the run's parameter rules;
for kind "none", the base weights); routing logits and frozen weights are left out. The forward pass has
no dropout and no Gumbel noise, so the gradients are deterministic and the cosines compare task directions
rather than sampling noise. Cosines are taken per adapted layer (for kind "none": per module holding
weights) and averaged over layers (docs/METHODS.md).
The gradients are kept on the host as float32: (tasks x adapter parameters) x 4 bytes.

Exit status: 0 done, 2 bad input (one `error:` line on stderr, nothing written).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from flax import traverse_util

from mhr_jax import cli, models
from mhr_jax import config as config_lib
from mhr_jax.analysis import figures, gradients, routing
from mhr_jax.checkpoints.run_state import checkpoint_steps, restore_params
from mhr_jax.errors import RunError
from mhr_jax.logging_utils import banner, log, setup_console
from mhr_jax import storage
from mhr_jax.storage import write_json_atomic, write_text_atomic


class AnalysisError(RunError):
  """Input the user can fix (run directory, checkpoint, flags); the message is one line."""


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m mhr_jax.analysis", description=__doc__.split("\n")[0])
  parser.add_argument("--run_dir", required=True,
                      help="pre-training run directory (config.gin, run_config.json, checkpoints/)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/analysis)")
  parser.add_argument("--grad_batches", type=int, default=4, help="batches per task for the gradients")
  parser.add_argument("--batch_size", type=int, default=8, help="examples per gradient batch")
  return parser.parse_args(list(argv))


def check_inputs(run_dir: str, step: int | None, out: str | None, grad_batches: int, batch_size: int
                 ) -> tuple[str, int, str]:
  """(run_dir, step, out) after checking the run directory, its checkpoints and the step; writes nothing."""
  if grad_batches < 1:
    raise AnalysisError(f"--grad_batches={grad_batches}: must be >= 1")
  if batch_size < 1:
    raise AnalysisError(f"--batch_size={batch_size}: must be >= 1")
  given = run_dir
  storage.check_path(run_dir, "--run_dir", run_dir=True)
  storage.check_path(out, "--out")
  run_dir = storage.absolute(run_dir)
  if not storage.isdir(run_dir):
    raise AnalysisError(f"--run_dir={given}: no such directory")
  if not storage.isfile(os.path.join(run_dir, "config.gin")):
    raise AnalysisError(f"--run_dir={given}: no config.gin there (not a run directory)")
  checkpoints = os.path.join(run_dir, "checkpoints")
  steps = checkpoint_steps(checkpoints)
  if not steps:
    raise AnalysisError(f"--run_dir={given}: no checkpoint in {checkpoints}")
  chosen = steps[-1] if step is None else step
  if chosen not in steps:
    raise AnalysisError(f"--step={step}: no such checkpoint in {checkpoints} (steps: {steps})")
  out = storage.absolute(out) if out else os.path.join(run_dir, "analysis")
  storage.check_reachable(out, "--out")
  if storage.isfile(out):
    raise AnalysisError(f"--out={out}: exists and is not a directory")
  return run_dir, chosen, out


def load_config(run_dir: str) -> config_lib.ExperimentConfig:
  """The run's ExperimentConfig from its run_config.json (RunConfig.model_dir = run_dir, so a moved run
  directory still finds its own files, e.g. the synthetic data)."""
  cfg = config_lib.read_run_config(run_dir)
  if cfg.run.mode != "pretrain":
    raise AnalysisError(f"--run_dir={run_dir}: RunConfig.mode={cfg.run.mode!r}; give a pre-training run "
                        "directory")
  if cfg.loss.kind != "lm":
    raise AnalysisError(f"LossConfig.kind={cfg.loss.kind!r}: pre-training runs train with kind 'lm'")
  return cfg


def analyze(run_dir: str, step: int | None = None, out: str | None = None, grad_batches: int = 4,
            batch_size: int = 8) -> dict:
  """The analysis of one pre-training run (what `python -m mhr_jax.analysis` runs): writes its files into
  `out` (default RUN_DIR/analysis) and returns what analysis.json holds. AnalysisError / ConfigError for
  input the user can fix, before anything is written."""
  start_time = time.time()
  banner("setup")
  run_dir, step, out = check_inputs(run_dir, step, out, grad_batches, batch_size)
  cfg = load_config(run_dir)
  acfg = cfg.model.adapter
  log.info("run %s, checkpoint %d; adapter %s (K=%d, S=%d); output: %s", run_dir, step, acfg.kind,
           acfg.n_skills, acfg.n_splits, out)

  banner("data")
  from mhr_jax.data import pipeline as data  # pylint: disable=g-import-not-at-top  (TensorFlow)
  registration, _ = data.register_data(cfg.data, cfg.default_data_dir, vocab_size=cfg.model.vocab_size)
  names = list(registration.mixtures.get(cfg.data.task, ()))
  if len(names) < 2:
    raise AnalysisError(f"DataConfig.task={cfg.data.task!r}: the analysis compares the tasks of a "
                        f"mixture and needs at least 2 ({len(names)} found)")
  task_ids = [registration.task_ids[n] for n in names]
  # Per-layer (T, S, K) routing and per-layer gradients: the unscanned layout, whatever the run trained in.
  params = models.layout.to_unscanned(None, restore_params(os.path.join(run_dir, "checkpoints"), step))
  layers = routing.adapted_layers(params)
  log.info("%d training tasks; %d adapted layers; params: %s/checkpoints/%d", len(names), len(layers),
           run_dir, step)
  storage.makedirs(out)
  files: dict[str, object] = {}
  summary: dict[str, object] = {}

  banner("routing")
  weights = {layer: w[task_ids] for layer, w in routing.routing_weights_by_layer(cfg, params).items()}
  if not weights:
    log.info("adapter kind %r has no routing: no routing heatmaps or routing similarity", acfg.kind)
  else:
    if acfg.anneal_steps:
      log.info("AdapterConfig.anneal_steps=%d: weights shown without the annealing, as evaluation uses "
               "them", acfg.anneal_steps)
    heatmaps = []
    for layer in figures.plotted_layers(list(weights)):
      path = os.path.join(out, figures.heatmap_file(layer))
      figures.plot_routing(weights[layer], names, f"routing weights, layer {layer} (step {step})", path)
      heatmaps.append(path)
    mean = np.mean(np.stack(list(weights.values())), axis=0)
    files["routing_mean"] = os.path.join(out, "routing_mean.png")
    figures.plot_routing(mean, names, f"routing weights averaged over {len(weights)} routing matrices "
                 f"(step {step})", files["routing_mean"])
    files["routing_heatmaps"] = heatmaps
    files["routing_weights"] = os.path.join(out, "routing_weights.npz")
    figures.save_npz(files["routing_weights"], {**{layer.replace("/", "."): w for layer, w in weights.items()},
                                         "task_ids": np.asarray(task_ids), "tasks": np.asarray(names)})
    similarity = routing.routing_similarity(weights)
    order = routing.cluster_order(similarity)
    files["routing_similarity_csv"] = os.path.join(out, "routing_similarity.csv")
    write_text_atomic(files["routing_similarity_csv"], figures.similarity_csv(similarity, names))
    files["routing_similarity_png"] = os.path.join(out, "routing_similarity.png")
    figures.plot_task_matrix(similarity[np.ix_(order, order)], [names[i] for i in order],
                     f"task similarity from routing (cosine, all layers; step {step})\n"
                     "tasks ordered by average-linkage clustering", files["routing_similarity_png"],
                     colorbar_label="cosine similarity of routing vectors")
    summary.update(routing_layers=len(weights), routing_layers_plotted=figures.plotted_layers(list(weights)),
                   similarity_order=[names[i] for i in order],
                   mean_routing_similarity=figures.json_float(gradients.off_diagonal_mean(similarity)))
    log.info("routing: %d matrices, heatmaps of %s; mean task similarity %.4f", len(weights),
             ", ".join(figures.plotted_layers(list(weights))), gradients.off_diagonal_mean(similarity))

  banner("gradients")
  leaves = gradients.gradient_leaves(cfg, params)
  flat = traverse_util.flatten_dict(dict(params))
  n_params = sum(int(np.prod(flat[p].shape)) for p in leaves)
  log.info("gradients of %d %s parameters for %d tasks x %d batches x %d examples (%.1f MB on the host)",
           n_params, gradients.gradient_group(cfg), len(names), grad_batches, batch_size,
           4 * n_params * len(names) / 1e6)
  grads = gradients.task_gradients(cfg.model.replace(scan_layers=False), cfg.loss, params, leaves,
                         [gradients.task_batches_for(cfg, registration.tasks[n], grad_batches, batch_size)
                          for n in names])
  alignment = gradients.gradient_alignment(grads)
  if not np.all(np.isfinite(alignment["matrix"])):
    log.warning("some tasks have an all-zero (or non-finite) gradient on every layer: their cosines are "
                "undefined (null)")
  mean_cos = alignment["mean_pairwise_cosine"]
  report = {"mean_pairwise_cosine": figures.json_float(mean_cos),
            "per_layer_mean": {k: figures.json_float(v) for k, v in alignment["per_layer_mean"].items()},
            "matrix": [[figures.json_float(v) for v in row] for row in alignment["matrix"]],
            "tasks": names, "task_ids": task_ids, "step": step, "grad_batches": grad_batches,
            "batch_size": batch_size, "parameters": gradients.gradient_group(cfg), "n_parameters": n_params,
            "n_layers": len(grads)}
  files["gradient_alignment_json"] = os.path.join(out, "gradient_alignment.json")
  write_json_atomic(files["gradient_alignment_json"], report)
  files["gradient_alignment_png"] = os.path.join(out, "gradient_alignment.png")
  figures.plot_task_matrix(alignment["matrix"], names,
                   f"gradient alignment (cosine per layer, mean over {len(grads)} layers; step {step})\n"
                   f"mean pairwise cosine {mean_cos:.4f}", files["gradient_alignment_png"],
                   colorbar_label="cosine of per-task gradients", symmetric=True)
  per_layer = {k: v for k, v in alignment["per_layer_mean"].items() if np.isfinite(v)}
  log.info("gradient alignment: mean pairwise cosine %.4f over %d layers", mean_cos, len(grads))
  if per_layer:
    lo, hi = min(per_layer, key=per_layer.get), max(per_layer, key=per_layer.get)
    log.info("least aligned layer %s (%.4f); most aligned %s (%.4f)", lo, per_layer[lo], hi, per_layer[hi])

  banner("results")
  files["analysis"] = os.path.join(out, "analysis.json")
  summary = {"run_dir": run_dir, "step": step, "adapter_kind": acfg.kind, "n_tasks": len(names), "tasks": names,
             "task_ids": task_ids, "adapted_layers": len(layers), "routed": bool(weights),
             "mean_pairwise_gradient_cosine": figures.json_float(mean_cos), "files": files,
             "wall_time_s": time.time() - start_time, **summary}
  write_json_atomic(files["analysis"], summary)
  log.info("analysis of %s step %d: %s", run_dir, step, files["analysis"])
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m mhr_jax.analysis`: flags -> `analyze`; exit status 0, or 2 with one `error:` line."""
  def body() -> int:
    args = parse_flags(sys.argv[1:] if argv is None else argv)
    setup_console()
    analyze(args.run_dir, args.step, args.out, args.grad_batches, args.batch_size)
    return 0
  return cli.guarded(body)


if __name__ == "__main__":
  sys.exit(main())
