"""`python -m mhr_jax.experiment`: see mhr_jax/experiment/runner.py."""
import sys

from mhr_jax.experiment.runner import main

sys.exit(main())
