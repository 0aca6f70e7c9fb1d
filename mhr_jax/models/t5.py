"""T5 encoder-decoder (v1.1 / LM-adapted; original T5 as an option) in flax.linen.

T5X's call signature plus `task_ids`. Numerics follow Hugging Face's PyTorch T5 (the test oracle):
RMSNorm in fp32, no attention scaling (folded into the q init), relative position buckets computed
once per stack and shared by its layers, gated-GELU (tanh) or ReLU FFN, no biases.

Parameter tree (linear layers use Hugging Face's short names, so adapter regexes and PEFT
`target_modules` read the same):
  shared_embedding/embedding                      (vocab, d_model)
  encoder/relpos_bias/rel_embedding               (buckets, heads)
  encoder/block_{i}/self_attention/{q,k,v,o}/kernel
  encoder/block_{i}/mlp/{wi_0,wi_1,wo}/kernel     (wi, wo for the ReLU variant)
  encoder/block_{i}/{pre_self_attention_norm,pre_mlp_norm}/scale, encoder/final_norm/scale
  decoder/...  (+ cross_attention, pre_cross_attention_norm)
  logits_dense/kernel                             (d_model, vocab); untied embeddings only
  routing/logits                                  (shared routing only)

With `scan_layers=True` each stack's blocks are one `nn.scan`: `encoder/block_{i}/<rest>` becomes
`encoder/layers/<rest>` with a leading layer axis (logical name "layers") on every leaf, e.g.
`encoder/layers/mlp/wi_0/kernel` (L, d_model, d_ff); `models.layout` converts between the trees.
Adapter targets are still matched against the unscanned paths (`encoder/block_3/...`), so one
`target_modules` regex means the same layers in both layouts.

Decoding cache (collection "cache"): `decoder/cache_index` () int32, the decode step (one for the
stack); per self-attention layer `cached_key`, `cached_value` (B, Lmax, heads, d_kv), or
(B, L, Lmax, heads, d_kv) when scanned (the layer axis is second, so every cache leaf but the
index has the batch first: T5X's beam search expands all cache leaves except `cache_index` along
axis 0).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from mhr_jax.adapters.layers import AdapterContext, Routing, apply_adapter
from mhr_jax.models.config import T5Config

NEG_INF = -1e10  # additive mask value (T5X); finite so fully masked padding rows stay finite
LAYERS = "layers"  # module name of a scanned stack's blocks: encoder/layers/..., decoder/layers/...
KERNEL_OUT = "kernel_out"  # checkpoint name of x @ kernel in every linear layer


def _dtype(name: str):
  return jnp.dtype(name)


def _constrain(x, names):
  return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, statistics in fp32."""
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), _dtype(cfg.param_dtype))
    x32 = x.astype(jnp.float32)
    x32 = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.layer_norm_epsilon)
    return (x32 * scale.astype(jnp.float32)).astype(_dtype(cfg.dtype))


class Linear(nn.Module):
  """A bias-free linear layer y = x W, with the configured adapter when its path matches."""
  features: int
  kernel_axes: tuple[str, str]
  init_std: float
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, ctx: AdapterContext) -> jax.Array:
    cfg = self.config
    dtype = _dtype(cfg.dtype)
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.kernel_axes),
        (x.shape[-1], self.features), _dtype(cfg.param_dtype))
    x = x.astype(dtype)
    # Named so that remat_policy="save_dots" keeps exactly these products (see _remat_policy).
    y = checkpoint_name(jnp.einsum("...i,io->...o", x, kernel.astype(dtype)), KERNEL_OUT)
    path = "/".join(self.path)
    if adapter_targets(cfg, self.path):
      y = apply_adapter(self, path, x, y, self.features, cfg.adapter, ctx, dtype,
                        _dtype(cfg.param_dtype))
    return y


