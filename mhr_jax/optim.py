"""`mhr_jax.optim` is `mhr_jax.training.optim` (the import path outside code relies on)."""
import sys

from mhr_jax.training import optim as _module

sys.modules[__name__] = _module
