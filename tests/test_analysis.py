"""The run analysis (python -m mhr_jax.analysis): routing heatmaps, task similarity, gradient alignment.

One 2-step configs/tiny.gin run and one analysis of it are subprocesses; their outputs are checked against
independent NumPy / jax.grad computations. The pure functions are tested on hand-made arrays, bad input
through `analysis.main` in-process (it stops before any compilation).
"""
import csv
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from PIL import Image

from mhr_jax.models import param_counts
from mhr_jax.analysis import figures, gradients, routing
from mhr_jax.analysis import run as analysis
from mhr_jax import models
from mhr_jax import config as config_lib
from mhr_jax.checkpoints.run_state import restore_params

REPO = config_lib.REPO_ROOT
GRAD_BATCHES, BATCH_SIZE = 2, 4
# configs/tiny.gin: 2 + 2 blocks; encoder blocks adapt q, k, v, o, wi_0, wi_1, wo (7 layers), decoder
# blocks also the cross-attention (11): 36 layers. Model order puts decoder/block_0/cross_attention/q
# (index 18) in the middle.
TINY_LAYERS = 36
PLOTTED = ("encoder/block_0/self_attention/q", "decoder/block_0/cross_attention/q", "decoder/block_1/mlp/wo")


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def tree_listing(root):
  return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)


