"""`python -m mhr_jax.analysis`: see mhr_jax/analysis/run.py."""
import sys

from mhr_jax.analysis.run import main

sys.exit(main())
