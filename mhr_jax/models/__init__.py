"""T5 encoder-decoder models (flax.linen) with optional routed adapters."""
from mhr_jax.models import layout
from mhr_jax.models.config import REMAT_POLICIES, T5Config, preset
from mhr_jax.models.t5 import T5

__all__ = ["REMAT_POLICIES", "T5", "T5Config", "layout", "preset"]
