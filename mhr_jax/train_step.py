"""`mhr_jax.train_step` is `mhr_jax.training.train_step` (the import path outside code relies on)."""
import sys

from mhr_jax.training import train_step as _module

sys.modules[__name__] = _module
