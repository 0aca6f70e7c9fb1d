"""T5 configuration and the T5 v1.1 / LM-adapted size presets."""
from __future__ import annotations

import dataclasses

from mhr_jax.adapters.config import AdapterConfig

_FFN = ("gated-gelu", "relu")
_DTYPES = ("float32", "bfloat16", "float16")
# Rematerialisation of each block in the backward pass (see T5Config.remat_policy).
REMAT_POLICIES = ("none", "full", "save_dots")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyperparameters of a T5 encoder-decoder (field names follow Hugging Face's T5Config).

  `feed_forward_proj="gated-gelu"` with untied embeddings is T5 v1.1 / LM-adapted; `"relu"` with
  `tie_word_embeddings=True` is the original T5. `dtype` is the compute dtype, `param_dtype` the
  storage dtype (keep fp32 params with bf16 compute on accelerators).

  Layout and memory (they change no numbers; logits equal across settings):
    scan_layers: run each stack's blocks as one `nn.scan` over a stacked parameter tree
      (`encoder/layers/...` with a leading layer axis) instead of `encoder/block_{i}/...`, so the
      compiled program holds one block instead of 24 or 48 (T5X/flaxformer `scan_layers`,
      MaxText). `models.layout` converts between the two trees; checkpoints (HF, PEFT) are
      written in the unscanned layout whatever the setting.
    remat_policy: what the backward pass keeps of each block's forward: "none" (everything),
      "full" (only the block input; the block is recomputed), "save_dots" (the products
      x @ kernel of the linear layers; attention scores and softmax, norms, GELU and the adapter
      deltas are recomputed).
  """
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_layers: int = 8
  num_decoder_layers: int | None = None
  num_heads: int = 6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  tie_word_embeddings: bool = False
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"
  adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)

  def __post_init__(self):
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    if isinstance(self.adapter, dict):
      object.__setattr__(self, "adapter", AdapterConfig(**self.adapter))
    checks = [
        (self.feed_forward_proj in _FFN,
         f"feed_forward_proj={self.feed_forward_proj!r}: supported are {_FFN}"),
        (self.dtype in _DTYPES, f"dtype={self.dtype!r}: expected one of {_DTYPES}"),
        (self.param_dtype in _DTYPES, f"param_dtype={self.param_dtype!r}: expected one of {_DTYPES}"),
        (isinstance(self.scan_layers, bool),
         f"scan_layers={self.scan_layers!r}: expected True or False"),
        (self.remat_policy in REMAT_POLICIES,
         f"remat_policy={self.remat_policy!r}: expected one of {REMAT_POLICIES}"),
    ]
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                 "num_heads", "relative_attention_num_buckets"):
      checks.append((getattr(self, name) >= 1, f"{name}={getattr(self, name)}: must be >= 1"))
    for ok, message in checks:
      if not ok:
        raise ValueError(message)
    self._check_adapter_widths()

  def _check_adapter_widths(self) -> None:
    """MHR splits every adapted layer's input and output widths into n_splits heads (docs/METHODS.md): refuse
    a config where they do not divide, before any model is built."""
    splits = self.adapter.n_splits
    if splits == 1 or self.adapter.kind == "none":
      return
    for path, (d_in, d_out) in self.linear_layers().items():
      if self.adapter.targets(path) and (d_in % splits or d_out % splits):
        raise ValueError(f"adapter.n_splits={splits} must divide the widths of every adapted layer; "
                         f"{path} has d_in={d_in}, d_out={d_out}")

  def linear_layers(self) -> dict[str, tuple[int, int]]:
    """{module path: (d_in, d_out)} of every linear layer an adapter may target, in the unscanned naming
    ("encoder/block_0/self_attention/q"), as AdapterConfig.target_modules matches them."""
    inner, d, ff = self.inner_dim, self.d_model, self.d_ff
    attention = {"q": (d, inner), "k": (d, inner), "v": (d, inner), "o": (inner, d)}
    mlp = {"wi_0": (d, ff), "wi_1": (d, ff), "wo": (ff, d)} if self.gated else {"wi": (d, ff), "wo": (ff, d)}
    layers = {}
    for stack, n_layers in (("encoder", self.num_layers), ("decoder", self.num_decoder_layers)):
      blocks = ("self_attention",) + (("cross_attention",) if stack == "decoder" else ())
      for i in range(n_layers):
        for block in blocks:
          layers.update({f"{stack}/block_{i}/{block}/{name}": dims for name, dims in attention.items()})
        layers.update({f"{stack}/block_{i}/mlp/{name}": dims for name, dims in mlp.items()})
    return layers

  @property
  def gated(self) -> bool:
    return self.feed_forward_proj == "gated-gelu"

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  def replace(self, **changes) -> "T5Config":
    return dataclasses.replace(self, **changes)


# T5 v1.1 / LM-adapted dimensions (vocab 32128, gated-GELU, untied embeddings). Our choice: the
# 24+24-layer sizes scan their blocks (compile time: one block instead of 48); xl and xxl also keep
# only the weight-matmul outputs for the backward pass, which fits batch 32 at 512/128 on one GPU.
_SCANNED = dict(scan_layers=True)
_PRESETS = {
    "tiny": dict(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=20,
                 dropout_rate=0.0),
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
    "large": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16, **_SCANNED),
    "xl": dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, **_SCANNED,
               remat_policy="save_dots"),
    "xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, **_SCANNED,
                remat_policy="save_dots"),
}


def preset(name: str, **overrides) -> T5Config:
  """A T5Config for size `name` (tiny, small, base, large, xl, xxl), with field overrides."""
  if name not in _PRESETS:
    raise ValueError(f"model preset {name!r}: expected one of {sorted(_PRESETS)}")
  return T5Config(**{**_PRESETS[name], **overrides})
