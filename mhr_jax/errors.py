"""Errors a run ends with, each mapped to an exit status by mhr_jax.cli (the bottom of the house: imports
nothing of the project)."""


class ConfigError(ValueError):
  """A bad configuration value, file or flag; the message is one line naming it (exit status 2)."""


class RunError(Exception):
  """A run that cannot go on for a reason the user can fix; the message is one line (exit status 2)."""


class NonFiniteLoss(Exception):
  """The loss or a gradient became NaN / inf; the message names the step and the groups (exit status 3)."""
