"""T5 encoder-decoder models (flax.linen) with optional routed adapters."""
from mhr_jax.models.config import T5Config, preset
from mhr_jax.models.t5 import T5

__all__ = ["T5", "T5Config", "preset"]
