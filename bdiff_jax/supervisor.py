"""One process of a multi-process run does its work in a child; this JAX-free parent reports a
lost coordinator in one line.

Why: when process 0 of a multi-process run dies (it hosts JAX's coordination service), jaxlib
0.10.2 terminates every other process from C++ within seconds: a page of coordination-service
logs, `client.h: Terminating process because the JAX distributed service detected fatal errors`,
SIGABRT (exit 134), before any Python code of that process can run (distributed.py). A parent
that never imports JAX outlives it and says so in one line.

`main.py` calls `run_if_multiprocess()` before anything else. When the environment asks for a
multi-process run (`distributed_env.initialize_arguments`; BDIFF_SUPERVISOR=off opts out) and
this process is not already the supervised child (BDIFF_SUPERVISED=1), it runs the same command
as a child and waits for it:
  - stdin and stdout are the child's own (the progress bar writes to the terminal as before);
    the child's stderr passes through this process line by line as it comes, except that a
    block of C++ log lines (`E1206 19:01:07.060705 28051 file.cc:289] ...`) and what follows it
    is held HOLD_SECONDS before it is passed on, so that a coordination failure's dump can be
    dropped;
  - the child ends after jaxlib's `Terminating process because the JAX distributed service
    detected fatal errors`: the held dump is dropped and one line says which process was lost
    (the one the status names; process 0, the coordinator, when its service stopped answering)
    and how to resume; exit status 3 (LOST_PEER_EXIT_CODE). The line comes within LOST_BOUND_S
    of process 0's death (jaxlib's poll for errors fails as soon as its sockets close: 1-3 s
    measured); a coordinator that hangs or whose host drops off the network is caught by the
    child's watchdog instead (distributed.PeerWatchdog: BDIFF_PEER_TIMEOUT + 2 s);
  - otherwise this process ends as the child did: the same exit status, or death by the same
    signal;
  - SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to this process are forwarded to
    the child once. The child has its own process group, so a Ctrl-C at the terminal reaches it
    only through this process; a scheduler that signals every process of a job reaches it twice
    within milliseconds, which interrupt.GracefulInterrupt takes as one request;
  - the child dies with this process (Linux: PR_SET_PDEATHSIG), so `kill -9` of the process a
    user started still ends the work.
Single-process runs never get here: main.py does its work in its one process, as before.
"""

import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import time
from typing import Callable, Mapping, Optional

from bdiff_jax import distributed_env
from bdiff_jax.errors import UserError

CHILD_ENV = "BDIFF_SUPERVISED"
SWITCH_ENV = "BDIFF_SUPERVISOR"  # off: no supervisor (the C++ abort is then what you get)
LOST_PEER_EXIT_CODE = 3  # as distributed.LOST_PEER_EXIT_CODE (that module imports JAX)
HOLD_SECONDS = 2.0
LOST_BOUND_S = 10  # the stated bound (docs/reliability.md); the test checks it
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
FATAL_SIGN = b"Terminating process because the JAX distributed service detected fatal errors"
_LOG_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ [^\s\]]+:\d+\] ")
_TAIL_BYTES = 1 << 16


def wanted(environ: Mapping[str, str]) -> bool:
  """Whether this process should supervise its work: one process of a multi-process run, not
  already supervised, not switched off. A malformed distributed environment is left to main.py,
  which reports it in one line."""
  if environ.get(CHILD_ENV) == "1" or environ.get(SWITCH_ENV, "") == "off":
    return False
  try:
    arguments = distributed_env.initialize_arguments(environ)
  except UserError:
    return False
  return arguments is not None and arguments.get("num_processes", 2) > 1


def _env_int(environ: Mapping[str, str], *names: str) -> Optional[int]:
  for name in names:
    try:
      return int(environ[name])
    except (KeyError, ValueError):
      continue
  return None


def lost_line(dump: bytes, environ: Mapping[str, str]) -> str:
  """The one line for a child that jaxlib terminated with `dump` on its stderr."""
  index = _env_int(environ, "JAX_PROCESS_ID", "SLURM_PROCID")
  count = _env_int(environ, "JAX_NUM_PROCESSES", "SLURM_NTASKS")
  text = dump.decode("utf-8", "replace")
  status = text[text.find("absl::Status:"):] if "absl::Status:" in text else ""
  status_line = status.split("\n", 1)[0][len("absl::Status:"):].strip().split(". ", 1)[0]
  tasks = re.findall(r"/task:(\d+)", status)
  unhealthy = re.search(r"stopped sending heartbeats\):\s*([\d,\s]+)", status)
  tasks += re.findall(r"\d+", unhealthy.group(1)) if unhealthy else []
  named = [int(t) for t in tasks if int(t) != index]
  run = f"this {count}-process run" if count else "this multi-process run"
  if named:
    lost = f"process {named[0]} of {run}: the coordination service reports it gone"
  else:
    lost = (f"process 0 (the coordinator) of {run}: its coordination service stopped answering "
            "(it died, was killed or stopped with an error: see its output)")
  brief = f" [{status_line[:160]}]" if status_line else ""
  who = f"process {index}" if index is not None else "this process"
  every = f"all {count} processes" if count else "every process"
  return (f"error: lost {lost}{brief}; {who} stops too. Fix: restart {every} with the same "
          "command on every host (a missing host must come back first); training resumes from "
          "the latest checkpoint.")


