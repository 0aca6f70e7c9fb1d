"""`mhr_jax.losses` is `mhr_jax.training.losses` (the import path outside code relies on)."""
import sys

from mhr_jax.training import losses as _module

sys.modules[__name__] = _module
