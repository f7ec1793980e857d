"""Multi-process runs on JAX's distributed runtime (`jax.distributed.initialize`).

One process per host (or per GPU); all run the same command. The runtime must start before
anything touches a JAX backend, and the config file's automatic preset already does (it asks the
backend for its memory), so the settings come from the environment, read by `main.py` before it
parses the command line:

  JAX_COORDINATOR_ADDRESS=host:port  process 0's address (all processes give the same one),
  JAX_NUM_PROCESSES=N                with the number of processes
  JAX_PROCESS_ID=i                   and this process's index, 0 <= i < N;
  BDIFF_PEER_TIMEOUT=seconds         how long a silent peer is waited for (default 30; see below).
  BDIFF_SUPERVISOR=off               no supervisor process (see below; a lost coordinator is then
                                     jaxlib's abort).
  BDIFF_DISTRIBUTED=auto|on|off      auto (default): start the runtime when the address is set or
                                     a cluster is detected: a SLURM job step with several tasks,
                                     or a multi-host Cloud TPU slice (JAX then finds the
                                     coordinator, count and index itself); on: always, leaving
                                     detection to JAX; off: never.

Roles: every process computes (the mesh spans all devices, the step is one SPMD program, orbax
saves and restores checkpoints collectively); only process 0 (`is_main_process()`) writes
metrics, config.json, plots and samples, prints, and holds the workdir lock.

A lost peer (`PeerWatchdog`). When a process dies, JAX's coordination service notices only after
its heartbeat timeout (100 s) and then aborts every survivor from C++ (SIGABRT, exit 134, a page
of logs, no error line); a survivor blocked in a collective may also wait that long. JAX 0.10.2
offers no usable hook: `jax.distributed.initialize` does not take a callback, and the client's
`missed_heartbeat_callback` (jaxlib's `get_distributed_runtime_client`) cannot be a Python
function: jaxlib fails to pass it the error (`std::bad_cast`) and terminates the process. So
each process runs a daemon thread that writes a heartbeat counter into the coordination
service's key-value store every `PEER_BEAT_SECONDS` and reads the others'. A peer whose counter
has not moved for `BDIFF_PEER_TIMEOUT` seconds (default 30; below JAX's heartbeat timeout, so
the thread acts first), or a key-value store that fails or does not answer for that long
(process 0, which hosts it, is gone, stopped or cut off), ends the process with one line
`error: lost process <i> ...` and exit status 3, within BDIFF_PEER_TIMEOUT + PEER_BEAT_SECONDS
seconds of the loss. At a normal exit the thread is stopped and joined (a daemon thread killed
inside a jaxlib call at interpreter exit aborts the process) and the process marks itself done
in the store, so that a slower peer does not report it as lost; after an uncaught exception it
does not, so the peers report it.

When process 0's process dies, its sockets close and the survivors' JAX clients terminate them
from C++ within seconds (`client.h: Terminating process because the JAX distributed service
detected fatal errors`, SIGABRT), before any Python code can run: `main.py` therefore runs every
process of a multi-process run under `bdiff_jax.runtime.supervisor`, a JAX-free parent that turns that
death into the same one line and exit 3.
"""

import atexit
import os
import sys
import threading
import time
from typing import Callable, Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from bdiff_jax.errors import ConfigError
from bdiff_jax.runtime.distributed_env import MODES, initialize_arguments  # pylint: disable=unused-import

PEER_TIMEOUT_ENV = "BDIFF_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 30.0
PEER_BEAT_SECONDS = 2.0
LOST_PEER_EXIT_CODE = 3


def peer_timeout(environ: Mapping[str, str]) -> float:
  """BDIFF_PEER_TIMEOUT in seconds (> 0), or the default.

  Raises:
    ConfigError: not a positive number.
  """
  value = environ.get(PEER_TIMEOUT_ENV, "") or str(DEFAULT_PEER_TIMEOUT)
  try:
    seconds = float(value)
  except ValueError:
    seconds = -1.0
  if not 0 < seconds < float("inf"):
    raise ConfigError(f"{PEER_TIMEOUT_ENV}={value!r} is not a positive number of seconds.",
                      f"unset it (default {DEFAULT_PEER_TIMEOUT:g}) or set it to e.g. 60.")
  return seconds