class StderrRelay:
  """Passes the child's stderr on (`write`), holding each block of C++ log lines, and what
  follows it, for `hold` seconds."""

  def __init__(self, write: Callable[[bytes], None], hold: float = HOLD_SECONDS):
    self._write, self.hold = write, hold
    self._partial = b""
    self._held: list[bytes] = []
    self._held_since: Optional[float] = None
    self.tail = b""  # the last bytes seen, held or not: where the fatal sign is looked for

  def feed(self, data: bytes, now: float) -> None:
    self.tail = (self.tail + data)[-_TAIL_BYTES:]
    lines = (self._partial + data).split(b"\n")
    self._partial = lines.pop()
    for line in lines:
      line += b"\n"
      if self._held_since is None and (_LOG_LINE.match(line) or line.startswith(b"*** ")):
        self._held_since = now
      if self._held_since is None:
        self._write(line)
      else:
        self._held.append(line)

  def tick(self, now: float, idle: bool) -> None:
    """Passes on a block held for `hold` seconds, and an unfinished line when the stream is
    idle and nothing is held."""
    if self._held_since is not None and now - self._held_since >= self.hold:
      self._release()
    if idle and self._partial and self._held_since is None:
      self._write(self._partial)
      self._partial = b""

  def _release(self) -> None:
    held, self._held, self._held_since = self._held, [], None
    if held:
      self._write(b"".join(held))

  def close(self, drop_held: bool) -> None:
    """The child has ended: passes on what is left, or drops the held block (the dump)."""
    if drop_held:
      self._held, self._held_since, self._partial = [], None, b""
    self._release()
    if self._partial:
      self._write(self._partial)
      self._partial = b""


def _write_stderr(data: bytes) -> None:
  try:
    os.write(2, data)
  except OSError:
    pass  # a closed stderr must not end the supervision


def _child_setup(parent: int) -> None:
  """In the child before exec: its own process group; killed when the parent dies."""
  os.setpgid(0, 0)
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
  except (OSError, AttributeError):
    pass
  if os.getppid() != parent:  # the parent died before prctl took effect
    os._exit(1)  # pylint: disable=protected-access


def supervise(command: list[str], environ: Mapping[str, str]) -> int:
  """Runs `command` as the supervised child; returns this process's exit status: the child's
  (negative: killed by that signal), or LOST_PEER_EXIT_CODE after one line for a lost
  coordinator."""
  child: Optional[subprocess.Popen] = None
  early: list[int] = []

  def forward(signum, frame):  # pylint: disable=unused-argument
    if child is None:
      early.append(signum)
      return
    try:
      os.kill(child.pid, signum)
    except ProcessLookupError:
      pass

  for sig in FORWARDED:
    if signal.getsignal(sig) is not signal.SIG_IGN:
      signal.signal(sig, forward)
  parent = os.getpid()
  child = subprocess.Popen(command, env=dict(environ, **{CHILD_ENV: "1"}),
                           stderr=subprocess.PIPE, preexec_fn=lambda: _child_setup(parent))
  for signum in early:
    forward(signum, None)
  relay, fd = StderrRelay(_write_stderr), child.stderr.fileno()
  open_ = True
  while open_ and child.poll() is None:
    readable = select.select([fd], [], [], 0.1)[0]
    if readable:
      data = os.read(fd, 1 << 16)
      open_ = bool(data)
      relay.feed(data, time.monotonic())
    relay.tick(time.monotonic(), idle=not readable)
  code = child.wait()
  deadline = time.monotonic() + 2.0  # what the child wrote last (a grandchild may hold the pipe)
  while open_ and time.monotonic() < deadline and select.select([fd], [], [], 0.2)[0]:
    data = os.read(fd, 1 << 16)
    open_ = bool(data)
    relay.feed(data, time.monotonic())
  lost = code != 0 and FATAL_SIGN in relay.tail
  relay.close(drop_held=lost)
  if lost:
    _write_stderr((lost_line(relay.tail, environ) + "\n").encode())
    return LOST_PEER_EXIT_CODE
  return code


def _end_like(code: int) -> None:
  """Ends this process as the child ended: exit status `code`, or death by signal -`code`."""
  sys.stdout.flush()
  if code < 0:
    if -code not in (signal.SIGKILL, signal.SIGSTOP):
      signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
    time.sleep(1.0)
    code = 128 - code
  os._exit(code)  # pylint: disable=protected-access


def run_if_multiprocess(environ: Optional[Mapping[str, str]] = None) -> None:
  """Supervises this command in a child and exits when `wanted`; returns at once otherwise."""
  environ = os.environ if environ is None else environ
  if not wanted(environ):
    return
  _end_like(supervise([sys.executable, *sys.orig_argv[1:]], dict(environ)))
