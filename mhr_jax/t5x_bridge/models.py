"""`MhrEncoderDecoderModel`: T5X's encoder-decoder model class for the project's routed T5.

The stock `t5x.models.EncoderDecoderModel` calls the module without `task_ids`, so a routed model
fails at init ("needs task_ids"). This subclass passes the batch's `task_ids` (B,) everywhere the
module runs:
  get_initial_variables   init, and the parameters handed to T5X unboxed with a `params_axes`
                          collection (T5X's optimizers and partitioner read logical axis names
                          there; the module's own `nn.LogicallyPartitioned` boxes are removed)
  loss_fn, eval_fn,       the forward pass (`_compute_logits`); frozen parameters pass through
  score_batch             `stop_gradient` in the loss, so T5X does not differentiate the base
  predict_batch           encode, the cache-building call and every decoder step (beam-expanded)

The loss is T5X's token cross-entropy by default. With `loss_config` it is instead the project's
objective `train_step.OBJECTIVES[loss_config.kind]`, the very function the project's trainer
differentiates: "tfew" trains few-shot T0 on answer-choice batches (decoder features (B, C, Lt),
`labels` (B,); `t5x_bridge.tasks.choice_train_dataset` makes them) with T-Few's LM + length-normalised
choice cross-entropy + unlikelihood loss.

Which parameters are frozen comes from the optimizer (`t5x_bridge.optim.MhrOptimizer`), so the model
and the updates cannot disagree.

Task ids are validated where data enters (the feature converter this class binds, with n_tasks from
the module) and eagerly here whenever they are concrete arrays.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.linen import partitioning as flax_partitioning
from t5x import decoding as t5x_decoding
from t5x import metrics as t5x_metrics
from t5x import models as t5x_models

from mhr_jax.training import losses, train_step
from mhr_jax import models
from mhr_jax.adapters import AdapterConfig
from mhr_jax.adapters.layers import check_task_ids
from mhr_jax.checkpoints import hf_t5
from mhr_jax.t5x_bridge import features

PyTree = Any


def t5_module(preset: str = "tiny", adapter: AdapterConfig | None = None,
              hf_config: str | None = None, **overrides) -> models.T5:
  """The project's `models.T5` for gin: a size preset (or a Hugging Face config.json) plus adapter.

  Args:
    preset: `models.preset` name (tiny, small, base, large, xl, xxl); ignored with hf_config.
    adapter: the AdapterConfig (kind, n_tasks, n_skills, n_splits, rank, ...).
    hf_config: a Hugging Face T5 directory (or its config.json): the architecture of a real checkpoint,
      whose weights come in through `t5x_bridge.checkpoints.initial_checkpoint`.
    overrides: other T5Config fields (dtype, dropout_rate, scan_layers, ...).
  """
  adapter = AdapterConfig() if adapter is None else adapter
  if hf_config is not None:
    path = os.path.join(hf_config, hf_t5.CONFIG_FILE) if os.path.isdir(hf_config) else hf_config
    cfg = hf_t5.config_from_hf(hf_t5.read_json(path), path).replace(adapter=adapter, **overrides)
  else:
    cfg = models.preset(preset, adapter=adapter, **overrides)
  return models.T5(cfg)


def params_and_axes(boxed_params) -> tuple[dict, dict]:
  """Splits `nn.LogicallyPartitioned` params into (unboxed params, T5X `params_axes`).

  `params_axes` mirrors the params tree with each leaf `name` replaced by `name_axes` holding
  `flax.linen.partitioning.AxisMetadata(names)`, the layout T5X's train state expects.
  """
  flat = traverse_util.flatten_dict(flax.core.unfreeze(boxed_params))
  params, axes = {}, {}
  for path, leaf in flat.items():
    if not isinstance(leaf, nn.LogicallyPartitioned):
      raise ValueError(f"parameter {'/'.join(path)} has no logical axis names")
    params[path] = leaf.value
    axes[path[:-1] + (path[-1] + "_axes",)] = flax_partitioning.AxisMetadata(names=tuple(leaf.names))
  return traverse_util.unflatten_dict(params), traverse_util.unflatten_dict(axes)


def _zeros_like_cache(build):
  """Zeroed cache leaves shaped as the cache-building call makes them (traced, no compute)."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(build))


