r"""Analysis of a pre-training run as in the MHR paper: routing heatmaps, task similarity, gradient alignment.

  python -m mhr_jax.analysis --run_dir=runs/tiny [--step=N] [--out=runs/tiny/analysis] \
      [--grad_batches=4] [--batch_size=8]

Reads the run directory's config.gin and one checkpoint (--step, default the latest) and writes into --out
(default RUN_DIR/analysis), each file through a temporary name and os.replace:
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
weights) and averaged over layers (METHODS.md).
The gradients are kept on the host as float32: (tasks x adapter parameters) x 4 bytes.

Exit status: 0 done, 2 bad input (one `error:` line on stderr, nothing written).
"""
from __future__ import annotations

import argparse
import io
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mhr_jax import cli, losses, models, train_step
from mhr_jax import config as config_lib
from mhr_jax.adapters import layers as adapter_layers
from mhr_jax.adapters import params as params_lib
from mhr_jax.errors import RunError
from mhr_jax.logging_utils import banner, log, setup_console
from mhr_jax.run_checkpoints import checkpoint_steps, restore_params
from mhr_jax.storage import write_bytes_atomic, write_json_atomic, write_text_atomic

ADAPTER_LEAVES = ("lora_a", "lora_b", "ia3_scale")
SHARED_ROUTING = "shared"  # routing_weights_by_layer's key for AdapterConfig.routing="shared"
MAX_TICK_LABELS = 80       # more tasks than this: label every n-th row only

# Model order of module names inside a block (sorted() would put decoder before encoder, wo before q).
_MODULE_RANK = {"encoder": 0, "decoder": 1, "self_attention": 0, "cross_attention": 1, "mlp": 2,
                "q": 0, "k": 1, "v": 2, "o": 3, "wi": 4, "wi_0": 5, "wi_1": 6, "wo": 7}


class AnalysisError(RunError):
  """Input the user can fix (run directory, checkpoint, flags); the message is one line."""


# ============================================================================== pure computations


def _flat(tree) -> dict[tuple[str, ...], object]:
  return traverse_util.flatten_dict(dict(tree))


def _adapter_cfg(cfg):
  """The AdapterConfig of an ExperimentConfig, a T5Config or an AdapterConfig."""
  if hasattr(cfg, "model"):
    cfg = cfg.model
  return cfg.adapter if hasattr(cfg, "adapter") else cfg


def layer_sort_key(layer: str) -> tuple:
  """Sort key putting '/'-joined module paths in model order: encoder before decoder, blocks by number,
  self-attention, cross-attention, MLP, and q, k, v, o, wi*, wo within them."""
  key = []
  for part in layer.split("/"):
    numbered = re.fullmatch(r"(\D*?)_?(\d+)", part)
    if part in _MODULE_RANK:
      key.append((0, "", _MODULE_RANK[part]))
    elif numbered:
      key.append((1, numbered.group(1), int(numbered.group(2))))
    else:
      key.append((2, part, 0))
  return tuple(key)


def adapted_layers(params) -> list[str]:
  """'/'-joined paths of the layers that carry adapter weights (lora_a, lora_b, ia3_scale), in model order."""
  layers = {"/".join(path[:-1]) for path in _flat(params) if path[-1] in ADAPTER_LEAVES}
  return sorted(layers, key=layer_sort_key)


