"""User-facing errors.

Everything a user can get wrong (missing or malformed data, an unknown config key, an invalid
value, a corrupt checkpoint, an out-of-vocabulary prompt) raises `UserError`. `main.py` prints
its message as one line and exits with status 2; tracebacks are reserved for our own bugs.
"""


class UserError(Exception):
  """Bad input. The message names the problem and how to fix it."""

  def __init__(self, problem: str, fix: str | None = None):
    self.problem = problem
    self.fix = fix
    super().__init__(f"{problem} Fix: {fix}" if fix else problem)


class DataError(UserError):
  """Missing, truncated or malformed data files."""


class ConfigError(UserError):
  """An unknown config key or an invalid config value."""


class CheckpointError(UserError):
  """A checkpoint that cannot be restored."""


class VocabularyError(UserError):
  """Text containing words the tokenizer does not know (e.g. a sampling prompt)."""


class NonFiniteLossError(UserError):
  """Training produced a NaN or infinite loss."""


class ConfigMismatchError(ConfigError):
  """A config that contradicts the one a workdir was trained with (see config_compat)."""


class WorkdirError(UserError):
  """A --workdir that cannot be used: a file, missing, read-only, or its parent is read-only."""


class WorkdirBusyError(WorkdirError):
  """Another process holds the workdir's lock (two runs would interleave their outputs)."""


class StorageError(UserError):
  """Writing to disk failed (permission denied, read-only file system, ...)."""


class DiskFullError(StorageError):
  """No space left on the device, or the disk quota is exhausted."""