def initialize(environ: Optional[Mapping[str, str]] = None) -> bool:
  """Starts the distributed runtime when `initialize_arguments` asks for it, and the peer
  watchdog in a multi-process run; returns whether it started the runtime. Call once, before any
  JAX computation."""
  environ = os.environ if environ is None else environ
  kwargs = initialize_arguments(environ)
  if kwargs is None:
    return False
  timeout = peer_timeout(environ)
  jax.distributed.initialize(**kwargs)
  if jax.process_count() > 1:
    _no_persistent_cache_on_cpu()
    client = _coordination_client()
    if client is not None:
      PeerWatchdog(client, jax.process_index(), jax.process_count(), timeout).start()
  return True


def cache_hangs(cache_dir, enabled: bool, backend: str) -> bool:
  """Whether a multi-process run with these cache settings must turn the persistent cache off."""
  return bool(cache_dir) and bool(enabled) and backend == "cpu"


def _no_persistent_cache_on_cpu() -> None:
  """Turns JAX's persistent compilation cache off in a multi-process run on CPU, with one note.

  On CPU the processes' cache keys differ (each process's own devices enter the key), so process 0
  may load a program from the cache while the others compile it, and two-process runs then hung
  in a collective of the autoregressive model's evaluation program every time (docs/scale_out.md,
  "Known problem"). Compiling afresh never hung."""
  if not cache_hangs(jax.config.jax_compilation_cache_dir,
                     jax.config.jax_enable_compilation_cache, jax.default_backend()):
    return
  jax.config.update("jax_enable_compilation_cache", False)
  if jax.process_index() == 0:
    print(f"note: the persistent compilation cache ({jax.config.jax_compilation_cache_dir}) is off "
          "in this multi-process CPU run (cached and fresh programs of different processes hung "
          "in a collective; docs/scale_out.md)", file=sys.stderr, flush=True)


