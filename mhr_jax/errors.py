"""Errors a run ends with, each mapped to an exit status by mhr_jax.cli (config errors: config.ConfigError)."""


class RunError(Exception):
  """A run that cannot go on for a reason the user can fix; the message is one line."""


class NonFiniteLoss(Exception):
  """The loss or a gradient became NaN / inf; the message names the step and the groups."""
