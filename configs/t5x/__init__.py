"""Makes configs/t5x a Python package, as T5X ships t5x/configs/runs: gin then finds these files and
their `include 'configs/t5x/...'` lines as package resources from any working directory."""