def routing_weights_by_layer(cfg, params) -> dict[str, np.ndarray]:
  """Evaluation-time routing weights of every task, per routing matrix.

  Args:
    cfg: ExperimentConfig, T5Config or AdapterConfig of the model (its adapter settings).
    params: unboxed params tree holding .../routing/logits leaves of shape (T, S, K).
  Returns:
    {layer path: (T, S, K) float32 array}: w = s / (sum_k s + 1e-12) with s = sigmoid(Z), per task and
    head, as adapters.layers.routing_weights computes them without training noise or annealing. Layers
    are in model order; shared routing (one matrix for the model) has the single key "shared". Empty for
    params without routing (non-routed adapter kinds).
  """
  acfg = _adapter_cfg(cfg)
  out = {}
  for path, logits in _flat(params).items():
    if path[-2:] != ("routing", "logits"):
      continue
    layer = "/".join(path[:-2]) or SHARED_ROUTING
    n_tasks = logits.shape[0]
    weights = adapter_layers.routing_weights(jnp.asarray(logits), np.arange(n_tasks), acfg,
                                             training=False, rng=None)
    out[layer] = np.asarray(weights, np.float32)
  return {layer: out[layer] for layer in sorted(out, key=layer_sort_key)}


def routing_similarity(weights: Mapping[str, np.ndarray]) -> np.ndarray:
  """Cosine similarity between tasks' routing vectors.

  Args:
    weights: {layer: (T, S, K)} routing weights (e.g. `routing_weights_by_layer`, rows restricted to
      the tasks of interest); every layer must have the same T.
  Returns:
    (T, T) float64: cos(v_i, v_j) where v_t concatenates task t's weights of every layer.
  """
  if not weights:
    raise ValueError("routing_similarity: no routing weights")
  vectors = np.concatenate([np.asarray(w, np.float64).reshape(w.shape[0], -1) for w in weights.values()],
                           axis=1)
  norms = np.linalg.norm(vectors, axis=1)
  return (vectors @ vectors.T) / np.outer(norms, norms)


def cluster_order(similarity: np.ndarray) -> list[int]:
  """Row order grouping similar tasks: the leaves of an average-linkage clustering on 1 - similarity."""
  n = similarity.shape[0]
  if n < 3:
    return list(range(n))
  from scipy.cluster import hierarchy  # pylint: disable=g-import-not-at-top
  from scipy.spatial import distance  # pylint: disable=g-import-not-at-top
  dist = np.clip(1.0 - np.nan_to_num(similarity, nan=0.0), 0.0, None)
  dist = (dist + dist.T) / 2
  np.fill_diagonal(dist, 0.0)
  linkage = hierarchy.linkage(distance.squareform(dist, checks=False), method="average")
  return [int(i) for i in hierarchy.leaves_list(linkage)]


