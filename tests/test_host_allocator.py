"""bdiff_jax/runtime/host_allocator.py: what it sets, when it stands back, and that it works.

* `release` restores glibc's defaults only after `configure` applied ours, and the train mode's
  `platform_info.check_host_memory` calls it (with a note) for a CPU step that fits only without
  retention.
* `configure` makes exactly the three mallopt calls, in order, and none at all when the user
  opted out (BDIFF_HOST_ALLOCATOR=system), configured malloc themselves (GLIBC_TUNABLES,
  MALLOC_*_), or the C library is not glibc; an unknown mode is an error, and main.py turns it
  into one `error:` line.
* Slow: in a fresh process running a jitted gradient with 128 MiB of temporary buffers 24 times,
  every call page-faults ~32k pages in again with glibc's defaults, and after `configure()`
  only the few calls in which the retained heap still grows do (getrusage's minor faults: a
  count, not a time); both compute the same bits. XLA's threads free and allocate in an order
  that varies from run to run, so the heap may still grow in a few calls (seen in 30 runs:
  1 to 4 of the 23 calls, as late as the 22nd call); a statistic over the first few calls only
  would be flaky (CI once saw the median of calls 3-8 fault in).
"""

import dataclasses
import os
import subprocess
import sys

import pytest

from bdiff_jax.runtime import host_allocator
from bdiff_jax.runtime import platform_info
from tests import helpers


class _FakeLibc:

  def __init__(self, answer=1):
    self.calls, self.answer = [], answer

  def mallopt(self, param, value):
    self.calls.append((param, value))
    return self.answer


def test_configure_sets_the_three_options_in_order():
  libc = _FakeLibc()
  assert host_allocator.configure({}, libc) == "retain"
  assert libc.calls == [(-8, 1), (-4, 0), (-1, -1)]  # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD
  libc = _FakeLibc()
  assert host_allocator.configure({"BDIFF_HOST_ALLOCATOR": "Retain "}, libc) == "retain"
  assert len(libc.calls) == 3


@pytest.mark.parametrize("environ, why", [
    ({"BDIFF_HOST_ALLOCATOR": "system"}, "BDIFF_HOST_ALLOCATOR=system"),
    ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.arena_max=4"}, "GLIBC_TUNABLES"),
    ({"MALLOC_ARENA_MAX": "2"}, "MALLOC_ARENA_MAX"),
    ({"MALLOC_MMAP_THRESHOLD_": "1"}, "MALLOC_MMAP_THRESHOLD_"),
])
def test_users_choice_stands(environ, why):
  libc = _FakeLibc()
  result = host_allocator.configure(environ, libc)
  assert result.startswith("system:") and why in result
  assert not libc.calls


def test_other_libc_and_refusal_change_nothing_more():
  assert host_allocator.configure({}, None) == "system: not glibc"
  # A GLIBC_TUNABLES without malloc tunables is not a malloc choice.
  libc = _FakeLibc(answer=0)
  result = host_allocator.configure({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, libc)
  assert result == "system: mallopt(-8, 1) refused" and libc.calls == [(-8, 1)]


def test_unknown_mode_is_an_error_and_main_says_so_in_one_line(tmp_path):
  with pytest.raises(ValueError, match="BDIFF_HOST_ALLOCATOR='fast' is not one of retain, system"):
    host_allocator.configure({"BDIFF_HOST_ALLOCATOR": "fast"}, _FakeLibc())
  proc = subprocess.run(
      [sys.executable, "main.py", "--config", "configs/wikitext2.py:smoke", "--workdir",
       str(tmp_path / "w")], cwd=helpers.REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, BDIFF_HOST_ALLOCATOR="fast"))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: BDIFF_HOST_ALLOCATOR='fast' is not one of retain, system. Fix: unset "
      "BDIFF_HOST_ALLOCATOR or set it to one of retain, system."]
  assert not (tmp_path / "w").exists()


_FAULTS = """
import resource
from bdiff_jax.runtime import host_allocator
print(host_allocator.configure())
import jax, jax.numpy as jnp
a = jax.random.normal(jax.random.PRNGKey(0), (1024, 32), jnp.float32)
b = jax.random.normal(jax.random.PRNGKey(1), (32, 16384), jnp.float32) / 4
# A gradient through a [1024, 16384] softmax: 64 MiB temporary buffers (each above glibc's
# largest mmap threshold, 32 MiB, so that the system allocator maps them afresh every call).
f = jax.jit(jax.grad(lambda a, b: jax.nn.logsumexp(a @ b, axis=-1).sum()))
faults = []
for i in range(24):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  g = f(a, b).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(jnp.sum(g * g).item().hex())
print(*faults[1:])  # the first call compiles and lays out the heap
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_buffers_are_not_page_faulted_in_again():
  faulting, values = {}, {}
  pages = 64 * 2**20 // 4096  # one temporary buffer
  for mode in ("system", "retain"):
    proc = subprocess.run([sys.executable, "-c", _FAULTS], cwd=helpers.REPO, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, BDIFF_HOST_ALLOCATOR=mode, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    applied, values[mode], faults = proc.stdout.strip().splitlines()[-3:]
    if mode == "retain" and applied != "retain":
      pytest.skip(f"the allocator settings were not applied here ({applied})")
    faults = [int(n) for n in faults.split()]
    assert len(faults) == 23
    faulting[mode] = [n for n in faults if n > pages // 2]
  assert len(faulting["system"]) >= 20, faulting  # each call touches fresh memory
  assert len(faulting["retain"]) <= 8, faulting  # freed buffers are reused once the heap fits
  assert values["retain"] == values["system"]  # where buffers live changes no bit


def test_release_undoes_only_what_configure_did(monkeypatch):
  monkeypatch.setattr(host_allocator, "_retaining", False)
  libc = _FakeLibc()
  assert not host_allocator.release(libc) and not libc.calls  # nothing of ours to undo
  assert host_allocator.configure({"BDIFF_HOST_ALLOCATOR": "system"}, libc).startswith("system")
  assert not host_allocator.retaining() and not host_allocator.release(libc)
  assert host_allocator.configure({}, libc) == "retain" and host_allocator.retaining()
  libc.calls.clear()
  assert host_allocator.release(libc)
  assert libc.calls == [(-4, 65536), (-1, 128 * 1024)]  # glibc's defaults again
  assert not host_allocator.retaining() and not host_allocator.release(libc)


def test_a_step_that_fits_only_without_retention_releases_with_a_note(monkeypatch):
  gib = 2**30
  stats = {"held_bytes": 3 * gib, "temp_bytes": 2 * gib}  # retained: up to 3 + 6 * 2 = 15 GiB
  cpu = lambda mem: platform_info.Platform(backend="cpu", device_kind="cpu", num_devices=1,
                                           memory_bytes=int(mem * gib), cpu_count=2)
  monkeypatch.setattr(host_allocator, "_retaining", True)
  libc = _FakeLibc()
  assert platform_info.check_host_memory(stats, cpu(17), libc=libc) is None  # 15 <= 0.9 * 17
  assert host_allocator.retaining() and not libc.calls
  gpu = dataclasses.replace(cpu(4), backend="gpu")
  assert platform_info.check_host_memory(stats, gpu, libc=libc) is None  # device memory
  note = platform_info.check_host_memory(stats, cpu(16), libc=libc)  # 15 > 14.4: release
  assert "15.0 GiB" in note and "16.0 GiB" in note and "default allocation" in note
  assert not host_allocator.retaining() and libc.calls == [(-4, 65536), (-1, 128 * 1024)]
  assert platform_info.check_host_memory(stats, cpu(16), libc=libc) is None  # nothing to undo