def _coordination_client():
  """JAX's coordination-service client (a private attribute; None if it moved)."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return getattr(getattr(jax_distributed, "global_state", None), "client", None)


def _lost_peer_exit(line: str) -> None:
  print(line, file=sys.stderr, flush=True)
  os._exit(LOST_PEER_EXIT_CODE)  # pylint: disable=protected-access


class PeerWatchdog:
  """Ends this process with one error line when a peer stops beating (see the module
  docstring). `client` needs `key_value_set(key, value, allow_overwrite)` and
  `key_value_try_get(key)`; `exit` (tests) replaces printing the line and `os._exit`."""

  PREFIX = "bdiff_peer_watchdog"

  def __init__(self, client, index: int, count: int, timeout: float, *,
               beat: float = PEER_BEAT_SECONDS,
               exit: Callable[[str], None] = _lost_peer_exit,  # pylint: disable=redefined-builtin
               clock: Callable[[], float] = time.monotonic):
    self.client, self.index, self.count, self.timeout = client, index, count, timeout
    self.beat, self._exit, self._clock = beat, exit, clock
    self._counter = 0
    now = clock()
    self._seen = {i: (None, now) for i in range(count) if i != index}  # value, when it changed
    self._unreachable_since: Optional[float] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._worker: Optional[threading.Thread] = None  # the beat in flight

  def _key(self, kind: str, index: int) -> str:
    return f"{self.PREFIX}/{kind}/{index}"

  def start(self) -> "PeerWatchdog":
    self._thread = threading.Thread(target=self._run, name="bdiff-peer-watchdog", daemon=True)
    self._thread.start()
    atexit.register(self._at_exit)  # after JAX's own atexit hook, so it runs before it
    return self

  def _at_exit(self) -> None:
    self.finish(done=getattr(sys, "last_value", None) is None)  # set by an uncaught exception

  def finish(self, done: bool = True) -> None:
    """Stops beating (waiting for a beat in flight) and, with `done`, marks this process done,
    so that peers do not report it as lost."""
    self._stop.set()
    for thread in (self._thread, self._worker):
      if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=10.0)
    if not done:
      return
    try:
      self.client.key_value_set(self._key("done", self.index), "1", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass

  def _run(self) -> None:
    # Each beat's calls run in their own thread: a coordination service whose process is
    # stopped or whose host is off the network does not fail them, it never answers (jaxlib
    # aborts only after its 100 s heartbeat timeout), and that must end this process within
    # the timeout too.
    while not self._stop.wait(self.beat):
      result = []
      self._worker = threading.Thread(target=lambda out=result: out.append(self.check()),
                                      name="bdiff-peer-beat", daemon=True)
      self._worker.start()
      self._worker.join(timeout=self.timeout)
      if self._stop.is_set():
        return
      if self._worker.is_alive():
        line = self._line(0, "the coordination service it hosts has not answered for "
                          f"{self.timeout:g} s (its process is stopped or its host is "
                          "unreachable)")
      else:
        line = result[0] if result else None
      if line is not None:
        self._exit(line)
        return

  def _get(self, kind: str, index: int) -> Optional[str]:
    try:
      return self.client.key_value_try_get(self._key(kind, index))
    except Exception as e:  # pylint: disable=broad-except
      if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
        return None
      raise

  def check(self) -> Optional[str]:
    """One beat: publishes this process's counter, reads the peers'. Returns the error line
    when a peer (or the coordination service) was silent for longer than the timeout."""
    now = self._clock()
    try:
      self._counter += 1
      self.client.key_value_set(self._key("beat", self.index), str(self._counter),
                                allow_overwrite=True)
      lost = None
      for peer, (value, since) in sorted(self._seen.items()):
        if self._get("done", peer) is not None:
          del self._seen[peer]
          continue
        current = self._get("beat", peer)
        if current != value:
          self._seen[peer] = (current, now)
        elif now - since > self.timeout and lost is None:
          lost = peer
      self._unreachable_since = None
    except Exception as e:  # pylint: disable=broad-except
      if self._unreachable_since is None:
        self._unreachable_since = now
      if now - self._unreachable_since > self.timeout:
        return self._line(0, "the coordination service it hosts has been unreachable for "
                          f"{self.timeout:g} s ({_first_line(e)})")
      return None
    if lost is None:
      return None
    return self._line(lost, f"it has not answered for {self.timeout:g} s (it died, was killed "
                      "or stopped with an error: see its output)")

  def _line(self, peer: int, why: str) -> str:
    name = f"process {peer}" + (" (the coordinator)" if peer == 0 else "")
    return (f"error: lost {name} of this {self.count}-process run: {why}; process "
            f"{self.index} stops too. Fix: restart all {self.count} processes with the same "
            "command (a missing host must come back first); training resumes from the latest "
            f"checkpoint. ({PEER_TIMEOUT_ENV} sets the wait, now {self.timeout:g} s.)")


# What JAX's CPU collectives (gloo) and the coordination service raise in a survivor when a peer
# is gone: the error reaches Python at once, but the interpreter's exit would then wait for the
# shutdown barrier (JAX's heartbeat timeout) and abort with a C++ dump.
_LOST_PEER_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                    "heartbeat timeout", "stopped sending heartbeats", "Gloo all-reduce failed",
                    "Gloo all-gather failed", "Gloo broadcast failed")


def lost_peer_line(e: BaseException) -> Optional[str]:
  """The one error line for an exception that says a peer of a multi-process run is gone, or
  None (a single-process run, or another error)."""
  if not any(sign in str(e) for sign in _LOST_PEER_SIGNS) or _coordination_client() is None:
    return None  # not a lost peer, or no distributed runtime (a single-process run)
  count, index = jax.process_count(), jax.process_index()
  if count == 2:  # the other one; with more, the error does not say which peer (an address)
    lost = "process 0 (the coordinator)" if index == 1 else "process 1"
  else:
    lost = (f"one of the other {count - 1} processes (the collective does not say which: see "
            "their output)")
  return (f"error: lost {lost} of this {count}-process run: process {index}'s collective "
          f"failed ({_first_line(e)}); it stops too. Fix: restart all {count} processes with "
          "the same command; training resumes from the latest checkpoint.")


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else type(e).__name__


def is_main_process() -> bool:
  """Whether this process writes files and prints (process 0; always true in one process)."""
  return jax.process_index() == 0


def agreed_int(value: int) -> int:
  """Process 0's `value` in every process."""
  return int(multihost_utils.broadcast_one_to_all(np.asarray(value, dtype=np.int32)))


def agreed(*flags: bool) -> tuple[bool, ...]:
  """Process 0's values of the wall-clock and signal `flags` in every process: the processes of
  a multi-process run must save (a collective) and stop at the same step."""
  if jax.process_count() == 1:
    return tuple(bool(f) for f in flags)
  agreed = multihost_utils.broadcast_one_to_all(np.asarray(flags, dtype=np.int32))
  return tuple(bool(f) for f in np.asarray(agreed))