def _cosine_matrix(g: np.ndarray) -> np.ndarray:
  """(T, P) -> (T, T) cosines in float64; NaN where a row is all zeros (the cosine is undefined)."""
  g = np.asarray(g, np.float64).reshape(g.shape[0], -1)
  norms = np.linalg.norm(g, axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    out = (g @ g.T) / np.outer(norms, norms)
  out[(norms == 0)[:, None] | (norms == 0)[None, :]] = np.nan
  return out


def _off_diagonal_mean(m: np.ndarray) -> float:
  """Mean over task pairs i != j, ignoring undefined (NaN) entries; NaN when there are none."""
  values = m[~np.eye(m.shape[0], dtype=bool)]
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else math.nan


def gradient_alignment(per_task_grads: Mapping[str, np.ndarray]) -> dict:
  """Pairwise cosine similarity of per-task gradients, per layer and averaged over layers.

  Args:
    per_task_grads: {layer: (T, ...) array}, row t the gradient of task t with respect to that layer's
      parameters (trailing axes are flattened), e.g. from `task_gradients`.
  Returns:
    {"per_layer": {layer: (T, T) cosines}, "per_layer_mean": {layer: mean over task pairs i != j},
     "matrix": (T, T) the per-layer cosines averaged over layers, "mean_pairwise_cosine": mean of
     "matrix" over pairs i != j}. A cosine involving an all-zero gradient is undefined (NaN) and left
    out of the averages.
  """
  if not per_task_grads:
    raise ValueError("gradient_alignment: no layers")
  per_layer = {layer: _cosine_matrix(g) for layer, g in per_task_grads.items()}
  sizes = {m.shape[0] for m in per_layer.values()}
  if len(sizes) != 1:
    raise ValueError(f"gradient_alignment: layers disagree on the number of tasks ({sorted(sizes)})")
  stack = np.stack(list(per_layer.values()))
  defined = np.isfinite(stack)
  with np.errstate(invalid="ignore"):
    matrix = np.where(defined, stack, 0.0).sum(0) / defined.sum(0)
  return {"per_layer": per_layer,
          "per_layer_mean": {layer: _off_diagonal_mean(m) for layer, m in per_layer.items()},
          "matrix": matrix, "mean_pairwise_cosine": _off_diagonal_mean(matrix)}


# ============================================================================== gradients


def gradient_group(cfg: config_lib.ExperimentConfig) -> str:
  """The parameter group whose gradients are compared: "adapters", or "base" for kind "none"."""
  return "base" if cfg.model.adapter.kind == "none" else "adapters"


def gradient_leaves(cfg: config_lib.ExperimentConfig, params) -> list[tuple[str, ...]]:
  """Paths of the leaves in `gradient_group` under the run's parameter rules (config.param_rules)."""
  group = gradient_group(cfg)
  labels = _flat(params_lib.param_labels(params, config_lib.param_rules(cfg), require_trainable=False))
  leaves = [path for path, label in labels.items() if label == group]
  if not leaves:
    raise AnalysisError(f"the run's parameter rules train no {group!r} parameters (RunConfig.param_rules"
                        f"={cfg.run.param_rules}): no gradients to compare")
  return leaves


def task_gradients(model_cfg, loss_cfg: losses.LossConfig, params, leaves: Sequence[tuple[str, ...]],
                   task_batches: Sequence[Sequence[Mapping[str, np.ndarray]]]) -> dict[str, np.ndarray]:
  """Per-task gradients of the training objective, grouped by layer.

  Args:
    model_cfg: the T5Config.  loss_cfg: the run's LossConfig.  params: unboxed params.
    leaves: paths of the leaves to differentiate (e.g. `gradient_leaves`); the rest is held fixed.
    task_batches: task_batches[t] is the list of batches (dicts of NumPy arrays, as
      data.train_batches yields them) of task t; every batch must have the same shapes.
  Returns:
    {layer path: (T, P_layer) float32}: row t is the gradient of task t's objective over the union of
    its batches (sum of term sums / sum of term counts, as the train step normalises a batch), flattened
    and concatenated over the layer's leaves in path order. Computed without dropout or routing noise.
  """
  model = models.T5(model_cfg)
  objective = train_step.OBJECTIVES[loss_cfg.kind]
  chosen = set(leaves)
  flat = _flat(params)
  measured = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p in chosen})
  rest = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in chosen})

  @jax.jit
  def batch_grads(measured, rest, batch, counts):
    def loss(m):
      sums = objective.sums(model, params_lib.combine(m, rest), batch, jax.random.key(0), False, loss_cfg)
      return losses.combine_terms(sums, counts)
    return jax.grad(loss)(measured)

  counts_of = jax.jit(lambda batch: objective.counts(batch, loss_cfg))
  by_layer: dict[str, list[tuple[str, ...]]] = {}
  for path in sorted(chosen):
    by_layer.setdefault("/".join(path[:-1]), []).append(path)
  layer_names = sorted(by_layer, key=layer_sort_key)
  out: dict[str, np.ndarray] = {}
  for t, batches in enumerate(task_batches):
    # The objective's normalisers over all of the task's batches first: the summed per-batch gradients
    # are then exactly the gradient of the union's token-mean loss.
    counts = None
    for batch in batches:
      c = counts_of(batch)
      counts = c if counts is None else jax.tree.map(jnp.add, counts, c)
    grads = None
    for batch in batches:
      g = batch_grads(measured, rest, batch, counts)
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    flat_grads = _flat(jax.device_get(grads))
    for layer in layer_names:
      row = np.concatenate([np.asarray(flat_grads[p], np.float32).ravel() for p in by_layer[layer]])
      if layer not in out:
        out[layer] = np.zeros((len(task_batches), row.size), np.float32)
      out[layer][t] = row
  return out