def adapter_targets(cfg: T5Config, path: tuple[str, ...]) -> bool:
  """Whether the linear layer at module `path` carries an adapter (`cfg.adapter.targets`).

  In a scanned stack (path `<stack>/layers/...`) the regex is matched against every layer's
  unscanned path (`<stack>/block_{i}/...`); one scanned module serves all layers, so they must
  agree, and a ValueError names the keys otherwise.
  """
  acfg = cfg.adapter
  if acfg.kind == "none":
    return False
  if not (cfg.scan_layers and len(path) > 2 and path[1] == LAYERS):
    return acfg.targets("/".join(path))
  n_layers = cfg.num_layers if path[0] == "encoder" else cfg.num_decoder_layers
  rest = "/".join(path[2:])
  chosen = {acfg.targets(f"{path[0]}/block_{i}/{rest}") for i in range(n_layers)}
  if len(chosen) > 1:
    raise ValueError(f"adapter.target_modules={acfg.target_modules!r} adapts {path[0]}/*/{rest} in "
                     "some layers only; with scan_layers=True every layer of a stack is adapted "
                     "alike (set scan_layers=False)")
  return chosen.pop()


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """T5's log-spaced buckets of (key position - query position)."""
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(relative_position)
  else:
    n = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # Guard log(0): those positions take the is_small branch anyway.
  large = max_exact + (
      jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
      / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, n, large)


class RelativePositionBias(nn.Module):
  """Learned per-head bias for each relative-position bucket; one per stack, shared by its layers."""
  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, q_len: int, k_len: int) -> jax.Array:
    """Returns a (1, heads, q_len, k_len) float32 bias."""
    cfg = self.config
    table = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), ("relpos_buckets", "heads")),
        (cfg.relative_attention_num_buckets, cfg.num_heads), _dtype(cfg.param_dtype))
    rel = jnp.arange(k_len)[None, :] - jnp.arange(q_len)[:, None]
    buckets = relative_position_bucket(rel, self.bidirectional, cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
    bias = jnp.asarray(table, jnp.float32)[buckets]       # (q, k, heads)
    return jnp.transpose(bias, (2, 0, 1))[None]


class Attention(nn.Module):
  """Multi-head dot-product attention with T5's unscaled logits and an optional KV cache."""
  config: T5Config

  @nn.compact
  def __call__(self, x_q: jax.Array, x_kv: jax.Array, bias: jax.Array, ctx: AdapterContext,
               enable_dropout: bool, decode: bool = False, decode_index=None) -> jax.Array:
    """x_q: (B, Lq, d); x_kv: (B, Lk, d); bias: additive, broadcastable to (B, H, Lq, Lk).

    decode=True (self-attention only) keeps keys and values in the "cache" collection. With
    `decode_index` None the call builds the cache: a full causal forward over (B, Lmax) that
    leaves zeros in it. With a () int32 `decode_index` i it is one step: the new token's key and
    value go to cache row i, and `bias` is the full (1, H, Lmax, Lmax) relative position bias,
    whose row i is used with the keys after i masked.
    """
    cfg = self.config
    dtype = _dtype(cfg.dtype)
    inner, h, d = cfg.inner_dim, cfg.num_heads, cfg.d_kv
    qkv = dict(features=inner, kernel_axes=("embed", "joined_kv"), config=cfg)
    q = Linear(init_std=(cfg.d_model * d) ** -0.5, name="q", **qkv)(x_q, ctx)
    k = Linear(init_std=cfg.d_model ** -0.5, name="k", **qkv)(x_kv, ctx)
    v = Linear(init_std=cfg.d_model ** -0.5, name="v", **qkv)(x_kv, ctx)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, d)
    q, k, v = split(q), split(k), split(v)
    q = _constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))

    if decode:
      cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
      cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
      if decode_index is not None:
        if q.shape[1] != 1:
          raise ValueError(f"decode step expects one new token, got length {q.shape[1]}")
        i = decode_index
        k = lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), (0, i, 0, 0))
        v = lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), (0, i, 0, 0))
        cached_k.value, cached_v.value = k, v
        max_len = k.shape[1]
        row = lax.dynamic_slice_in_dim(bias, i, 1, axis=2)                  # (1, H, 1, Lmax)
        bias = row + jnp.where(jnp.arange(max_len) <= i, 0.0, NEG_INF)[None, None, None, :]

    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    probs = nn.Dropout(cfg.dropout_rate)(probs, deterministic=not enable_dropout)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x_q.shape[0], x_q.shape[1], inner)
    return Linear(cfg.d_model, ("joined_kv", "embed"), inner ** -0.5, cfg, name="o")(out, ctx)


