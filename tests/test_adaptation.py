"""Few-shot adaptation: N vmapped (task, seed) pairs equal N separate train-step runs; method
set-ups; sequential mode with best-on-dev selection."""
import zlib

import jax
import numpy as np
import pytest
from flax import traverse_util

from mhr_jax.models import param_counts
from mhr_jax.training import adaptation, losses, optim
from mhr_jax import models, partitioning
from mhr_jax.training import train_step as ts
from mhr_jax.adapters import AdapterConfig, transforms
from mhr_jax.adapters import params as param_groups

CFG = models.preset("tiny", num_layers=1, adapter=AdapterConfig(
    kind="mhr", n_tasks=3, n_skills=2, n_splits=2, rank=2, target_modules=r".*/(q|wi_1)"))
OPT_CFG = optim.OptimizerConfig(name="adafactor", adapter_lr=3e-3, routing_lr=0.3,
                                schedule="linear", warmup_steps=1, clip_norm=1.0)
N_PAIRS, STEPS, B = 3, 3, 4
PAIR_RTOL = 1e-6  # float32 arithmetic of a larger vmapped program: the last bits only


def _params(cfg=CFG, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.2).astype(np.float32),
                      param_counts.abstract_params(cfg))


def _pair_batches(n_pairs, steps, seed=5, li=6, lt=4):
  """steps x dict of (N, B, ...) arrays; pairs see different data and padding."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    targets = rng.integers(2, CFG.vocab_size, (n_pairs, B, lt)).astype(np.int32)
    targets[:, 0, rng.integers(1, lt):] = 0
    out.append({
        "encoder_input_tokens": rng.integers(2, CFG.vocab_size, (n_pairs, B, li)).astype(np.int32),
        "decoder_target_tokens": targets,
        "decoder_input_tokens": np.concatenate(
            [np.zeros((n_pairs, B, 1), np.int32), targets[..., :-1]], -1),
        "decoder_loss_weights": (targets > 0).astype(np.float32),
        "task_ids": np.full((n_pairs, B), 7, np.int32)})   # original ids; adaptation uses 0
  return out


def test_vmapped_pairs_equal_separate_train_step_runs():
  params = _params()
  keys = jax.random.split(jax.random.key(42), N_PAIRS)
  batches = _pair_batches(N_PAIRS, STEPS)
  result = adaptation.adapt("mhr", CFG, params, OPT_CFG, losses.LossConfig(),
                            lambda s: batches[s], keys, STEPS)
  assert result.model_cfg.adapter.n_tasks == 1
  assert result.losses.shape == (STEPS, N_PAIRS)
  assert result.best_step.tolist() == [STEPS] * N_PAIRS
  # The reference: each pair on its own through the ordinary (unvmapped) train step.
  mesh = partitioning.make_mesh(partitioning.MeshConfig(), devices=jax.devices()[:1])
  model = models.T5(result.model_cfg)
  step_fn = None
  for i in range(N_PAIRS):
    cfg_i, p_i = transforms.add_task_rows(CFG, params, 1, jax.random.fold_in(keys[i], 0))
    cfg_i, p_i = transforms.select_task_rows(cfg_i, p_i, [CFG.adapter.n_tasks])
    labels = param_groups.param_labels(p_i, "mhr")
    tx = optim.make_optimizer(OPT_CFG, labels, STEPS)
    state = ts.init_train_state(model, p_i, labels, tx, mesh)
    if step_fn is None:
      step_fn = ts.make_train_step(model, tx, losses.LossConfig(), mesh, ts.shardings_of(state))
    for s in range(STEPS):
      batch = {k: v[i] for k, v in batches[s].items()}
      batch["task_ids"] = np.zeros((B,), np.int32)
      rng = jax.random.fold_in(jax.random.fold_in(keys[i], 1), s)
      state, metrics = step_fn(state, batch, rng)
      np.testing.assert_allclose(result.losses[s, i], metrics["loss"], rtol=0, atol=1e-5)
    ours = traverse_util.flatten_dict(result.pair_params(i))
    ref = traverse_util.flatten_dict(jax.tree.map(np.asarray, state.params))
    assert ours.keys() == ref.keys()
    for path in ref:
      np.testing.assert_allclose(np.asarray(ours[path]), ref[path], rtol=0, atol=1e-5,
                                 err_msg=f"pair {i} {'/'.join(path)}")
  # Pairs really differ (own rows, own data), and training moved them.
  z = [result.pair_params(i)["encoder"]["block_0"]["self_attention"]["q"]["routing"]["logits"]
       for i in range(N_PAIRS)]
  assert not np.allclose(z[0], z[1])
  assert not np.allclose(result.losses[0], result.losses[0, 0])


def test_a_pair_depends_only_on_its_task_and_seed():
  """Keys from fewshot.pair_key: the pairs of seed 42 adapted beside those of seed 13 train as they do alone
  (fresh routing rows, dropout and Gumbel noise are the pair's own); vmapping more pairs changes at most the
  last bits of the float arithmetic. Keys by position in the run's pair list would not."""
  from mhr_jax.stages import fewshot  # pylint: disable=g-import-not-at-top
  params = _params()
  pairs = [("task_a", 13), ("task_b", 13), ("task_a", 42), ("task_b", 42)]
  own = {pair: _pair_batches(1, STEPS, seed=zlib.crc32(pair[0].encode()) + pair[1]) for pair in pairs}

  def run(chosen, keys):
    batches = lambda s: {k: np.concatenate([own[p][s][k] for p in chosen]) for k in own[chosen[0]][s]}  # noqa: E731
    return adaptation.adapt("mhr", CFG, params, OPT_CFG, losses.LossConfig(), batches, keys, STEPS).losses

  together = run(pairs, jax.numpy.stack([fewshot.pair_key(*p) for p in pairs]))
  alone = run(pairs[2:], jax.numpy.stack([fewshot.pair_key(*p) for p in pairs[2:]]))
  np.testing.assert_allclose(together[:, 2:], alone, rtol=PAIR_RTOL, atol=0)
  by_position = run(pairs, jax.numpy.stack([jax.random.fold_in(jax.random.key(s), i)
                                            for i, (_, s) in enumerate(pairs)]))
  assert np.max(np.abs(by_position[:, 2:] - alone) / np.abs(alone)) > 100 * PAIR_RTOL


def test_mhr_z_sequential_with_best_on_dev_selection():
  params = _params()
  keys = jax.random.split(jax.random.key(0), 2)
  batches = _pair_batches(2, STEPS, seed=9)
  dev = _pair_batches(2, 1, seed=11)
  result = adaptation.adapt("mhr-z", CFG, params, OPT_CFG, losses.LossConfig(),
                            lambda s: batches[s], keys, STEPS, dev_batches=dev, eval_every=1,
                            sequential=True)
  flat_labels = traverse_util.flatten_dict(result.labels)
  assert {g for p, g in flat_labels.items() if p[-1] in ("lora_a", "lora_b")} == {"frozen"}
  assert set(traverse_util.flatten_dict(result.trainable)) == \
      {p for p, g in flat_labels.items() if g == "routing"}
  # The inventory is shared and unchanged; only the new routing row moved.
  q = ("encoder", "block_0", "self_attention", "q")
  np.testing.assert_array_equal(
      traverse_util.flatten_dict(result.frozen)[q + ("lora_a",)],
      traverse_util.flatten_dict(params)[q + ("lora_a",)])
  # Best-on-dev: the kept step has the lowest dev loss, and the kept params reproduce it.
  assert result.dev_losses.shape == (STEPS, 2)
  np.testing.assert_array_equal(result.best_step, result.dev_losses.argmin(0) + 1)
  evaluate = adaptation.make_adaptation_eval(models.T5(result.model_cfg), losses.LossConfig())
  kept = adaptation.dev_loss(evaluate, result.frozen, result.trainable, dev, result.model_cfg)
  np.testing.assert_allclose(kept, result.dev_losses.min(0), rtol=1e-5)
  # The same pairs vmapped on a sharded mesh (base over 'model', batches over 'data') train
  # identically to the sequential single-device runs.
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=1, model=2),
                                devices=jax.devices()[:4])
  sharded = adaptation.adapt("mhr-z", CFG, params, OPT_CFG, losses.LossConfig(),
                             lambda s: batches[s], keys, STEPS, mesh=mesh)
  np.testing.assert_allclose(sharded.losses, result.losses, rtol=0, atol=1e-5)
  kernel = sharded.frozen["encoder"]["block_0"]["self_attention"]["q"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")


@pytest.mark.parametrize("method,kind,trained_leaves", [
    ("mhr-mu", "mhr", {"lora_a", "lora_b"}),
    ("poly", "poly", {"lora_a", "lora_b", "logits"}),
    ("lora", "lora", {"lora_a", "lora_b"}),
    ("ia3", "ia3", {"ia3_scale"}),
    ("full", "none", {"kernel", "embedding", "scale", "rel_embedding"}),
])
def test_prepare_pairs_per_method(method, kind, trained_leaves):
  adapter = CFG.adapter.replace(kind=kind, n_splits=1 if kind in ("poly",) else
                                CFG.adapter.n_splits,
                                target_modules=None if kind == "ia3" else CFG.adapter.target_modules)
  cfg = CFG.replace(adapter=adapter)
  keys = jax.random.split(jax.random.key(1), 2)
  new_cfg, labels, frozen, trainable = adaptation.prepare_pairs(method, cfg, _params(cfg), keys)
  leaves = traverse_util.flatten_dict(trainable)
  assert {p[-1] for p in leaves} == trained_leaves
  assert all(v.shape[0] == 2 for v in leaves.values())
  if method == "mhr-mu":
    assert new_cfg.adapter.kind == "lora" and not any("routing" in p for p in leaves)
  if method == "poly":
    z = [v for p, v in leaves.items() if p[-1] == "logits"][0]
    assert z.shape[1] == 1 and not np.allclose(z[0], z[1])   # one fresh row, drawn per pair
  if method != "full":
    assert traverse_util.flatten_dict(frozen)   # the base is shared, not stacked


def test_bad_method_is_rejected():
  with pytest.raises(ValueError, match="method='mhr-x'"):
    adaptation.prepare_pairs("mhr-x", CFG, _params(), jax.random.split(jax.random.key(0), 1))


def test_zero_steps_give_the_starting_point():
  """num_steps=0 (zero-shot evaluation): the mhr-mu starting point computes what the pre-trained MHR model
  computes with uniform routing (routing annealed fully, a = 0), for any task id. K = 3 skills and S = 2
  heads, so averaging over heads instead of skills would show."""
  cfg = CFG.replace(adapter=CFG.adapter.replace(n_skills=3))
  params = _params(cfg)
  keys = jax.random.split(jax.random.key(2), 2)
  result = adaptation.adapt("mhr-mu", cfg, params, OPT_CFG, losses.LossConfig(), None, keys, 0)
  assert result.losses.shape == (0, 2) and result.dev_losses is None
  batch = {k: v[0] for k, v in _pair_batches(1, 1)[0].items()}
  args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"], batch["decoder_target_tokens"])
  uniform = models.T5(cfg).apply({"params": params}, *args, task_ids=np.array([0, 1, 2, 1]),
                                 enable_dropout=False, routing_anneal=0.0)
  for i in range(2):
    mu = models.T5(result.model_cfg).apply({"params": result.pair_params(i)}, *args, enable_dropout=False)
    np.testing.assert_allclose(np.asarray(mu), np.asarray(uniform), atol=1e-5, rtol=1e-5)
  routed = models.T5(cfg).apply({"params": params}, *args, task_ids=np.array([0, 1, 2, 1]),
                                enable_dropout=False)
  assert not np.allclose(np.asarray(routed), np.asarray(uniform), atol=1e-3)  # routing mattered
  with pytest.raises(ValueError, match="num_steps=-1"):
    adaptation.adapt("mhr-mu", cfg, params, OPT_CFG, losses.LossConfig(), None, keys, -1)


def _base_params():
  base_cfg = CFG.replace(adapter=AdapterConfig())
  return base_cfg, _params(base_cfg)


@pytest.mark.parametrize("kind", ["lora", "mhr"])
def test_fresh_adapter_on_a_plain_base(kind):
  """The no-pre-training control: a plain base gets a fresh adapter per pair; B = 0, so each pair starts
  as the base model itself, and the base weights are shared and unchanged."""
  base_cfg, base = _base_params()
  cfg = CFG.replace(adapter=CFG.adapter.replace(kind=kind))
  keys = jax.random.split(jax.random.key(3), 2)
  new_cfg, labels, frozen, trainable = adaptation.prepare_pairs(kind, cfg, base, keys)
  leaves = traverse_util.flatten_dict(trainable)
  assert {p[-1] for p in leaves} == ({"lora_a", "lora_b"} | ({"logits"} if kind == "mhr" else set()))
  a = [v for p, v in leaves.items() if p[-1] == "lora_a"][0]
  assert not np.allclose(a[0], a[1])                   # drawn per pair
  assert all(not np.any(v) for p, v in leaves.items() if p[-1] == "lora_b")
  if kind == "mhr":
    assert new_cfg.adapter.n_tasks == 1
  flat_frozen = traverse_util.flatten_dict(frozen)
  for path, value in traverse_util.flatten_dict(base).items():
    np.testing.assert_array_equal(flat_frozen[path], value)
  batch = {k: v[0] for k, v in _pair_batches(1, 1)[0].items()}
  args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"], batch["decoder_target_tokens"])
  want = models.T5(base_cfg).apply({"params": base}, *args, enable_dropout=False)
  params = param_groups.combine(jax.tree.map(lambda x: x[0], trainable), frozen)
  got = models.T5(new_cfg).apply({"params": params}, *args, task_ids=np.zeros((B,), np.int32),
                                 enable_dropout=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  with pytest.raises(ValueError, match="needs a pre-trained adapter"):
    adaptation.prepare_pairs("mhr-z", cfg, base, keys)


class _MemoryResume:
  """adaptation.Resume in memory; `crash_at` (group, step) raises after that save, as a kill would;
  `stop_at` (a step id) is when a SIGTERM's stop is requested (then the save raises, as fewshot's does)."""

  def __init__(self, every, crash_at=None, stop_at=None):
    self.every, self.crash_at, self.saved, self.saves = every, crash_at, None, []
    self.stop_at, self.asked = stop_at, []

  def restore(self, target):
    if self.saved is None:
      return None
    group, step, state = self.saved
    return group, step, jax.tree.map(lambda x: x.copy() if isinstance(x, np.ndarray) else jax.numpy.array(x),
                                     state)

  def save(self, group, step, state):
    self.saved = (group, step, jax.tree.map(lambda x: np.array(x), state))
    self.saves.append((group, step))
    if (group, step) == self.crash_at:
      raise KeyboardInterrupt("simulated kill")
    if self.asked and self.asked[-1] == self.stop_at:
      raise SystemExit("stopped")

  def stop_requested(self, step_id):
    self.asked.append(step_id)
    return step_id == self.stop_at


@pytest.mark.parametrize("method,crash_at", [("mhr", (0, 2)), ("full", (1, 2))])
def test_resume_continues_exactly(method, crash_at):
  """A run killed after a save and resumed ends exactly where an uninterrupted run does (vmapped pairs,
  and pairs trained one after another), best-on-dev state included."""
  cfg = CFG if method == "mhr" else CFG.replace(adapter=AdapterConfig())
  params, keys = _params(cfg), jax.random.split(jax.random.key(4), 2)
  batches, dev = _pair_batches(2, 4, seed=13), _pair_batches(2, 1, seed=14)
  run = lambda resume: adaptation.adapt(method, cfg, params, OPT_CFG, losses.LossConfig(),  # noqa: E731
                                        lambda s: batches[s], keys, 4, dev_batches=dev, eval_every=2,
                                        resume=resume)
  whole = run(None)
  resume = _MemoryResume(every=2, crash_at=crash_at)
  with pytest.raises(KeyboardInterrupt):
    run(resume)
  resume.crash_at = None
  again = run(resume)
  assert resume.saves[0] == (0, 2) and resume.saves[-1] == ((1, 4) if method == "full" else (0, 4))
  np.testing.assert_array_equal(again.losses, whole.losses)
  np.testing.assert_array_equal(again.dev_scores, whole.dev_scores)
  np.testing.assert_array_equal(again.best_step, whole.best_step)
  for a, b in zip(jax.tree.leaves(again.trainable), jax.tree.leaves(whole.trainable)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_process_with_fewer_pairs_asks_at_every_step_of_the_others():
  """With several processes, JAX's preemption sync point wants the same step ids from each: a process that
  adapts one pair one after another where another process has three keeps asking through the steps of the
  two missing groups, and a stop requested there saves its (finished) state at that step."""
  cfg = CFG.replace(adapter=AdapterConfig())
  params, keys = _params(cfg), jax.random.split(jax.random.key(4), 1)
  batches = _pair_batches(1, 3, seed=13)
  resume = _MemoryResume(every=100)
  adaptation.adapt("full", cfg, params, OPT_CFG, losses.LossConfig(), lambda s: batches[s], keys, 3,
                   resume=resume, sync_groups=3)
  assert resume.asked == list(range(1, 10)) and resume.saves == [(0, 3)]
  stopped = _MemoryResume(every=100, stop_at=8)
  with pytest.raises(SystemExit):
    adaptation.adapt("full", cfg, params, OPT_CFG, losses.LossConfig(), lambda s: batches[s], keys, 3,
                     resume=stopped, sync_groups=3)
  assert stopped.asked == list(range(1, 9)) and stopped.saves == [(0, 3), (2, 2)]


def test_select_callback_keeps_each_pairs_best_step():
  """`select` scores (higher is better) decide which step's parameters each pair keeps."""
  params, keys = _params(), jax.random.split(jax.random.key(5), 2)
  batches = _pair_batches(2, 3, seed=15)
  scores = iter([np.array([1.0, 5.0]), np.array([3.0, 2.0]), np.array([2.0, 4.0])])
  calls = []

  def select(model, frozen, trainable, pairs):
    calls.append((model.config.adapter.n_tasks, pairs))
    return next(scores)

  result = adaptation.adapt("mhr", CFG, params, OPT_CFG, losses.LossConfig(), lambda s: batches[s], keys, 3,
                            select=select, eval_every=1)
  assert calls == [(1, slice(0, 2))] * 3
  np.testing.assert_array_equal(result.best_step, [2, 1])
  last = adaptation.adapt("mhr", CFG, params, OPT_CFG, losses.LossConfig(), lambda s: batches[s], keys, 1)
  np.testing.assert_array_equal(  # pair 1 kept step 1: the parameters after one update
      jax.tree.leaves(result.trainable)[0][1], jax.tree.leaves(last.trainable)[0][1])
