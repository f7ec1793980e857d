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
from typing import Callable, Optional, TextIO

EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143

_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class GracefulInterrupt:
  """Context manager turning SIGINT/SIGTERM into a stop request (see the module docstring)."""

  def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), *,
               stream: Optional[TextIO] = None,
               abort: Callable[[int], None] = os._exit):  # pylint: disable=protected-access
    """Args:
      signals: the signals to catch.
      stream: where the one-line notices go (default: file descriptor 2, stderr).
      abort: called with the exit code on the second signal (tests pass a recorder).
    """
    self._signals = tuple(signals)
    self._stream = stream
    self._abort = abort
    self._previous: dict[int, object] = {}
    self._signum: Optional[int] = None
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
    name = _NAMES.get(signum, f"signal {signum}")
    if self._signum is None:
      self._signum = signum
      self._write(f"received {name}: stopping after the current step and saving a checkpoint "
                  "(send it again to abort at once without saving)")
      return
    code = 128 + signum
    self._write(f"received {name} again: aborting now without saving (exit {code}); earlier "
                "checkpoints are intact")
    self._abort(code)

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
