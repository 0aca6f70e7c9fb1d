"""The experiment and the study: the plan of stages (plan.py) and its runner (runner.py, `python -m
mhr_jax.experiment`), the tables (report.py), and the study over seeds and settings (study.py with
statistics.py and study_plots.py). report, study's report, statistics and study_plots import no JAX."""