class MLP(nn.Module):
  """T5 feed-forward: gated-GELU (wi_0, wi_1, wo) or ReLU (wi, wo)."""
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, ctx: AdapterContext, enable_dropout: bool) -> jax.Array:
    cfg = self.config
    wi = dict(features=cfg.d_ff, kernel_axes=("embed", "mlp"), init_std=cfg.d_model ** -0.5, config=cfg)
    if cfg.gated:
      hidden = (jax.nn.gelu(Linear(name="wi_0", **wi)(x, ctx), approximate=True)
                * Linear(name="wi_1", **wi)(x, ctx))
    else:
      hidden = jax.nn.relu(Linear(name="wi", **wi)(x, ctx))
    hidden = _constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
    hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=not enable_dropout)
    return Linear(cfg.d_model, ("mlp", "embed"), cfg.d_ff ** -0.5, cfg, name="wo")(hidden, ctx)


class Block(nn.Module):
  """One pre-norm transformer block; `cross` adds encoder-decoder attention (decoder blocks).

  Python-valued settings are attributes and every call argument is an array or None, so the block
  can go through `nn.remat` and `nn.scan` unchanged. `scan_output` makes it return (x, None), the
  (carry, output) pair nn.scan expects.
  """
  config: T5Config
  cross: bool
  enable_dropout: bool = False
  decode: bool = False
  scan_output: bool = False

  @nn.compact
  def __call__(self, x, self_bias, task_ids=None, shared_weights=None, anneal=None, encoded=None,
               cross_bias=None, decode_index=None):
    """x: (B, L, d_model); biases as Attention; task_ids (B,), shared_weights (B, S, K) and
    anneal () as AdapterContext; decode_index: () int32 decode step, or None."""
    cfg = self.config
    train = self.enable_dropout
    ctx = AdapterContext(task_ids, train, shared_weights, anneal)
    drop = lambda t: nn.Dropout(cfg.dropout_rate)(t, deterministic=not train)
    y = RMSNorm(cfg, name="pre_self_attention_norm")(x)
    x = x + drop(Attention(cfg, name="self_attention")(y, y, self_bias, ctx, train, self.decode,
                                                        decode_index))
    if self.cross:
      y = RMSNorm(cfg, name="pre_cross_attention_norm")(x)
      x = x + drop(Attention(cfg, name="cross_attention")(y, encoded, cross_bias, ctx, train))
    y = RMSNorm(cfg, name="pre_mlp_norm")(x)
    x = x + drop(MLP(cfg, name="mlp")(y, ctx, train))
    x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    return (x, None) if self.scan_output else x


def _remat_policy(name: str):
  """jax.checkpoint policy of T5Config.remat_policy ("full": save nothing but the block input).

  "save_dots" keeps the products x @ kernel of the linear layers, the FLOP-heavy part of a block.
  Everything else is recomputed: attention scores and softmax (at length 512 and 32 heads their
  probabilities would take more memory than all the kept products), norms, GELU, and the adapter
  deltas (rank r, cheap; JAX's generic dots_with_no_batch_dims_saveable would also keep each
  LoRA's (B, L, d_out) delta, which nearly doubles the memory of a LoRA step at T5-XL width).
  """
  if name == "save_dots":
    return jax.checkpoint_policies.save_only_these_names(KERNEL_OUT)
  return None


def block_class(cfg: T5Config, decode: bool):
  """Block, wrapped in nn.remat as cfg.remat_policy asks (not when decoding: nothing is
  differentiated there). Remat keeps module names, so the parameter tree does not change."""
  if cfg.remat_policy == "none" or decode:
    return Block
  # Inside a scan the loop boundary already stops XLA from merging the recomputation with the
  # forward pass, so CSE prevention (extra barriers) is needed only for unrolled layers.
  return nn.remat(Block, policy=_remat_policy(cfg.remat_policy), prevent_cse=not cfg.scan_layers)