@pytest.fixture(scope="module")
def analysed(env, tmp_path_factory):
  """(run_dir, out, CompletedProcess of the analysis) of a 2-step tiny run."""
  # One simulated device: the tiny run compiles in about half the time it takes on conftest's eight.
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  one_device = {**env, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=1".strip()}
  run_dir = str(tmp_path_factory.mktemp("analysis") / "run")
  trained = subprocess.run(
      [sys.executable, "-m", "mhr_jax.train", "--gin_file=configs/tiny.gin", f"--gin.MODEL_DIR='{run_dir}'",
       "--gin.TRAIN_STEPS=2"], cwd=REPO, env=one_device, capture_output=True, text=True, timeout=600)
  assert trained.returncode == 0, trained.stderr[-3000:]
  result = subprocess.run(
      [sys.executable, "-m", "mhr_jax.analysis", f"--run_dir={run_dir}", f"--grad_batches={GRAD_BATCHES}",
       f"--batch_size={BATCH_SIZE}"], cwd=REPO, env=one_device, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return run_dir, os.path.join(run_dir, "analysis"), result


def read_json(path):
  with open(path) as f:
    return json.load(f)


# ============================================================================== the command


def test_writes_every_output(analysed):
  run_dir, out, result = analysed
  pngs = ["routing_mean.png", "routing_similarity.png", "gradient_alignment.png"]
  pngs += [f"routing_{layer.replace('/', '.')}.png" for layer in PLOTTED]
  others = ["routing_weights.npz", "routing_similarity.csv", "gradient_alignment.json", "analysis.json"]
  assert sorted(os.listdir(out)) == sorted(pngs + others)  # no temporary files left behind
  for name in pngs:
    with Image.open(os.path.join(out, name)) as image:
      assert image.format == "PNG"
      assert image.size[0] >= 300 and image.size[1] >= 200, (name, image.size)
      pixels = np.asarray(image.convert("L"), np.float32)
    assert pixels.std() > 10, name  # a drawn figure, not a blank canvas
    assert os.path.getsize(os.path.join(out, name)) > 10_000

  summary = read_json(os.path.join(out, "analysis.json"))
  assert summary["step"] == 2 and summary["n_tasks"] == 8 and summary["adapted_layers"] == TINY_LAYERS
  assert summary["routed"] and summary["adapter_kind"] == "mhr"
  assert summary["routing_layers_plotted"] == list(PLOTTED)
  assert summary["run_dir"] == os.path.abspath(run_dir)
  files = summary["files"]
  assert sorted(map(os.path.basename, files["routing_heatmaps"])) == sorted(
      f"routing_{layer.replace('/', '.')}.png" for layer in PLOTTED)
  for value in files.values():
    for path in value if isinstance(value, list) else [value]:
      assert os.path.isfile(path) and os.path.dirname(path) == out
  assert sorted(summary["similarity_order"]) == sorted(summary["tasks"])

  log = result.stderr
  for section in ("setup", "data", "routing", "gradients", "results"):
    assert f"======== {section} " in log
  assert "8 training tasks; 36 adapted layers" in log
  mean = read_json(os.path.join(out, "gradient_alignment.json"))["mean_pairwise_cosine"]
  assert f"gradient alignment: mean pairwise cosine {mean:.4f} over 36 layers" in log


def numpy_routing_weights(logits):
  """Evaluation routing from raw logits, float64: sigmoid, then normalised over skills per head."""
  s = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
  return s / (s.sum(-1, keepdims=True) + 1e-12)


def test_routing_weights_match_the_checkpoint_logits(analysed):
  run_dir, out, _ = analysed
  saved = np.load(os.path.join(out, "routing_weights.npz"))
  summary = read_json(os.path.join(out, "analysis.json"))
  assert list(saved["tasks"]) == summary["tasks"] and list(saved["task_ids"]) == summary["task_ids"]
  params = restore_params(os.path.join(run_dir, "checkpoints"), 2)
  logits = {"/".join(p[:-2]): v for p, v in traverse_util.flatten_dict(params).items()
            if p[-2:] == ("routing", "logits")}
  assert len(logits) == TINY_LAYERS
  assert set(saved.files) == {k.replace("/", ".") for k in logits} | {"tasks", "task_ids"}
  ids = saved["task_ids"]
  for layer, z in logits.items():
    w = saved[layer.replace("/", ".")]
    assert w.shape == (8, 4, 4)  # (training tasks, heads S, skills K)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(w, numpy_routing_weights(z)[ids], rtol=1e-6, atol=0)
  # The tasks' rows differ (the logits are random per task), so the comparison above is not vacuous.
  first = saved[PLOTTED[0].replace("/", ".")]
  assert np.abs(first[0] - first[1]).max() > 1e-6


def test_routing_similarity_csv(analysed):
  _, out, _ = analysed
  with open(os.path.join(out, "routing_similarity.csv")) as f:
    rows = list(csv.reader(f))
  tasks = read_json(os.path.join(out, "analysis.json"))["tasks"]
  assert rows[0] == ["task"] + tasks and [r[0] for r in rows[1:]] == tasks
  matrix = np.asarray([[float(v) for v in r[1:]] for r in rows[1:]])
  np.testing.assert_array_equal(matrix, matrix.T)
  np.testing.assert_allclose(np.diag(matrix), 1.0, rtol=0, atol=1e-12)
  saved = np.load(os.path.join(out, "routing_weights.npz"))
  vectors = np.concatenate([saved[k].astype(np.float64).reshape(8, -1) for k in saved.files
                            if k not in ("tasks", "task_ids")], axis=1)
  unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  np.testing.assert_allclose(matrix, unit @ unit.T, rtol=0, atol=1e-12)


def direct_gradients(run_dir, task_names):
  """{task: {layer: flat adapter gradient}} by jax.grad of a hand-written token-mean cross-entropy over
  the union of each task's first GRAD_BATCHES batches, without dropout or routing noise."""
  from mhr_jax.data import pipeline as data  # pylint: disable=g-import-not-at-top  (TensorFlow)
  cfg = config_lib.read_run_config(run_dir)
  registration, _ = data.register_data(cfg.data, cfg.default_data_dir)
  model = models.T5(cfg.model)
  flat = traverse_util.flatten_dict(restore_params(os.path.join(run_dir, "checkpoints"), 2))
  adapter = {p: v for p, v in flat.items() if p[-1] in ("lora_a", "lora_b")}

  @jax.jit
  def grad(adapter_params, batch):
    def loss(a):
      params = traverse_util.unflatten_dict({**flat, **a})
      logits = model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                           batch["decoder_target_tokens"], task_ids=batch["task_ids"], enable_dropout=False)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["decoder_target_tokens"])
      weights = batch["decoder_loss_weights"]
      return jnp.sum(ce * weights) / jnp.sum(weights)
    return jax.grad(loss)(adapter_params)

  out = {}
  for name in task_names:
    stream = data.train_batches(registration.tasks[name], "train", BATCH_SIZE, cfg.data.input_len,
                                cfg.data.target_len, seed=cfg.run.seed)
    batches = [next(stream) for _ in range(GRAD_BATCHES)]
    union = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert set(union["task_ids"]) == {registration.task_ids[name]}
    g = jax.device_get(grad(adapter, union))
    layers = {}
    for path, value in g.items():
      layers.setdefault("/".join(path[:-1]), []).append(np.asarray(value, np.float64).ravel())
    out[name] = {layer: np.concatenate(parts) for layer, parts in layers.items()}
  return out