class MhrEncoderDecoderModel(t5x_models.EncoderDecoderModel):
  """`t5x.models.EncoderDecoderModel` for `models.T5` with task-routed adapters.

  Args: as `t5x.models.EncoderDecoderModel`; `module` must be a `mhr_jax.models.T5`.
  `feature_converter_cls` defaults to `features.TaskIdsFeatureConverter` bound to the module's
  n_tasks. Batches carry `task_ids` (B,) int32 next to T5X's usual features.
  loss_config: None for T5X's loss (label_smoothing, z_loss, loss_normalizing_factor), or a
    `losses.LossConfig` for the project's objective of that kind (which normalises itself:
    label_smoothing and z_loss must then be 0, loss_normalizing_factor is not used).
  """

  def __init__(self, module: models.T5, input_vocabulary, output_vocabulary, optimizer_def,
               decode_fn=t5x_decoding.beam_search, feature_converter_cls=None,
               label_smoothing: float = 0.0, z_loss: float = 0.0, loss_normalizing_factor=None,
               default_decoder_params=None, loss_config: losses.LossConfig | None = None):
    if not isinstance(module, models.T5):
      raise TypeError(f"MhrEncoderDecoderModel: module must be a mhr_jax.models.T5, got "
                      f"{type(module).__name__}")
    acfg = module.config.adapter
    if acfg.anneal_steps:
      raise ValueError(f"AdapterConfig.anneal_steps={acfg.anneal_steps}: routing annealing needs the "
                       "train step inside the loss, which T5X does not pass; use the project's trainer")
    if input_vocabulary.vocab_size > module.config.vocab_size:
      raise ValueError(f"the vocabulary has {input_vocabulary.vocab_size} ids but the model's "
                       f"vocab_size is {module.config.vocab_size}")
    if loss_config is not None and (label_smoothing or z_loss):
      raise ValueError(f"MhrEncoderDecoderModel: label_smoothing={label_smoothing} and z_loss={z_loss} "
                       "belong to T5X's loss; with loss_config use LossConfig.label_smoothing")
    self.loss_config = loss_config
    if feature_converter_cls is None:
      feature_converter_cls = functools.partial(
          features.TaskIdsFeatureConverter,
          n_tasks=acfg.n_tasks if acfg.uses_task_ids else None)
    super().__init__(module=module, input_vocabulary=input_vocabulary,
                     output_vocabulary=output_vocabulary, optimizer_def=optimizer_def,
                     decode_fn=decode_fn, feature_converter_cls=feature_converter_cls,
                     label_smoothing=label_smoothing, z_loss=z_loss,
                     loss_normalizing_factor=loss_normalizing_factor,
                     default_decoder_params=default_decoder_params)

  @property
  def config(self) -> models.T5Config:
    return self.module.config

  # ------------------------------------------------------------------------------- inputs

  def _task_ids(self, batch: Mapping[str, Any]):
    """The batch's (B,) int32 task ids for the module, or None for adapters without tasks."""
    acfg = self.config.adapter
    if not acfg.uses_task_ids:
      return None
    if "task_ids" not in batch:
      raise ValueError(f"adapter kind {acfg.kind!r} routes by task but the batch has no 'task_ids' "
                       f"(features {sorted(batch)}); use t5x_bridge.features.TaskIdsFeatureConverter")
    task_ids = batch["task_ids"]
    check_task_ids(task_ids, acfg.n_tasks)   # eager only; traced ids were checked by the converter
    return jnp.asarray(task_ids, jnp.int32)

  def get_initial_variables(self, rng: jax.Array, input_shapes: Mapping[str, Any],
                            input_types: Mapping[str, Any] | None = None):
    """{'params': unboxed params, 'params_axes': their logical axis names} (FrozenDicts).

    input_shapes: encoder_input_tokens (B, Li); decoder_input_tokens (B, Lt), or (B, C, Lt) for
    answer-choice batches.
    """
    del input_types  # parameter shapes do not depend on the inputs' dtypes
    enc_shape = input_shapes["encoder_input_tokens"]
    dec_shape = (enc_shape[0], input_shapes["decoder_input_tokens"][-1])
    task_ids = None
    if self.config.adapter.uses_task_ids:
      task_ids = jnp.zeros(enc_shape[:1], jnp.int32)
    ones = lambda shape: jnp.ones(shape, jnp.int32)  # noqa: E731
    variables = self.module.init(
        {"params": rng, "dropout": rng}, ones(enc_shape), ones(dec_shape), ones(dec_shape),
        task_ids=task_ids, decode=False, enable_dropout=False)
    params, axes = params_and_axes(variables["params"])
    return flax.core.freeze({"params": params, "params_axes": axes})

  # ------------------------------------------------------------------------ forward, loss

  def _compute_logits(self, params: PyTree, batch: Mapping[str, jnp.ndarray],
                      dropout_rng: jax.Array | None = None, mutable=False,
                      other_variables: PyTree | None = None):
    """(B, Lt, vocab) float32 logits (and the mutated collections when `mutable`)."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {"params": params, **(other_variables or {})},
        batch["encoder_input_tokens"], batch["decoder_input_tokens"], batch["decoder_target_tokens"],
        encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        encoder_positions=batch.get("encoder_positions"),
        decoder_positions=batch.get("decoder_positions"),
        task_ids=self._task_ids(batch), decode=False, enable_dropout=rngs is not None, rngs=rngs,
        mutable=mutable)

  def _stop_frozen_gradients(self, params: PyTree) -> PyTree:
    """Frozen leaves (by the optimizer's labels) behind stop_gradient: no backward work for them."""
    labels_of = getattr(self.optimizer_def, "labels", None)
    if labels_of is None:
      return params
    labels = labels_of(params)
    return jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label == "frozen" else p,
                        params, labels)

  def loss_fn(self, params: PyTree, batch: Mapping[str, jnp.ndarray],
              dropout_rng: jax.Array | None):
    """(scalar loss, T5X metrics); dropout (and Gumbel routing noise) when dropout_rng is given."""
    params = self._stop_frozen_gradients(params)
    if self.loss_config is None:
      return super().loss_fn(params, batch, dropout_rng)
    return self._objective_loss(params, batch, dropout_rng)

  def _objective_loss(self, params, batch, dropout_rng):
    """The project's objective: sum over its terms of (term sum / term count) over the batch."""
    objective = train_step.OBJECTIVES[self.loss_config.kind]
    batch = {**batch, "task_ids": self._task_ids(batch)}  # None: the module takes no task ids
    train = dropout_rng is not None
    sums = objective.sums(self.module, params, batch,
                          dropout_rng if train else jax.random.key(0), train, self.loss_config)
    counts = objective.counts(batch, self.loss_config)
    loss = losses.combine_terms(sums, counts)
    metrics = {"loss": t5x_metrics.AveragePerStep(total=loss)}
    if len(sums) > 1:
      metrics.update({f"loss/{name}": t5x_metrics.AveragePerStep(
          total=sums[name] / jnp.maximum(counts[name], 1e-9)) for name in sums})
    return loss, metrics

  # -------------------------------------------------------------------------- decoding

  def _compute_kv_cache(self, params, encoded_inputs, encoder_input_tokens, decoder_input_tokens,
                        prefill_decoder_prompt: bool = False, task_ids=None):
    """A zeroed KV cache for (B, Lmax) decoding; the module's first decode call defines it."""
    if prefill_decoder_prompt:
      raise NotImplementedError("models.T5 has no prefill mode; prompts are decoded token by token "
                                "(predict_batch_with_aux(prompt_with_targets=True))")

    def build():
      _, variables = self.module.apply(
          {"params": params}, encoded_inputs, encoder_input_tokens,
          jnp.zeros(decoder_input_tokens.shape, jnp.int32), task_ids=task_ids,
          enable_dropout=False, decode=True, max_decode_length=decoder_input_tokens.shape[1],
          mutable=["cache"], method=self.module.decode)
      return variables["cache"]

    return _zeros_like_cache(build), None

  def _compute_logits_from_slice(self, decoding_state, params, encoded_inputs, raw_inputs,
                                 max_decode_length: int, task_ids=None):
    """One cached decoder step for (B * beams, 1) tokens -> ((B * beams, vocab) logits, cache)."""
    flat_ids = decoding_state.cur_token
    logits, variables = self.module.apply(
        {"params": params, "cache": decoding_state.cache}, encoded_inputs, raw_inputs, flat_ids,
        flat_ids, task_ids=task_ids, enable_dropout=False, decode=True,
        max_decode_length=max_decode_length, mutable=["cache"], method=self.module.decode)
    return jnp.squeeze(logits, axis=1), variables["cache"]

  def predict_batch_with_aux(self, params: PyTree, batch: Mapping[str, jnp.ndarray],
                             rng: jax.Array | None = None, decoder_params=None,
                             return_all_decodes: bool | None = None, num_decodes: int | None = None,
                             prompt_with_targets: bool = False):
    """T5X's predict_batch_with_aux with task ids; see `t5x.models.EncoderDecoderModel`.

    With `prompt_with_targets` the batch's decoder_input_tokens (B, Lmax) (BOS 0, the prompt, EOS
    dropped) are a forced prefix: the decoders feed them one step at a time and keep them in the
    output, as T5X does for any module without a prefill mode (models.T5 has none: the same tokens,
    one cached decoder step per prompt token instead of one pass over the prompt).

    Returns:
      (decodes (B, Lmax), {"scores": (B,)}), or with return_all_decodes (B, num_decodes, Lmax) and
      (B, num_decodes), beams sorted by increasing log-probability.
    """
    if return_all_decodes is None:
      return_all_decodes = self._default_decoder_params.return_all_decodes
    if num_decodes is None:
      num_decodes = self._default_decoder_params.num_decodes
    encoder_input_tokens = batch["encoder_input_tokens"]
    decoder_input_tokens = batch["decoder_input_tokens"]
    task_ids = self._task_ids(batch)
    encoded = self.module.apply({"params": params}, encoder_input_tokens, task_ids=task_ids,
                                enable_dropout=False, method=self.module.encode)
    # Every example's beams sit next to each other: [e0, e0, e1, e1, ...], task ids included.
    def expand(x):
      return None if x is None else t5x_decoding.flat_batch_beam_expand(x, num_decodes)
    max_len = decoder_input_tokens.shape[1]
    # The cache is built at the batch size (the decoders expand it themselves).
    cache, _ = self._compute_kv_cache(params, encoded, encoder_input_tokens, decoder_input_tokens,
                                      task_ids=task_ids)
    tokens_to_logits = functools.partial(
        self._compute_logits_from_slice, params=params, encoded_inputs=expand(encoded),
        raw_inputs=expand(encoder_input_tokens), max_decode_length=max_len,
        task_ids=expand(task_ids))
    decoder_params = dict(decoder_params or {})
    if rng is not None:
      if decoder_params.get("decode_rng") is not None:
        raise ValueError("got an RNG both as `rng` and as decoder_params['decode_rng']")
      decoder_params["decode_rng"] = rng
    decoder_params.setdefault("eos_id", self.output_vocabulary.eos_id or 1)
    prompt = jnp.zeros_like(decoder_input_tokens)
    if prompt_with_targets:
      prompt = decoder_input_tokens * (decoder_input_tokens != self.output_vocabulary.eos_id)
    decodes, scores = self._decode_fn(
        inputs=prompt, cache=cache, tokens_to_logits=tokens_to_logits,
        num_decodes=num_decodes, cache_offset=0, **decoder_params)
    if return_all_decodes:
      return decodes, {"scores": scores}
    return decodes[:, -1, :], {"scores": scores[:, -1]}