class Stack(nn.Module):
  """The encoder (cross=False) or decoder (cross=True) stack."""
  config: T5Config
  cross: bool

  @nn.compact
  def __call__(self, x, self_mask_bias, ctx, enable_dropout, encoded=None, cross_bias=None,
               decode=False, max_decode_length=None):
    cfg = self.config
    relpos = RelativePositionBias(cfg, bidirectional=not self.cross, name="relpos_bias")
    decode_index = None
    if decode:
      # The first decode call builds the cache; once the cache exists, a call is a single step.
      # Deciding by the cache's existence (not a stored flag) keeps every cache leaf except the
      # index batch-major, which T5X's beam search requires.
      stepping = self.has_variable("cache", "cache_index")
      index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if stepping:
        decode_index = index.value
        index.value = decode_index + 1
    if decode_index is not None:
      if max_decode_length is None:
        raise ValueError("decode steps need max_decode_length (the KV cache length)")
      self_bias = relpos(max_decode_length, max_decode_length)   # rows picked per cache index
    else:
      self_bias = relpos(x.shape[1], x.shape[1]) + self_mask_bias
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not enable_dropout)
    n_layers = cfg.num_decoder_layers if self.cross else cfg.num_layers
    settings = dict(config=cfg, cross=self.cross, enable_dropout=enable_dropout, decode=decode)
    args = (self_bias, ctx.task_ids, ctx.shared_weights, ctx.anneal, encoded, cross_bias,
            decode_index)
    block = block_class(cfg, decode)
    if cfg.scan_layers:
      # Parameters stack on axis 0 (logical name "layers"); cache leaves on axis 1, after the
      # batch (see the module docstring). Each layer draws its own dropout / routing noise.
      scanned = nn.scan(block, variable_axes={"params": 0, "cache": 1},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,) * len(args), length=n_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(**settings, scan_output=True, name=LAYERS)(x, *args)
    else:
      for i in range(n_layers):
        x = block(**settings, name=f"block_{i}")(x, *args)
    x = RMSNorm(cfg, name="final_norm")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=not enable_dropout)


def _mask_bias(mask: jax.Array) -> jax.Array:
  """bool (B, Lq, Lk) -> additive float32 (B, 1, Lq, Lk)."""
  return jnp.where(mask[:, None], 0.0, NEG_INF).astype(jnp.float32)


def _pair_mask(q_valid, k_valid, q_segments=None, k_segments=None):
  mask = q_valid[:, :, None] & k_valid[:, None, :]
  if q_segments is not None:
    mask &= q_segments[:, :, None] == k_segments[:, None, :]
  return mask


