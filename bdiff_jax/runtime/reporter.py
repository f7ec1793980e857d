"""User-facing output of library code, in one place.

Library modules never `print`; they report through a `Reporter`. The command line uses the
default one (lines to stdout, a tqdm progress bar); the comparison harness or a notebook can pass
`Reporter(verbose=False)` to run a training without console side effects.
"""

import sys
from typing import Optional, TextIO

import tqdm


class _NoBar:
  """A progress bar that shows nothing (same methods as tqdm's)."""

  def update(self, n: int = 1) -> None:
    del n

  def set_postfix(self, **kwargs) -> None:
    del kwargs

  total = None

  def refresh(self) -> None:
    pass

  def close(self) -> None:
    pass


class Reporter:
  """Lines and progress bars for the user."""

  def __init__(self, *, verbose: bool = True, stream: Optional[TextIO] = None):
    self.verbose = verbose
    self._stream = stream
    self._bar = None

  @property
  def stream(self) -> TextIO:
    return self._stream if self._stream is not None else sys.stdout

  def info(self, message: str) -> None:
    """One or more lines for the user (written above an active progress bar)."""
    if not self.verbose:
      return
    if self._bar is not None and not isinstance(self._bar, _NoBar):
      self._bar.write(message, file=self.stream)
    else:
      print(message, file=self.stream, flush=True)

  def progress(self, *, total: int, initial: int = 0, desc: str = "", unit: str = "step",
               enabled: bool = True):
    """A progress bar (tqdm) or, when disabled or not verbose, a silent stand-in."""
    if self.verbose and enabled:
      self._bar = tqdm.tqdm(total=total, initial=initial, unit=unit, desc=desc,
                            dynamic_ncols=True, file=self.stream)
    else:
      self._bar = _NoBar()
    return self._bar

  def end_progress(self) -> None:
    if self._bar is not None:
      self._bar.close()
    self._bar = None


QUIET = Reporter(verbose=False)
