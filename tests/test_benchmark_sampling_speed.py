"""The sampling-speed benchmark, started as users start it, times the samplers under the
program's own settings (host allocator, XLA flags) and says which, and never overwrites an
existing output. Only its start is run here: a full run compiles seven samplers (~75 s of CPU
even at toy sizes), and the samplers themselves are tested in test_sampling.py and
test_ar_sampling.py."""

import os
import subprocess
import sys

from bdiff_jax.runtime import xla_flags
from tests import helpers


def _start(out, **env):
  environ = {k: v for k, v in os.environ.items()
             if k not in ("BDIFF_HOST_ALLOCATOR", "BDIFF_XLA_FLAGS", "XLA_FLAGS")}
  environ.update(JAX_PLATFORMS="cpu", **env)
  return subprocess.run([sys.executable, "-m", "bdiff_jax.benchmarks.sampling_speed", "--out",
                         str(out)], cwd=helpers.REPO, capture_output=True, text=True,
                        timeout=120, env=environ)


def test_settings_are_applied_and_an_existing_output_is_kept(tmp_path):
  out = tmp_path / "speed.json"
  out.write_text("earlier results")
  proc = _start(out)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"error: {out} exists already. Fix: pass --out with a new file name."]
  assert out.read_text() == "earlier results"
  allocator = "retain" if sys.platform.startswith("linux") else "system"
  flags = " ".join(xla_flags.default_flags({}))
  assert proc.stdout.splitlines() == [f"host allocator: {allocator}; XLA_FLAGS: {flags!r}"]
  assert (flags != "") == xla_flags.verified_jaxlib()
  proc = _start(out, BDIFF_HOST_ALLOCATOR="system", BDIFF_XLA_FLAGS="none")
  assert proc.stdout.splitlines() == ["host allocator: system; XLA_FLAGS: ''"]
  proc = _start(tmp_path / "other.json", BDIFF_HOST_ALLOCATOR="fast")
  assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
      "error: BDIFF_HOST_ALLOCATOR='fast' is not one of retain, system. Fix: unset "
      "BDIFF_HOST_ALLOCATOR or set it to one of retain, system."]
  assert not (tmp_path / "other.json").exists()