class T5(nn.Module):
  """T5 encoder-decoder with optional adapters (config.adapter).

  `__call__(encoder_input_tokens (B, Li), decoder_input_tokens (B, Lt), decoder_target_tokens (B, Lt),
  ..., task_ids (B,), enable_dropout)` returns float32 logits (B, Lt, vocab). `enable_dropout=True`
  is training mode: dropout, and Gumbel-sigmoid routing noise when the adapter config asks for it
  (both draw from the "dropout" RNG stream). Padding is token id 0. Packed examples are described by
  segment ids (0 = padding); positions are accepted for T5X compatibility and are not needed, since
  relative position offsets inside a segment equal those of the unpacked example.
  """
  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared_embedding = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype),
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        name="shared_embedding")
    self.encoder = Stack(cfg, cross=False, name="encoder")
    self.decoder = Stack(cfg, cross=True, name="decoder")
    if not cfg.tie_word_embeddings:
      self.logits_dense = nn.DenseGeneral(
          cfg.vocab_size, use_bias=False, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype),
          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.d_model ** -0.5),
                                                   ("embed", "vocab")),
          name="logits_dense")
    if cfg.adapter.routed and cfg.adapter.routing == "shared":
      self.routing = Routing(cfg.adapter, name="routing")

  def adapter_context(self, task_ids, enable_dropout: bool, routing_anneal=None) -> AdapterContext:
    acfg = self.config.adapter
    if task_ids is not None:
      task_ids = jnp.asarray(task_ids, jnp.int32)
    shared = None
    if acfg.routed and acfg.routing == "shared":
      if task_ids is None:
        raise ValueError(f"adapter kind {acfg.kind!r} needs task_ids")
      shared = self.routing(task_ids, enable_dropout, routing_anneal)
    return AdapterContext(task_ids, enable_dropout, shared, routing_anneal)

  def _encode(self, tokens, segment_ids, ctx, enable_dropout):
    tokens = tokens.astype(jnp.int32)
    x = self.shared_embedding(tokens)
    x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    valid = tokens > 0
    mask = _mask_bias(_pair_mask(valid, valid, segment_ids, segment_ids))
    return self.encoder(x, mask, ctx, enable_dropout)

  def _decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
              encoder_segment_ids, decoder_segment_ids, ctx, enable_dropout, decode,
              max_decode_length):
    cfg = self.config
    tokens = decoder_input_tokens.astype(jnp.int32)
    enc_valid = encoder_input_tokens > 0
    if decode:
      # The cache-building call is a causal forward over (B, Lmax); single steps ignore this bias.
      self_bias = _mask_bias(jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))[None])
      cross_valid, cross_seg = jnp.ones(tokens.shape, bool), None
    else:
      length = tokens.shape[1]
      dec_valid = (decoder_target_tokens > 0 if decoder_target_tokens is not None
                   else jnp.ones(tokens.shape, bool))
      causal = jnp.tril(jnp.ones((length, length), bool))[None]
      self_bias = _mask_bias(_pair_mask(dec_valid, dec_valid, decoder_segment_ids,
                                        decoder_segment_ids) & causal)
      cross_valid, cross_seg = dec_valid, decoder_segment_ids
    cross_bias = _mask_bias(_pair_mask(cross_valid, enc_valid, cross_seg, encoder_segment_ids
                                       if cross_seg is not None else None))
    x = self.shared_embedding(tokens)
    x = self.decoder(x, self_bias, ctx, enable_dropout, encoded, cross_bias, decode,
                     max_decode_length)
    if cfg.tie_word_embeddings:
      logits = self.shared_embedding.attend(x * cfg.d_model ** -0.5)
    else:
      logits = self.logits_dense(x)
    return _constrain(logits.astype(jnp.float32), ("activation_batch", "activation_length", "activation_vocab"))

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, task_ids=None, *,
             enable_dropout: bool = True, routing_anneal=None):
    """(B, Li) tokens -> (B, Li, d_model) encoder outputs."""
    ctx = self.adapter_context(task_ids, enable_dropout, routing_anneal)
    return self._encode(encoder_input_tokens, encoder_segment_ids, ctx, enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
             encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None,
             task_ids=None, *, enable_dropout: bool = True, decode: bool = False,
             max_decode_length: int | None = None, routing_anneal=None):
    """Decoder logits (B, Lt, vocab). With decode=True: one step against the KV cache."""
    del decoder_positions
    ctx = self.adapter_context(task_ids, enable_dropout, routing_anneal)
    return self._decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                        encoder_segment_ids, decoder_segment_ids, ctx, enable_dropout, decode,
                        max_decode_length)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, task_ids=None, *, enable_dropout: bool = True,
               decode: bool = False, max_decode_length: int | None = None, routing_anneal=None):
    del encoder_positions, decoder_positions
    ctx = self.adapter_context(task_ids, enable_dropout, routing_anneal)
    encoded = self._encode(encoder_input_tokens, encoder_segment_ids, ctx, enable_dropout)
    return self._decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                        encoder_segment_ids, decoder_segment_ids, ctx, enable_dropout, decode,
                        max_decode_length)
