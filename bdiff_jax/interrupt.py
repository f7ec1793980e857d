"""Graceful stop on Ctrl-C (SIGINT) and SIGTERM: finish the step, checkpoint, exit.

    with interrupt.GracefulInterrupt() as stop:
      while step < num_steps:
        ... one training step ...
        if stop.stop_requested():
          save a checkpoint at `step`
          print(stop.message(step)); sys.exit(stop.exit_code)

First signal: the handler only sets a flag and prints one line on stderr; the loop notices it
after the step in flight, saves a checkpoint and exits with `exit_code`.
Second signal (either kind) before the loop has stopped: one line on stderr, then the process
exits at once with `os._exit(exit_code)` (no cleanup, no traceback). Whatever was being written
is lost; orbax only ever publishes a checkpoint by renaming a complete directory, so the earlier
checkpoints are intact. (If the abort lands in the sub-second window between a step directory's
commit and its digest manifest, that step is refused at restore as unverifiable; see
checkpointing.)
In a process that main.py's supervisor runs (one process of a multi-process run), the same
signal again within DUPLICATE_SECONDS of the first is ignored: it is the first request delivered
twice (the supervisor forwards what a scheduler also sent to its child), not a second Ctrl-C.
A signal that was ignored when the context was entered (SIG_IGN, as for SIGINT of a job a script
started in the background) stays ignored.

Exit codes follow the shell's 128 + signal number convention, so batch schedulers and shells read
them as "terminated by that signal": EXIT_SIGINT = 130, EXIT_SIGTERM = 143.

Python runs signal handlers in the main thread between bytecodes: while the main thread is inside
one long native call (e.g. an XLA compilation), both the flag and the abort take effect when that
call returns. Outside the main thread the context installs nothing and never requests a stop.
On exit the previous handlers are restored.
"""

import os
import signal
import threading
import time
from typing import Callable, Optional, TextIO

EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143

# In a supervised child (BDIFF_SUPERVISED=1, set by bdiff_jax/supervisor.py), a repeat of the
# first signal this soon is the same request delivered twice (a scheduler that signals every
# process of a job reaches the child directly and through the supervisor), not a second Ctrl-C.
DUPLICATE_SECONDS = 1.0


def _duplicate_window() -> float:
  return DUPLICATE_SECONDS if os.environ.get("BDIFF_SUPERVISED") == "1" else 0.0

_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class GracefulInterrupt:
  """Context manager turning SIGINT/SIGTERM into a stop request (see the module docstring)."""

  def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), *,
               stream: Optional[TextIO] = None,
               abort: Callable[[int], None] = os._exit,  # pylint: disable=protected-access
               duplicate_seconds: Optional[float] = None):
    """Args:
      signals: the signals to catch.
      stream: where the one-line notices go (default: file descriptor 2, stderr).
      abort: called with the exit code on the second signal (tests pass a recorder).
      duplicate_seconds: a repeat of the first signal within this time is ignored (default:
        DUPLICATE_SECONDS in a supervised child, else 0).
    """
    self._signals = tuple(signals)
    self._stream = stream
    self._abort = abort
    self._previous: dict[int, object] = {}
    self._signum: Optional[int] = None
    self._first_at = 0.0
    self._duplicate_seconds = (_duplicate_window() if duplicate_seconds is None
                               else duplicate_seconds)
    self.installed = False

  def __enter__(self) -> "GracefulInterrupt":
    self._signum = None
    if threading.current_thread() is not threading.main_thread():
      return self
    for sig in self._signals:
      if signal.getsignal(sig) is signal.SIG_IGN:
        continue  # e.g. SIGINT of a job started in the background by a script: keep ignoring it
      self._previous[sig] = signal.signal(sig, self._handle)
    self.installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self.installed:
      for sig, handler in self._previous.items():
        # None: the previous handler was not installed from Python; the default is the best match.
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)
      self._previous.clear()
      self.installed = False

  def _write(self, line: str) -> None:
    try:
      if self._stream is None:
        # os.write, not sys.stderr.write: the handler may interrupt a write to sys.stderr, and
        # a buffered stream raises on such a reentrant call.
        os.write(2, (line + "\n").encode())
      else:
        self._stream.write(line + "\n")
        self._stream.flush()
    except (OSError, ValueError, RuntimeError):
      pass  # a closed or broken stderr must not turn a stop into a crash

  def _handle(self, signum: int, frame) -> None:  # pylint: disable=unused-argument
    now = time.monotonic()
    if self._signum is None:
      self._signum, self._first_at = signum, now
      self._write(self.first_notice(signum))
      return
    if signum == self._signum and now - self._first_at < self._duplicate_seconds:
      return  # the same request delivered twice (see the module docstring)
    self._write(self.again_notice(signum))
    self._abort(128 + signum)

  def first_notice(self, signum: int) -> str:
    return (f"received {_NAMES.get(signum, f'signal {signum}')}: stopping after the current "
            "step and saving a checkpoint (send it again to abort at once without saving)")

  def again_notice(self, signum: int) -> str:
    return (f"received {_NAMES.get(signum, f'signal {signum}')} again: aborting now without "
            f"saving (exit {128 + signum}); earlier checkpoints are intact")

  def stop_requested(self) -> bool:
    """True once a signal arrived; check it after every training step."""
    return self._signum is not None

  @property
  def signal_number(self) -> Optional[int]:
    return self._signum

  @property
  def exit_code(self) -> int:
    """128 + the first signal's number (130 for SIGINT, 143 for SIGTERM); 0 when none came."""
    return 0 if self._signum is None else 128 + self._signum

  def message(self, step: int, *, saved: bool = True) -> str:
    """The one line to print after stopping at `step`."""
    name = _NAMES.get(self._signum, "a signal") if self._signum is not None else "a signal"
    if saved:
      return (f"interrupted by {name} at step {step}; checkpoint saved; rerun the same command "
              "to resume")
    return f"interrupted by {name} at step {step}; no checkpoint was saved"
