"""A lost coordinator is one line (bdiff_jax/runtime/supervisor.py; issue 28 item 5).

The relay, the line and the decision are tested directly; the supervision itself with children
that do not import JAX (signals, exit statuses, a recorded jaxlib dump), and once with two real
JAX processes whose coordinator is killed.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from bdiff_jax.runtime import distributed
from bdiff_jax.runtime import distributed_env
from bdiff_jax.runtime import interrupt
from bdiff_jax.runtime import supervisor
from tests import helpers

# What jaxlib 0.10.2 printed in process 1 when process 0 was killed (pids and addresses cut).
DUMP = b"""\
W1206 18:59:18.597756   26994 preemption_sync_manager.cc:147] Failed to retrieve preemption notice from coordination service: UNAVAILABLE: Socket closed
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/GetKeyValue:
:UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:"Socket closed"}. This is only expected if one of the tasks is unhealthy. Check the logs for the actual root cause.
E1206 18:59:18.597882   26994 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1206 18:59:18.597886   26994 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues.
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/PollForError:
:UNKNOWN:Error received from peer  {grpc_message:"Socket closed", grpc_status:14}
*** Check failure stack trace: ***
    @     0x7f53f2640634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
    @     0x7f53f9c9e1f5  (unknown)
"""
ENV = {"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "2",
       "JAX_PROCESS_ID": "1"}


def test_only_processes_of_a_multi_process_run_are_supervised():
  cases = [{}, {"BDIFF_DISTRIBUTED": "off"}, ENV, dict(ENV, BDIFF_DISTRIBUTED="off"),
           dict(ENV, JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0"), {"BDIFF_DISTRIBUTED": "on"},
           {"SLURM_JOB_ID": "3", "SLURM_NTASKS": "2"}, {"SLURM_JOB_ID": "3", "SLURM_NTASKS": "1"}]
  got = [supervisor.wanted(env) for env in cases]
  assert got == [False, False, True, False, False, True, True, False]
  # The same decision as the runtime's own (no supervisor for a run that starts no runtime).
  for env, want in zip(cases, got):
    if want:
      assert distributed.initialize_arguments(env) is not None
  assert not supervisor.wanted(dict(ENV, BDIFF_SUPERVISED="1"))  # the child itself
  assert not supervisor.wanted(dict(ENV, BDIFF_SUPERVISOR="off"))
  assert not supervisor.wanted(dict(ENV, JAX_PROCESS_ID="x"))  # main.py's one line says why
  assert distributed.initialize_arguments is distributed_env.initialize_arguments
  assert supervisor.LOST_PEER_EXIT_CODE == distributed.LOST_PEER_EXIT_CODE == 3


def test_the_line_names_the_lost_process_and_how_to_resume():
  line = supervisor.lost_line(DUMP, ENV)
  assert line.startswith("error: lost process 0 (the coordinator) of this 2-process run: its "
                         "coordination service stopped answering")
  assert "UNAVAILABLE: Failed to send RPC to coordination service" in line
  assert ("process 1 stops too. Fix: restart all 2 processes with the same command on every "
          "host" in line and line.endswith("training resumes from the latest checkpoint."))
  assert "\n" not in line
  named = DUMP.replace(b"absl::Status: UNAVAILABLE:", b"absl::Status: UNAVAILABLE: "
                       b"/job:jax_worker/replica:0/task:2 stopped sending heartbeats;")
  assert supervisor.lost_line(named, dict(ENV, JAX_NUM_PROCESSES="3")).startswith(
      "error: lost process 2 of this 3-process run: the coordination service reports it gone")
  # The service's own verdict after its heartbeat timeout (BDIFF_PEER_TIMEOUT >= 100 s).
  unhealthy = (b"F1206 19:25:28.366589 16028 client.h:80] Terminating process because the JAX "
               b"distributed service detected fatal errors. absl::Status: UNAVAILABLE: The "
               b"following tasks are unhealthy (stopped sending heartbeats):\n2\nThe tasks have "
               b"crashed.\n")
  assert supervisor.lost_line(unhealthy, dict(ENV, JAX_NUM_PROCESSES="3")).startswith(
      "error: lost process 2 of this 3-process run")
  assert "this multi-process run" in supervisor.lost_line(b"", {})


def test_the_relay_passes_lines_on_and_holds_log_blocks():
  out = []
  relay = supervisor.StderrRelay(out.append, hold=2.0)
  relay.feed(b"a line\npart", 0.0)
  assert out == [b"a line\n"]
  relay.tick(0.05, idle=True)  # an unfinished line is passed on when the stream is idle
  assert out == [b"a line\n", b"part"]
  relay.feed(b" of it\n" + DUMP[:300], 1.0)  # a C++ log line starts a held block
  assert out[-1] == b" of it\n"
  relay.feed(b"\nafter\n", 2.0)
  relay.tick(2.9, idle=True)
  assert len(out) == 3  # still held
  relay.tick(3.0, idle=True)
  assert out[-1].startswith(b"W1206") and out[-1].endswith(b"after\n")
  relay.feed(b"later\n", 4.0)
  assert out[-1] == b"later\n"
  # The child ended: a held block is dropped (the dump) or passed on.
  relay.feed(DUMP, 5.0)
  n = len(out)
  relay.close(drop_held=True)
  assert len(out) == n and supervisor.FATAL_SIGN in relay.tail
  relay = supervisor.StderrRelay(out.append)
  relay.feed(DUMP[:100], 0.0)
  relay.close(drop_held=False)
  assert out[-1] == DUMP[:100]


# Children without JAX: the supervisor around a script that behaves like main.py's work.
_CHILD = r"""
import os, signal, sys, time
from bdiff_jax.runtime import supervisor
supervisor.run_if_multiprocess()
from bdiff_jax.runtime.interrupt import GracefulInterrupt
what = sys.argv[1]
print("ready", os.environ.get("BDIFF_SUPERVISED"), flush=True)
if what == "exit":
  sys.exit(7)