def task_batches_for(cfg: config_lib.ExperimentConfig, seqio_name: str, n_batches: int,
                     batch_size: int) -> list[dict]:
  """The first `n_batches` training batches of one registered SeqIO task (the run's lengths and seed)."""
  from mhr_jax import data  # pylint: disable=g-import-not-at-top  (TensorFlow)
  d = cfg.data
  stream = data.train_batches(seqio_name, d.split, batch_size, d.input_len, d.target_len, pack=d.pack,
                              seed=cfg.run.seed)
  try:
    return [next(stream) for _ in range(n_batches)]
  except StopIteration:
    raise AnalysisError(f"task {seqio_name!r}: no {d.split!r} examples") from None


# ============================================================================== plots and files


def _figure(width: float, height: float):
  # A bare Figure with an Agg canvas: no pyplot, so no global backend state is touched.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _save_figure(fig, path: str) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", bbox_inches="tight")
  write_bytes_atomic(path, buffer.getvalue())


def _save_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes_atomic(path, buffer.getvalue())


def _task_ticks(ax, labels: Sequence[str], axis: str) -> None:
  n = len(labels)
  every = max(1, math.ceil(n / MAX_TICK_LABELS))
  ticks = list(range(0, n, every))
  size = 7 if n <= 40 else 5
  if axis == "y":
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=size)
  else:
    ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=size, rotation=90)


def plot_routing(weights: np.ndarray, tasks: Sequence[str], title: str, path: str) -> None:
  """Heatmap of (T, S, K) routing weights: tasks x (head, skill) columns, head boundaries as lines."""
  n_tasks, n_heads, n_skills = weights.shape
  columns = n_heads * n_skills
  fig = _figure(min(24.0, 3.0 + 0.12 * columns), min(40.0, 2.0 + 0.2 * n_tasks))
  ax = fig.add_subplot()
  image = ax.imshow(weights.reshape(n_tasks, columns), aspect="auto", interpolation="nearest",
                    cmap="viridis")
  for h in range(1, n_heads):
    ax.axvline(h * n_skills - 0.5, color="white", linewidth=0.8)
  if n_heads > 1:
    every = max(1, math.ceil(n_heads / 32))
    heads = range(0, n_heads, every)
    ax.set_xticks([h * n_skills + (n_skills - 1) / 2 for h in heads], [f"h{h}" for h in heads], fontsize=7)
    ax.set_xlabel(f"head (S={n_heads}) x skill (K={n_skills}); column = head * K + skill")
  else:
    every = max(1, math.ceil(n_skills / 32))
    ax.set_xticks(range(0, n_skills, every), [f"s{k}" for k in range(0, n_skills, every)], fontsize=7)
    ax.set_xlabel(f"skill (K={n_skills})")
  _task_ticks(ax, tasks, "y")
  ax.set_ylabel("training task")
  ax.set_title(title, fontsize=9)
  fig.colorbar(image, ax=ax, label="routing weight (per head, sums to 1 over skills)")
  _save_figure(fig, path)


def plot_task_matrix(matrix: np.ndarray, tasks: Sequence[str], title: str, path: str, *,
                     colorbar_label: str, symmetric: bool = False) -> None:
  """Tasks x tasks heatmap, coloured over the range of the off-diagonal entries (the diagonal, 1, would
  otherwise flatten the scale); symmetric=True centres a diverging colour map on 0."""
  n = matrix.shape[0]
  size = min(30.0, 3.0 + 0.25 * n)
  fig = _figure(size + 1.5, size)
  ax = fig.add_subplot()
  off = matrix[~np.eye(n, dtype=bool)]
  off = off[np.isfinite(off)]
  if symmetric:
    limit = float(np.abs(off).max()) if off.size and np.abs(off).max() > 0 else 1.0
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
  else:
    low, high = (float(off.min()), float(off.max())) if off.size else (None, None)
    if low is not None and not low < high:
      low, high = None, None
    image = ax.imshow(matrix, cmap="viridis", vmin=low, vmax=high, interpolation="nearest")
  _task_ticks(ax, tasks, "x")
  _task_ticks(ax, tasks, "y")
  ax.set_xlabel("task")
  ax.set_ylabel("task")
  ax.set_title(title, fontsize=9)
  colorbar = fig.colorbar(image, ax=ax, label=colorbar_label)
  colorbar.formatter.set_useOffset(False)  # near-1 cosines: full tick values, no offset text
  colorbar.update_ticks()
  _save_figure(fig, path)