def test_gradient_alignment_matches_direct_computation(analysed):
  run_dir, out, _ = analysed
  report = read_json(os.path.join(out, "gradient_alignment.json"))
  tasks = report["tasks"]
  assert len(tasks) == 8 and report["step"] == 2
  assert report["grad_batches"] == GRAD_BATCHES and report["batch_size"] == BATCH_SIZE
  assert report["parameters"] == "adapters" and report["n_layers"] == TINY_LAYERS
  matrix = np.asarray(report["matrix"], np.float64)
  np.testing.assert_array_equal(matrix, matrix.T)
  np.testing.assert_allclose(np.diag(matrix), 1.0, rtol=0, atol=1e-12)
  off = matrix[~np.eye(8, dtype=bool)]
  assert report["mean_pairwise_cosine"] == pytest.approx(off.mean(), abs=1e-12)
  assert len(report["per_layer_mean"]) == TINY_LAYERS
  assert np.mean(list(report["per_layer_mean"].values())) == pytest.approx(off.mean(), abs=1e-12)
  assert np.all(np.abs(off) < 1 - 1e-3)  # distinct tasks: no pair is trivially aligned

  picked = [0, 1, 7]
  grads = direct_gradients(run_dir, [tasks[i] for i in picked])
  for a in range(len(picked)):
    for b in range(a + 1, len(picked)):
      ga, gb = grads[tasks[picked[a]]], grads[tasks[picked[b]]]
      assert len(ga) == TINY_LAYERS
      cosines = [ga[k] @ gb[k] / (np.linalg.norm(ga[k]) * np.linalg.norm(gb[k])) for k in ga]
      assert matrix[picked[a], picked[b]] == pytest.approx(np.mean(cosines), abs=1e-6)


def test_bad_input_is_one_line_and_writes_nothing(analysed, tmp_path, capsys):
  run_dir, _, _ = analysed
  before = tree_listing(run_dir)

  def fails(*flags):
    assert analysis.main(list(flags)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    return lines[0]

  missing = str(tmp_path / "missing")
  assert fails(f"--run_dir={missing}") == f"error: --run_dir={missing}: no such directory"
  assert "not a run directory" in fails(f"--run_dir={tmp_path}")
  (tmp_path / "config.gin").write_text("")
  assert fails(f"--run_dir={tmp_path}") == (
      f"error: --run_dir={tmp_path}: no checkpoint in {tmp_path}/checkpoints")
  out = str(tmp_path / "out")
  assert fails(f"--run_dir={run_dir}", "--step=7", f"--out={out}") == (
      f"error: --step=7: no such checkpoint in {run_dir}/checkpoints (steps: [2])")
  assert fails(f"--run_dir={run_dir}", "--grad_batches=0") == "error: --grad_batches=0: must be >= 1"
  assert fails(f"--run_dir={run_dir}", "--batch_size=0") == "error: --batch_size=0: must be >= 1"
  assert not os.path.exists(out) and not os.path.exists(tmp_path / "analysis")
  assert sorted(os.listdir(tmp_path)) == ["config.gin"]
  assert tree_listing(run_dir) == before


# ============================================================================== pure functions


def test_gradient_alignment_on_hand_made_gradients():
  e0, e1 = np.array([1.0, 0.0, 0.0]), np.array([0.0, 2.0, 0.0])
  # Layer "a": tasks 0, 1 orthogonal, task 2 opposite to task 0. Layer "b": all three the same direction.
  grads = {"a": np.stack([e0, e1, -3 * e0]), "b": np.stack([e1, 5 * e1, e1])}
  result = gradients.gradient_alignment(grads)
  np.testing.assert_allclose(result["per_layer"]["a"], [[1, 0, -1], [0, 1, 0], [-1, 0, 1]], atol=1e-15)
  np.testing.assert_allclose(result["per_layer"]["b"], np.ones((3, 3)), atol=1e-15)
  np.testing.assert_allclose(result["matrix"], [[1, 0.5, 0], [0.5, 1, 0.5], [0, 0.5, 1]], atol=1e-15)
  assert result["per_layer_mean"] == pytest.approx({"a": -1 / 3, "b": 1.0})
  assert result["mean_pairwise_cosine"] == pytest.approx(1 / 3)

  # Trailing axes are flattened; a 45-degree pair; an all-zero gradient is undefined and left out.
  grads = {"w": np.array([[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 0.0]]])}
  result = gradients.gradient_alignment(grads)
  assert result["matrix"][0, 1] == pytest.approx(1 / np.sqrt(2))
  assert np.isnan(result["matrix"][0, 2]) and np.isnan(result["matrix"][2, 2])
  assert result["mean_pairwise_cosine"] == pytest.approx(1 / np.sqrt(2))
  with pytest.raises(ValueError, match="number of tasks"):
    gradients.gradient_alignment({"a": np.ones((2, 3)), "b": np.ones((3, 3))})