if what == "kill":
  os.kill(os.getpid(), signal.SIGKILL)
if what == "dump":
  os.write(2, b"before\n" + open(sys.argv[2], "rb").read())
  os.abort()
with GracefulInterrupt() as stop:
  print("waiting", flush=True)
  while not stop.stop_requested():
    time.sleep(0.01)
  time.sleep(0.3)  # saving: a duplicate delivered now (ms after the first) must not abort it
print("saved", flush=True)
sys.exit(stop.exit_code)
"""


def _supervised(*args, env=ENV):
  return subprocess.Popen([sys.executable, "-c", _CHILD, *args], cwd=helpers.REPO,
                          env=helpers.subprocess_env(**env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_the_supervisor_passes_exit_statuses_and_output_through(tmp_path):
  p = _supervised("exit")
  out, err = p.communicate(timeout=60)
  assert (p.returncode, out, err) == (7, "ready 1\n", "")
  p = _supervised("kill")  # killed by a signal: the supervisor dies of the same signal
  out, err = p.communicate(timeout=60)
  assert p.returncode == -signal.SIGKILL and out == "ready 1\n"
  p = _supervised("exit", env={})  # not a multi-process run: no supervisor, no child
  out, _ = p.communicate(timeout=60)
  assert (p.returncode, out) == (7, "ready None\n")
  (tmp_path / "dump").write_bytes(DUMP)
  p = _supervised("dump", str(tmp_path / "dump"))
  out, err = p.communicate(timeout=60)
  assert p.returncode == 3, err
  lines = err.splitlines()
  assert lines[0] == "before" and len(lines) == 2, err
  assert lines[1].startswith("error: lost process 0 (the coordinator) of this 2-process run")


LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"),
                           reason="/proc and PR_SET_PDEATHSIG")


@LINUX
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_reach_the_child_once(sig):
  p = _supervised("wait")
  assert p.stdout.readline() == "ready 1\n" and p.stdout.readline() == "waiting\n"
  p.send_signal(sig)  # to the supervisor only, as `kill <pid>` or a terminal's Ctrl-C does
  out, err = p.communicate(timeout=60)
  assert p.returncode == 128 + sig and out == "saved\n", err
  assert len(err.splitlines()) == 1 and err.startswith(f"received {signal.Signals(sig).name}")
  # A scheduler that signals every process of the job: the child gets it directly and
  # forwarded, and takes the two as one request.
  p = _supervised("wait")
  assert p.stdout.readline() == "ready 1\n" and p.stdout.readline() == "waiting\n"
  child = [int(c) for c in open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()]
  assert len(child) == 1
  os.kill(child[0], sig)
  p.send_signal(sig)
  out, err = p.communicate(timeout=60)
  assert p.returncode == 128 + sig and out == "saved\n", err
  assert len(err.splitlines()) == 1


def test_duplicate_window_only_in_a_supervised_child():
  aborted = []
  with interrupt.GracefulInterrupt(stream=open(os.devnull, "w"), abort=aborted.append,
                                   duplicate_seconds=0.5):
    signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGINT)  # the same request twice
    assert aborted == []
    time.sleep(0.6)
    signal.raise_signal(signal.SIGINT)  # a second Ctrl-C
    assert aborted == [130]
  assert interrupt.GracefulInterrupt()._duplicate_seconds == 0.0  # pylint: disable=protected-access


class _HangingStore:
  """A coordination service whose process is stopped: calls never return."""

  def __init__(self):
    self.release = threading.Event()

  def key_value_set(self, key, value, allow_overwrite=False):
    del key, value, allow_overwrite
    self.release.wait()

  def key_value_try_get(self, key):
    del key
    self.release.wait()


def test_watchdog_ends_a_process_whose_coordinator_hangs():
  store, lines = _HangingStore(), []
  dog = distributed.PeerWatchdog(store, 1, 2, 0.5, beat=0.1, exit=lines.append)
  dog._thread = threading.Thread(target=dog._run, daemon=True)  # pylint: disable=protected-access
  t0 = time.monotonic()
  dog._thread.start()  # pylint: disable=protected-access
  dog._thread.join(timeout=10)  # pylint: disable=protected-access
  assert lines and time.monotonic() - t0 < 0.5 + 0.1 + 1.0
  assert lines[0].startswith("error: lost process 0 (the coordinator) of this 2-process run: "
                             "the coordination service it hosts has not answered for 0.5 s")
  store.release.set()
  dog.finish(done=False)


_PEER = r"""
import os, sys, time
from bdiff_jax.runtime import supervisor
supervisor.run_if_multiprocess()
from bdiff_jax.runtime import distributed
distributed.initialize()
import jax
from jax.experimental import multihost_utils
multihost_utils.sync_global_devices("up")
print("up", os.getpid(), flush=True)
time.sleep(120)
print("not stopped", flush=True)
"""


def _line_starting(prefix, proc):
  for line in proc.stdout:
    if line.startswith(prefix):
      return line
  raise AssertionError(f"exit {proc.wait()}: {proc.stderr.read()}")


@LINUX
def test_killing_the_coordinator_is_one_line_in_the_survivor():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = []
  for index in (0, 1):
    env = helpers.subprocess_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                 JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=index)
    procs.append(subprocess.Popen([sys.executable, "-c", _PEER], cwd=helpers.REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    ups = [_line_starting("up ", p) for p in procs]  # after gloo's own lines
    child0 = int(ups[0].split()[1])
    t0 = time.monotonic()
    procs[0].kill()  # SIGKILL of process 0 as started (the supervisor): its child dies with it
    out, err = procs[1].communicate(timeout=60)
    waited = time.monotonic() - t0
  finally:
    for p in procs:
      p.kill()
      p.wait()
  print(f"survivor stopped {waited:.1f} s after process 0 was killed: {err.strip()}")
  assert procs[1].returncode == 3, err
  assert waited < supervisor.LOST_BOUND_S
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "error: lost process 0 (the coordinator) of this 2-process run"), err
  assert "Fix: restart all 2 processes with the same command" in lines[0]
  with pytest.raises(ProcessLookupError):
    for _ in range(50):  # the child of the killed supervisor is gone too (PR_SET_PDEATHSIG)
      os.kill(child0, 0)
      time.sleep(0.1)
