"""Scanned layers and rematerialisation: the same numbers as the unscanned model (logits, gradients,
a train step, greedy and beam decoding), against Hugging Face, through HF / PEFT checkpoints and the
adapter transforms; the layout conversions; a KV cache T5X's beam search can expand."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

import hf_oracle
from mhr_jax.models import param_counts
from mhr_jax.evaluation import decoding
from mhr_jax.training import losses, optim
from mhr_jax import partitioning
from mhr_jax.training import train_step as ts
from mhr_jax.adapters import AdapterConfig, transforms
from mhr_jax.adapters import params as param_groups
from mhr_jax.checkpoints import hf_t5, peft as peft_io
from mhr_jax.models import T5, layout, preset

# The unscanned model is the oracle: the same contractions, fused differently by XLA.
ATOL = RTOL = 1e-5
GRAD_RTOL = 1e-4      # gradients sum over more terms; relative to each leaf's largest entry
HF_ATOL = HF_RTOL = 1e-4  # against PyTorch, as tests/test_model.py
TRANSFORM_TOL = 1e-6  # parameter values computed by the same numpy / jnp ops

MHR = AdapterConfig(kind="mhr", n_tasks=3, n_skills=2, n_splits=2, rank=2, gumbel=False)
CFG = preset("tiny", adapter=MHR)
SCANNED = CFG.replace(scan_layers=True)


def _batch(vocab=CFG.vocab_size, b=4, li=7, lt=5, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, (b, li)).astype(np.int32)
  enc[0, 5:] = 0
  tgt = rng.integers(2, vocab, (b, lt)).astype(np.int32)
  tgt[1, 3:] = 0
  dec = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], 1)
  return enc, dec, tgt, (np.arange(b) % 3).astype(np.int32)


def _adapted_params(cfg, seed=0):
  """Unscanned params with a non-zero inventory and far-from-uniform routing."""
  params = hf_oracle.random_t5_params(cfg.replace(scan_layers=False), seed)
  flat = traverse_util.flatten_dict(params)
  rng = np.random.default_rng(seed + 1)
  for path, leaf in flat.items():
    if path[-1] in ("lora_b", "logits"):
      flat[path] = rng.normal(0.0, 1.0, leaf.shape).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def _logits(cfg, params, batch):
  enc, dec, tgt, tids = batch
  return np.asarray(jax.jit(lambda p: T5(cfg).apply(
      {"params": p}, enc, dec, tgt, task_ids=tids, enable_dropout=False))(params))


def _logits_and_grads(cfg, params, batch):
  """Logits, and gradients of a sum of log-probabilities (every parameter gets one)."""
  enc, dec, tgt, tids = batch

  def loss(p):
    out = T5(cfg).apply({"params": p}, enc, dec, tgt, task_ids=tids, enable_dropout=False)
    return jnp.sum(jax.nn.log_softmax(out)[..., 3]), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return np.asarray(out), layout.to_unscanned(cfg, grads)


@pytest.fixture(scope="module")
def mhr():
  """Unscanned and scanned params of a routed model, and the unscanned logits and gradients."""
  params = _adapted_params(CFG)
  return params, layout.to_scanned(SCANNED, params), _logits_and_grads(CFG, params, _batch())


# ------------------------------------------------------------------------------------ the model

@pytest.mark.parametrize("scan,remat", [(True, "save_dots"), (False, "full")])
def test_logits_and_gradients_equal_unscanned(mhr, scan, remat):
  params, scanned, (want, want_grads) = mhr
  cfg = CFG.replace(scan_layers=scan, remat_policy=remat)
  out, grads = _logits_and_grads(cfg, scanned if scan else params, _batch())
  np.testing.assert_allclose(out, want, atol=ATOL, rtol=RTOL)
  for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                          jax.tree.leaves(want_grads)):
    scale = float(np.abs(r).max())
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(g, r, atol=GRAD_RTOL * scale, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def test_scanned_params_carry_a_layers_axis_and_match_the_layout_conversion():
  enc, dec, tgt, tids = _batch()
  boxed = jax.eval_shape(lambda: T5(SCANNED).init(jax.random.key(0), enc, dec, tgt, task_ids=tids,
                                                  enable_dropout=False))["params"]
  q = boxed["decoder"]["layers"]["self_attention"]["q"]
  assert q["kernel"].names == ("layers", "embed", "joined_kv")
  assert q["routing"]["logits"].names[0] == "layers"
  abstract = nn.unbox(boxed)
  assert q["kernel"].value.shape == (CFG.num_decoder_layers, CFG.d_model, CFG.inner_dim)
  converted = layout.to_scanned(SCANNED, param_counts.abstract_params(CFG))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == \
      jax.tree.map(lambda x: (x.shape, x.dtype), converted)


def test_layout_conversions_round_trip_and_check_their_input(mhr):
  params, scanned, _ = mhr
  assert layout.is_scanned(scanned) and layout.is_scanned(params) is False
  assert layout.to_scanned(SCANNED, scanned) == scanned              # identity when already there
  back = layout.to_unscanned(CFG, scanned)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
  with pytest.raises(ValueError, match="blocks"):
    layout.to_scanned(CFG.replace(num_layers=3), params)
  uneven = traverse_util.flatten_dict(params)
  del uneven[("encoder", "block_1", "mlp", "wo", "lora_a")]
  with pytest.raises(ValueError, match="every layer alike"):
    layout.to_scanned(None, traverse_util.unflatten_dict(uneven))


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="^remat_policy='dots': expected one of"):
    preset("tiny", remat_policy="dots")
  with pytest.raises(ValueError, match="^scan_layers='yes'"):
    preset("tiny", scan_layers="yes")
  partial = CFG.replace(scan_layers=True, adapter=MHR.replace(target_modules=r"encoder/block_0/.*"))
  enc, dec, tgt, tids = _batch()
  with pytest.raises(ValueError, match=r"adapter.target_modules=.*scan_layers=True"):
    jax.eval_shape(lambda: T5(partial).init(jax.random.key(0), enc, dec, tgt, task_ids=tids,
                                            enable_dropout=False))
  assert preset("xl").scan_layers and preset("xl").remat_policy == "save_dots"
  assert not preset("base").scan_layers and preset("base").remat_policy == "none"


def test_train_step_equals_unscanned(mhr):
  """One sharded step (8 devices, data x fsdp x model) of the scanned model equals the unscanned
  one."""
  params, scanned, _ = mhr
  enc, dec, tgt, tids = _batch(b=8)
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": tgt,
           "task_ids": tids}
  # fsdp and model axes shard the stacked kernels behind their leading layer axis.
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, model=2))
  results = []
  for cfg, p in ((CFG, params), (SCANNED, scanned)):
    labels = param_groups.param_labels(p, "mhr")
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adamw", schedule="constant",
                                                    warmup_steps=0), labels, 10)
    state = ts.init_train_state(T5(cfg), p, labels, tx, mesh)
    step = ts.make_train_step(T5(cfg), tx, losses.LossConfig(), mesh, ts.shardings_of(state))
    state, metrics = step(state, batch, jax.random.key(0))
    results.append((float(metrics["loss"]), layout.to_unscanned(cfg, jax.device_get(state.params))))
  (loss_a, new_a), (loss_b, new_b) = results
  np.testing.assert_allclose(loss_b, loss_a, rtol=RTOL)
  for a, b in zip(jax.tree.leaves(new_a), jax.tree.leaves(new_b)):
    np.testing.assert_allclose(b, a, atol=ATOL, rtol=RTOL)


ADAFACTOR_STEPS = 3
# Adafactor turns every gradient element into a step of about the learning rate whatever its size, so
# the float32 noise of near-zero gradient elements (the two layouts' fusions differ by up to ~1e-2
# elementwise there, 1e-6 of a leaf's largest gradient) becomes noise in those steps. Each leaf's
# change over the steps is compared in norm: equal layouts stay within 3.2e-3 here, an optimizer that
# mixes the layers of a stack is off by more than the change itself.
ADAFACTOR_CHANGE_RTOL = 1e-2


def _unequal_layers(params):
  """`params` with the second layer's inventories rescaled, A by 3 and B by 1/3: the same function,
  but per-layer and per-stack RMS differ (parameter scaling must not mix layers)."""
  scale = {"lora_a": np.float32(3.0), "lora_b": np.float32(1 / 3)}
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: v * scale[p[-1]] if p[1] == "block_1" and p[-1] in scale else v
                                       for p, v in flat.items()})


@pytest.mark.parametrize("factoring, scale_parameter, mesh_shape", [
    ("last_two", True, (2, 2, 2)), ("largest", False, (1, 1, 1))])
def test_adafactor_training_equals_unscanned(factoring, scale_parameter, mesh_shape):
  """Several Adafactor steps of the real train step, every weight trained (base, inventory, routing),
  change the params alike in both layouts: moments, update clipping and parameter scaling treat each
  layer of a scanned stack as its own parameter (with sharded optimizer state on 8 devices). "largest"
  factors dims of size >= 2 here, so a stack's layer axis would be a candidate if the optimizer saw
  the stacked leaf as one parameter."""
  params = _unequal_layers(_adapted_params(CFG))
  enc, dec, tgt, tids = _batch(b=8)
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": tgt,
           "task_ids": tids}
  opt_cfg = optim.OptimizerConfig(
      name="adafactor", adafactor_factoring=factoring, adafactor_min_dim_to_factor=2,
      adafactor_scale_parameter=scale_parameter, adapter_lr=1e-2, routing_lr=0.1, base_lr=1e-3,
      schedule="constant", warmup_steps=0, clip_norm=None)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(*mesh_shape),
                                devices=jax.devices()[:int(np.prod(mesh_shape))])
  changes = []
  start = traverse_util.flatten_dict(params)
  for cfg in (CFG, SCANNED):
    p = layout.to_layout(cfg, params)
    labels = param_groups.param_labels(p, "full")
    tx = optim.make_optimizer(opt_cfg, labels, 10)
    state = ts.init_train_state(T5(cfg), p, labels, tx, mesh)
    step = ts.make_train_step(T5(cfg), tx, losses.LossConfig(), mesh, ts.shardings_of(state))
    for i in range(ADAFACTOR_STEPS):
      state, _ = step(state, batch, jax.random.key(i))
    final = traverse_util.flatten_dict(layout.to_unscanned(cfg, jax.device_get(state.params)))
    changes.append({path: final[path] - start[path] for path in final})
  unscanned, scanned = changes
  for path, want in unscanned.items():
    size = np.linalg.norm(want)
    assert size > 0, path  # every weight trained
    assert np.linalg.norm(scanned[path] - want) <= ADAFACTOR_CHANGE_RTOL * size, "/".join(path)


# ------------------------------------------------------------------------------------- decoding

def test_greedy_and_beam_equal_unscanned(mhr):
  params, scanned, _ = mhr
  enc, _, _, tids = _batch()
  for fn in (lambda m, p: decoding.greedy_decode(m, p, enc, 6, task_ids=tids, eos_id=-1),
             lambda m, p: decoding.beam_search(m, p, enc, 6, 3, task_ids=tids)[0]):
    np.testing.assert_array_equal(fn(T5(SCANNED), scanned), fn(T5(CFG), params))


def test_cache_is_batch_major_so_t5x_beam_expansion_works(mhr):
  """T5X's beam search repeats every cache leaf except `cache_index` along axis 0; decode steps
  on such an expanded cache must equal the unexpanded steps, repeated (no scalar flags left)."""
  _, scanned, _ = mhr
  model, n = T5(SCANNED), 2
  enc, _, _, tids = _batch(b=2)
  apply = jax.jit(lambda cache, enc, tok, tids: model.apply(
      {"params": scanned, "cache": cache}, model.apply({"params": scanned}, enc, task_ids=tids,
                                                       enable_dropout=False, method=model.encode),
      enc, tok, task_ids=tids, enable_dropout=False, decode=True, max_decode_length=4,
      mutable=["cache"], method=model.decode))
  encoded = model.apply({"params": scanned}, enc, task_ids=tids, enable_dropout=False,
                        method=model.encode)
  cache = decoding._init_cache(model, scanned, encoded, enc, tids, 4)
  flat = traverse_util.flatten_dict(cache)
  assert {p[-1] for p, x in flat.items() if x.ndim == 0} == {"cache_index"}
  assert all(x.shape[0] == 2 for p, x in flat.items() if p[-1] != "cache_index")
  expand = lambda x: jnp.repeat(x, n, axis=0)
  big = traverse_util.unflatten_dict({p: x if p[-1] == "cache_index" else expand(x)
                                      for p, x in flat.items()})
  tokens = np.array([[0], [5]], np.int32)
  for _ in range(2):
    small_out, small_vars = apply(cache, enc, tokens, tids)
    big_out, big_vars = apply(big, expand(enc), expand(tokens), expand(tids))
    np.testing.assert_allclose(big_out, expand(small_out), atol=ATOL, rtol=RTOL)
    cache, big = small_vars["cache"], big_vars["cache"]
    tokens = np.asarray(jnp.argmax(small_out, -1), np.int32)


# ------------------------------------------------------------------ checkpoints and transforms

def test_hf_checkpoint_loads_into_both_layouts(tmp_path):
  hf_dir = hf_oracle.make_hf_t5(tmp_path, "v1_1")
  cfg, params = hf_t5.load_hf_t5(hf_dir, scan_layers=True, remat_policy="full")
  assert cfg.scan_layers and layout.is_scanned(params)
  enc, dec, tgt, _ = _batch(cfg.vocab_size)
  ours = np.asarray(T5(cfg).apply({"params": params}, enc, dec, tgt, enable_dropout=False))
  valid = tgt > 0
  np.testing.assert_allclose(ours[valid], hf_oracle.hf_logits(hf_dir, enc, dec)[valid],
                             atol=HF_ATOL, rtol=HF_RTOL)
  # Saving from the scanned layout writes the same tensors as from the unscanned one.
  hf_t5.save_hf_t5(tmp_path / "saved", cfg, params)
  _, unscanned = hf_t5.load_hf_t5(hf_dir)
  hf_t5.save_hf_t5(tmp_path / "saved_u", cfg.replace(scan_layers=False), unscanned)
  a, b = load_file(tmp_path / "saved" / "model.safetensors"), load_file(
      tmp_path / "saved_u" / "model.safetensors")
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  # An unscanned base restores into a scanned adapted model.
  adapted = cfg.replace(adapter=MHR)
  merged, report = hf_t5.merge_base_params(param_counts.abstract_params(adapted), unscanned)
  assert not report.unexpected and all("lora" in k or "routing" in k for k in report.missing)
  np.testing.assert_array_equal(merged["encoder"]["layers"]["mlp"]["wo"]["kernel"],
                                params["encoder"]["layers"]["mlp"]["wo"]["kernel"])
  with pytest.raises(ValueError, match="unknown T5Config field"):
    hf_t5.load_hf_t5(hf_dir, scan_layer=True)


def test_peft_export_and_import_in_the_scanned_layout(mhr, tmp_path):
  params, scanned, _ = mhr
  hf_dir = tmp_path / "base"
  base = {p: v for p, v in traverse_util.flatten_dict(params).items()
          if p[-1] not in ("lora_a", "lora_b", "logits")}
  hf_t5.save_hf_t5(hf_dir, CFG.replace(adapter=AdapterConfig()), traverse_util.unflatten_dict(base))
  peft_io.export_peft(tmp_path / "u", CFG, params)
  peft_io.export_peft(tmp_path / "s", SCANNED, scanned)
  a, b = (load_file(tmp_path / d / peft_io.WEIGHTS_FILE) for d in ("u", "s"))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  cfg, imported = peft_io.import_peft(tmp_path / "s", hf_dir, scan_layers=True)
  assert cfg.scan_layers and layout.is_scanned(imported)
  _, ref = peft_io.import_peft(tmp_path / "s", hf_dir)
  for x, y in zip(jax.tree.leaves(layout.to_unscanned(cfg, imported)), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["mhr", "private_lora", "ia3", "mhr_shared"])
def test_transforms_keep_the_layout_and_equal_unscanned(kind):
  acfg = {"mhr": MHR, "mhr_shared": MHR.replace(routing="shared"),
          "private_lora": AdapterConfig(kind="private_lora", n_tasks=3, rank=2),
          "ia3": AdapterConfig(kind="ia3")}[kind]
  cfg = CFG.replace(adapter=acfg)
  params = _adapted_params(cfg)
  scanned = layout.to_scanned(SCANNED, params)
  key = jax.random.key(3)
  cases = [lambda c, p: transforms.merge_into_base(c, p, None if kind == "ia3" else 1)]
  if kind != "ia3":
    cases += [lambda c, p: transforms.add_task_rows(c, p, 2, key),
              lambda c, p: transforms.select_task_rows(c, p, [2, 0]),
              lambda c, p: transforms.extract_task_lora(c, p, 2)]
  if kind.startswith("mhr"):
    cases.append(transforms.to_mu)
  for fn in cases:
    new_cfg, out = fn(cfg, params)
    _, out_scanned = fn(cfg.replace(scan_layers=True), scanned)
    assert layout.is_scanned(out_scanned)
    want = layout.to_scanned(new_cfg.replace(scan_layers=True), out)
    assert jax.tree.structure(out_scanned) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(out_scanned), jax.tree.leaves(want)):
      np.testing.assert_allclose(x, y, atol=TRANSFORM_TOL, rtol=TRANSFORM_TOL)
