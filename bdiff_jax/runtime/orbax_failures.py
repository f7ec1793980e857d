"""Keeping orbax's failures to one line: what `checkpointing` holds around its saves and restores.

`TOLERANT_LOOPS`: orbax runs each restore in a fresh asyncio event loop and closes it as soon as
one read fails; tensorstore reads still in flight would then print an "Event loop is closed"
traceback each. While a `Checkpointer` lives, every loop created is a `ClosedTolerantLoop`,
which drops those late callbacks.

`held_absl_logs()`: a save that fails for lack of disk space makes orbax log the same error, with
a traceback, from each of its threads; the records are held back within the block and emitted
when it ends, unless the failure became a one-line error (`HoldRecords.drop`).
"""

import asyncio
import contextlib
import logging
import threading
from typing import Iterator, Optional


class ClosedTolerantLoop(asyncio.SelectorEventLoop):
  """An event loop that drops callbacks scheduled after it was closed.

  Orbax runs each restore in a fresh event loop and closes it as soon as one read fails; the
  tensorstore reads still in flight then call `call_soon_threadsafe` on the closed loop from
  their own threads, which prints a "RuntimeError: Event loop is closed" traceback per read.
  Nobody awaits those results any more, so dropping them is safe. For the same reason it drops
  asyncio's "Task exception was never retrieved" report (a traceback on stderr, whenever the
  garbage collector reaches one of the failed reads' tasks) once the loop is closed: the
  restore's failure itself was raised, and reported in one line.
  """

  def call_exception_handler(self, context):
    if self.is_closed() and "exception was never retrieved" in str(context.get("message", "")):
      return
    super().call_exception_handler(context)

  def call_soon_threadsafe(self, callback, *args, context=None):
    if self.is_closed():
      return None
    try:
      return super().call_soon_threadsafe(callback, *args, context=context)
    except RuntimeError:
      if self.is_closed():
        return None
      raise


class ClosedTolerantPolicy(asyncio.DefaultEventLoopPolicy):
  _loop_factory = ClosedTolerantLoop


class TolerantLoops:
  """Makes every asyncio loop created while held a `ClosedTolerantLoop`, for the process.

  The event-loop policy is process-wide, and orbax creates loops in its own threads at any time
  while a checkpointer lives: in its background commit threads (which can outlive a failed
  `save` call and start new loops after it returned) and in its restores. So each `Checkpointer`
  holds the tolerant policy from before its managers exist until it is closed; holds are counted,
  and the previous policy comes back when the last one is released. Only the standard policy is
  swapped (a custom one such as uvloop's is left alone). A checkpointer whose save or restore
  failed never releases its hold: orbax's threads may still be winding down until the process
  ends, and a loop they create then must tolerate being closed too.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._holds = 0
    self._previous: Optional[asyncio.AbstractEventLoopPolicy] = None

  def acquire(self) -> bool:
    """Takes a hold; returns whether it must be released (False: a custom policy is in use)."""
    with self._lock:
      if self._holds == 0:
        previous = asyncio.get_event_loop_policy()
        if type(previous) is not asyncio.DefaultEventLoopPolicy:  # pylint: disable=unidiomatic-typecheck
          return False
        self._previous = previous
        asyncio.set_event_loop_policy(ClosedTolerantPolicy())
      self._holds += 1
      return True

  def release(self) -> None:
    with self._lock:
      self._holds -= 1
      if self._holds == 0:
        # Only if nobody replaced the tolerant policy since (we would undo their change).
        if isinstance(asyncio.get_event_loop_policy(), ClosedTolerantPolicy):
          asyncio.set_event_loop_policy(self._previous)
        self._previous = None


TOLERANT_LOOPS = TolerantLoops()


class HoldRecords(logging.Filter):
  """Keeps the records logged through a logger instead of emitting them."""

  def __init__(self):
    super().__init__()
    self.records: list[logging.LogRecord] = []

  def filter(self, record: logging.LogRecord) -> bool:
    self.records.append(record)
    return False

  def drop(self) -> None:
    """Forgets what was held (a failure reported as one line instead)."""
    self.records.clear()


@contextlib.contextmanager
def held_absl_logs() -> Iterator[HoldRecords]:
  """Holds back what orbax logs (through absl's "absl" logger) within the block, and emits what
  is still held once the block ends, after the hold is lifted.

  A save that fails for lack of disk space makes orbax log the same error, with a traceback, from
  each of its threads (hundreds of lines); the caller reports it as one line instead and calls
  `held.drop()`. Emitting only after the filter is removed matters: a record handled while this
  filter is attached is appended to the list being emitted, forever (a multi-process save whose
  parameters span processes, where orbax logs during every save, hung so).
  """
  logger = logging.getLogger("absl")
  held = HoldRecords()
  logger.addFilter(held)
  try:
    yield held
  finally:
    logger.removeFilter(held)
    records, held.records = held.records, []
    for record in records:
      logger.handle(record)
