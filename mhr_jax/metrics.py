"""`mhr_jax.metrics` is `mhr_jax.evaluation.metrics` (the import path outside code relies on)."""
import sys

from mhr_jax.evaluation import metrics as _module

sys.modules[__name__] = _module