def test_routing_weights_and_similarity_on_hand_made_logits():
  rng = np.random.default_rng(0)
  z_enc, z_dec = rng.normal(size=(3, 2, 4)), rng.normal(size=(3, 2, 4))
  params = {"decoder": {"block_0": {"mlp": {"wo": {"routing": {"logits": z_dec}, "lora_a": np.zeros(1)}}}},
            "encoder": {"block_0": {"self_attention": {"q": {"routing": {"logits": z_enc}}}}}}
  acfg = models.T5Config().adapter.replace(kind="mhr", n_tasks=3, n_skills=4, n_splits=2)
  weights = routing.routing_weights_by_layer(acfg, params)
  assert list(weights) == ["encoder/block_0/self_attention/q", "decoder/block_0/mlp/wo"]  # model order
  np.testing.assert_allclose(weights["encoder/block_0/self_attention/q"], numpy_routing_weights(z_enc),
                             rtol=1e-6)
  np.testing.assert_allclose(weights["decoder/block_0/mlp/wo"], numpy_routing_weights(z_dec), rtol=1e-6)
  shared = routing.routing_weights_by_layer(acfg, {"routing": {"logits": z_enc}})
  assert list(shared) == ["shared"]
  assert routing.routing_weights_by_layer(acfg, {"q": {"lora_a": np.zeros(2)}}) == {}

  # Tasks 0 and 1 use disjoint skills (cosine 0), task 2 mixes them evenly (cosine 1/sqrt(2) to each).
  one_hot = {"l": np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]]])}
  similarity = routing.routing_similarity(one_hot)
  np.testing.assert_allclose(similarity, [[1, 0, 2 ** -0.5], [0, 1, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5, 1]],
                             atol=1e-15)
  # Concatenating layers: identical in one layer, disjoint in the other.
  two = {"a": np.array([[[1.0, 0.0]], [[1.0, 0.0]]]), "b": np.array([[[1.0, 0.0]], [[0.0, 1.0]]])}
  assert routing.routing_similarity(two)[0, 1] == pytest.approx(0.5)


def test_layer_order_and_plotted_layers():
  layers = ["decoder/block_10/mlp/wo", "decoder/block_2/self_attention/q", "encoder/block_1/mlp/wi_0",
            "encoder/block_1/self_attention/o", "encoder/block_1/self_attention/k",
            "decoder/block_2/cross_attention/v", "encoder/block_0/mlp/wo", "encoder/block_1/mlp/wo"]
  ordered = sorted(layers, key=routing.layer_sort_key)
  assert ordered == ["encoder/block_0/mlp/wo", "encoder/block_1/self_attention/k",
                     "encoder/block_1/self_attention/o", "encoder/block_1/mlp/wi_0", "encoder/block_1/mlp/wo",
                     "decoder/block_2/self_attention/q", "decoder/block_2/cross_attention/v",
                     "decoder/block_10/mlp/wo"]
  assert figures.plotted_layers(ordered) == [ordered[0], ordered[4], ordered[-1]]
  assert figures.plotted_layers(["shared"]) == ["shared"]
  assert figures.plotted_layers([]) == []


def test_cluster_order_keeps_similar_tasks_together():
  # Tasks {0, 2, 4} and {1, 3} are two tight groups.
  groups = np.array([0, 1, 0, 1, 0])
  similarity = np.where(groups[:, None] == groups[None, :], 0.9, 0.1)
  np.fill_diagonal(similarity, 1.0)
  order = routing.cluster_order(similarity)
  assert sorted(order) == list(range(5))
  labels = groups[order]
  assert (np.diff(labels) != 0).sum() == 1  # one switch between the groups


def test_similarity_csv_quotes_names():
  text = figures.similarity_csv(np.array([[1.0, 0.25], [0.25, 1.0]]), ["plain", 'a,b "c"'])
  rows = list(csv.reader(text.splitlines()))
  assert rows == [["task", "plain", 'a,b "c"'], ["plain", "1.0", "0.25"], ['a,b "c"', "0.25", "1.0"]]


@pytest.mark.parametrize("kind, leaves", [
    ("mhr", {"lora_a", "lora_b"}), ("lora", {"lora_a", "lora_b"}), ("ia3", {"ia3_scale"}),
    ("none", {"kernel", "scale", "embedding", "rel_embedding"})])
def test_gradient_leaves_by_adapter_kind(kind, leaves, tmp_path):
  bindings = [f"MODEL_DIR = '{tmp_path}'", f"AdapterConfig.kind = '{kind}'"]
  if kind != "mhr":
    bindings.append("AdapterConfig.n_splits = 1")
  config_lib.parse_gin(["configs/tiny.gin"], bindings)
  cfg = config_lib.load_config()
  params = param_counts.abstract_params(cfg.model)
  chosen = gradients.gradient_leaves(cfg, params)
  assert {p[-1] for p in chosen} == leaves
  assert gradients.gradient_group(cfg) == ("base" if kind == "none" else "adapters")
  if kind != "none":
    assert {"/".join(p[:-1]) for p in chosen} == set(routing.adapted_layers(params))