def similarity_csv(matrix: np.ndarray, tasks: Sequence[str]) -> str:
  """CSV text: header row and first column are the task names; values at full float precision."""
  quote = lambda s: f'"{s}"' if any(c in s for c in ',"\n') else s  # noqa: E731
  names = [quote(str(t).replace('"', '""')) for t in tasks]
  lines = [",".join(["task"] + names)]
  for name, row in zip(names, matrix):
    lines.append(",".join([name] + [repr(float(v)) for v in row]))
  return "\n".join(lines) + "\n"


def _json_float(x: float):
  return float(x) if np.isfinite(x) else None  # JSON has no NaN


def _file_name(layer: str) -> str:
  return f"routing_{layer.replace('/', '.')}.png"


def plotted_layers(layers: Sequence[str]) -> list[str]:
  """The first, middle and last of `layers` (model order), without repeats."""
  if not layers:
    return []
  picks = [layers[0], layers[len(layers) // 2], layers[-1]]
  return list(dict.fromkeys(picks))


# ============================================================================== command


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
  run_dir = os.path.abspath(run_dir)
  if not os.path.isdir(run_dir):
    raise AnalysisError(f"--run_dir={given}: no such directory")
  if not os.path.isfile(os.path.join(run_dir, "config.gin")):
    raise AnalysisError(f"--run_dir={given}: no config.gin there (not a run directory)")
  checkpoints = os.path.join(run_dir, "checkpoints")
  steps = checkpoint_steps(checkpoints)
  if not steps:
    raise AnalysisError(f"--run_dir={given}: no checkpoint in {checkpoints}")
  chosen = steps[-1] if step is None else step
  if chosen not in steps:
    raise AnalysisError(f"--step={step}: no such checkpoint in {checkpoints} (steps: {steps})")
  out = os.path.abspath(out) if out else os.path.join(run_dir, "analysis")
  if os.path.exists(out) and not os.path.isdir(out):
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
  from mhr_jax import data  # pylint: disable=g-import-not-at-top  (TensorFlow)
  registration, _ = data.register_data(cfg.data, cfg.default_data_dir, vocab_size=cfg.model.vocab_size)
  names = list(registration.mixtures.get(cfg.data.task, ()))
  if len(names) < 2:
    raise AnalysisError(f"DataConfig.task={cfg.data.task!r}: the analysis compares the tasks of a "
                        f"mixture and needs at least 2 ({len(names)} found)")
  task_ids = [registration.task_ids[n] for n in names]
  # Per-layer (T, S, K) routing and per-layer gradients: the unscanned layout, whatever the run trained in.
  params = models.layout.to_unscanned(None, restore_params(os.path.join(run_dir, "checkpoints"), step))
  layers = adapted_layers(params)
  log.info("%d training tasks; %d adapted layers; params: %s/checkpoints/%d", len(names), len(layers),
           run_dir, step)
  os.makedirs(out, exist_ok=True)
  files: dict[str, object] = {}
  summary: dict[str, object] = {}

  banner("routing")
  weights = {layer: w[task_ids] for layer, w in routing_weights_by_layer(cfg, params).items()}
  if not weights:
    log.info("adapter kind %r has no routing: no routing heatmaps or routing similarity", acfg.kind)
  else:
    if acfg.anneal_steps:
      log.info("AdapterConfig.anneal_steps=%d: weights shown without the annealing, as evaluation uses "
               "them", acfg.anneal_steps)
    heatmaps = []
    for layer in plotted_layers(list(weights)):
      path = os.path.join(out, _file_name(layer))
      plot_routing(weights[layer], names, f"routing weights, layer {layer} (step {step})", path)
      heatmaps.append(path)
    mean = np.mean(np.stack(list(weights.values())), axis=0)
    files["routing_mean"] = os.path.join(out, "routing_mean.png")
    plot_routing(mean, names, f"routing weights averaged over {len(weights)} routing matrices "
                 f"(step {step})", files["routing_mean"])
    files["routing_heatmaps"] = heatmaps
    files["routing_weights"] = os.path.join(out, "routing_weights.npz")
    _save_npz(files["routing_weights"], {**{layer.replace("/", "."): w for layer, w in weights.items()},
                                         "task_ids": np.asarray(task_ids), "tasks": np.asarray(names)})
    similarity = routing_similarity(weights)
    order = cluster_order(similarity)
    files["routing_similarity_csv"] = os.path.join(out, "routing_similarity.csv")
    write_text_atomic(files["routing_similarity_csv"], similarity_csv(similarity, names))
    files["routing_similarity_png"] = os.path.join(out, "routing_similarity.png")
    plot_task_matrix(similarity[np.ix_(order, order)], [names[i] for i in order],
                     f"task similarity from routing (cosine, all layers; step {step})\n"
                     "tasks ordered by average-linkage clustering", files["routing_similarity_png"],
                     colorbar_label="cosine similarity of routing vectors")
    summary.update(routing_layers=len(weights), routing_layers_plotted=plotted_layers(list(weights)),
                   similarity_order=[names[i] for i in order],
                   mean_routing_similarity=_json_float(_off_diagonal_mean(similarity)))
    log.info("routing: %d matrices, heatmaps of %s; mean task similarity %.4f", len(weights),
             ", ".join(plotted_layers(list(weights))), _off_diagonal_mean(similarity))

  banner("gradients")
  leaves = gradient_leaves(cfg, params)
  n_params = sum(int(np.prod(_flat(params)[p].shape)) for p in leaves)
  log.info("gradients of %d %s parameters for %d tasks x %d batches x %d examples (%.1f MB on the host)",
           n_params, gradient_group(cfg), len(names), grad_batches, batch_size,
           4 * n_params * len(names) / 1e6)
  grads = task_gradients(cfg.model.replace(scan_layers=False), cfg.loss, params, leaves,
                         [task_batches_for(cfg, registration.tasks[n], grad_batches, batch_size)
                          for n in names])
  alignment = gradient_alignment(grads)
  if not np.all(np.isfinite(alignment["matrix"])):
    log.warning("some tasks have an all-zero (or non-finite) gradient on every layer: their cosines are "
                "undefined (null)")
  mean_cos = alignment["mean_pairwise_cosine"]
  report = {"mean_pairwise_cosine": _json_float(mean_cos),
            "per_layer_mean": {k: _json_float(v) for k, v in alignment["per_layer_mean"].items()},
            "matrix": [[_json_float(v) for v in row] for row in alignment["matrix"]],
            "tasks": names, "task_ids": task_ids, "step": step, "grad_batches": grad_batches,
            "batch_size": batch_size, "parameters": gradient_group(cfg), "n_parameters": n_params,
            "n_layers": len(grads)}
  files["gradient_alignment_json"] = os.path.join(out, "gradient_alignment.json")
  write_json_atomic(files["gradient_alignment_json"], report)
  files["gradient_alignment_png"] = os.path.join(out, "gradient_alignment.png")
  plot_task_matrix(alignment["matrix"], names,
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
             "mean_pairwise_gradient_cosine": _json_float(mean_cos), "files": files,
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
