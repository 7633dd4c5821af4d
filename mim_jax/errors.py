"""Errors that report a user mistake (bad config, path, checkpoint) in one line.

CLIs catch `UserError` and print its message without a stack trace; anything
else is a bug and keeps its trace.
"""


class UserError(ValueError):
  """A mistake in what the user asked for; the message says what and how to fix it."""


class ConfigError(UserError):
  """An invalid configuration value."""


class CheckpointMismatchError(UserError):
  """A checkpoint in the workdir does not fit the configured model."""


class TrainingDivergedError(UserError):
  """The loss became NaN or Inf."""
