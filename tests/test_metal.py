"""Apple-silicon GPUs through the jax-mps plugin (JAX platform "mps"), without a Mac.

The platform is mocked in-process (platform_info.detect / start_backend / jax.default_backend);
the fallbacks are run for real in child processes with a stand-in plugin module
(jax_plugins/mps, found by JAX's plugin discovery) that fails the way jax-mps can; the install
file is resolved for macOS arm64 by scripts/check_metal_requirements.py (slow: the registry).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from bdiff_jax.benchmarks import step_memory
from bdiff_jax.errors import UserError
from bdiff_jax.modes import sample as sample_mode
from bdiff_jax.runtime import platform_info
from bdiff_jax.train.train_step import make_train_step
from tests import helpers

GIB = 2**30


class _Device:
  device_kind = "Apple M3 Pro"

  def __init__(self, stats):
    self._stats = stats

  def memory_stats(self):
    if isinstance(self._stats, Exception):
      raise self._stats
    return self._stats


def _mps(monkeypatch, stats, ram=24 * GIB):
  monkeypatch.setattr(platform_info, "start_backend", lambda: ("mps", ""))
  monkeypatch.setattr(jax, "local_devices", lambda: [_Device(stats)])
  monkeypatch.setattr(platform_info, "host_physical_bytes", lambda: ram)
  monkeypatch.delenv(platform_info.MEMORY_LIMIT_ENV, raising=False)


@pytest.mark.parametrize("stats", [None, {}, NotImplementedError("no memory stats")])
def test_detect_metal_memory_is_a_share_of_ram(monkeypatch, stats):
  _mps(monkeypatch, stats)
  p = platform_info.detect()
  assert p.backend == "mps" and p.metal and p.num_devices == 1
  assert p.memory_bytes == 16 * GIB  # 2/3 of 24 GiB
  assert "unified memory" in p.describe() and "mps" in p.describe()


def test_detect_metal_prefers_the_device_limit_and_the_user_cap(monkeypatch):
  _mps(monkeypatch, {"bytes_limit": 12 * GIB})
  assert platform_info.detect().memory_bytes == 12 * GIB
  monkeypatch.setenv(platform_info.MEMORY_LIMIT_ENV, str(4 * GIB))
  assert platform_info.detect().memory_bytes == 4 * GIB


def test_detect_metal_with_unknown_memory_gets_the_cpu_preset(monkeypatch):
  _mps(monkeypatch, None, ram=0)
  p = platform_info.detect()
  assert p.memory_bytes == 0
  monkeypatch.setattr(platform_info, "detect", lambda: p)
  c = helpers.load_config("configs/wikitext2.py")
  assert c.preset == "cpu" and "memory unknown" in c.preset_reason


class _Compiled:
  def __init__(self, result):
    self._result = result

  def memory_analysis(self):
    if isinstance(self._result, Exception):
      raise self._result
    return self._result


@pytest.mark.parametrize("result", [None, RuntimeError("GetCompiledMemoryStats not implemented")])
def test_metal_memory_stats_are_unanalysed_not_a_crash(monkeypatch, result):
  monkeypatch.setattr(jax, "default_backend", lambda: "mps")
  stats = platform_info.memory_stats(_Compiled(result))
  assert isinstance(stats, platform_info.UnanalysedMemory) and not stats
  mps = platform_info.Platform(backend="mps", device_kind="Apple M3", num_devices=1,
                               memory_bytes=GIB, cpu_count=8)
  platform_info.check_step_fits(stats, mps, what="x", fix="y")  # nothing to check: no raise
  assert platform_info.check_host_memory(stats, mps) is None
  assert stats.get("held_bytes") is None
  with pytest.raises(UserError, match="no compiled memory analysis") as e:
    stats["held_bytes"]  # pylint: disable=pointless-statement
  assert "\n" not in str(e.value) and "Fix: " in str(e.value)


def test_memory_stats_unchanged_elsewhere(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(RuntimeError, match="no compiled memory analysis"):
    platform_info.memory_stats(_Compiled(None))
  with pytest.raises(ValueError):
    platform_info.memory_stats(_Compiled(ValueError("boom")))


def test_start_backend_without_the_plugin_is_plain_jax():
  # This machine has no Metal plugin: the backend is JAX's own choice and there is no note.
  assert not platform_info.metal_plugin_installed()
  assert platform_info.start_backend() == (jax.default_backend(), "")
  assert platform_info.detect().note == ""


# The StableHLO operations jax-mps 0.10.11 executes: the dispatch table of its
# libpjrt_plugin_mps.dylib (the op names next to its handlers' "[MPS ERROR] <op>: ..." messages;
# any other op fails at compile time with "Unsupported operation(s): ... The MPS backend does not
# have a handler for these operations"), and the CHLO ops its legalisation pass rewrites to
# StableHLO first (the chlo.* names in the binary).
JAX_MPS_0_10_11_OPS = frozenset("stablehlo." + op for op in """
    exponential log sqrt rsqrt negate abs floor ceil sine cosine tanh tan logistic sign
    log_plus_one round_nearest_even is_finite exponential_minus_one real imag add subtract
    multiply divide maximum minimum power atan2 and or xor shift_left shift_right_logical clamp
    remainder cbrt not shift_right_arithmetic popcnt compare select round_nearest_afz
    count_leading_zeros reduce_precision constant convert bitcast_convert reshape
    broadcast_in_dim concatenate transpose reverse iota slice dynamic_slice dynamic_update_slice
    pad return gather scatter reduce reduce_window select_and_scatter all_reduce partition_id
    dot_general convolution cholesky triangular_solve custom_call composite optimization_barrier
    while case rng_bit_generator create_token after_all sort fft complex""".split()) | frozenset(
        "chlo." + op for op in """
    acos acosh asin asinh atan atanh conj cosh digamma erf erf_inv erfc is_inf is_neg_inf
    is_pos_inf lgamma next_after polygamma sinh square tan top_k zeta""".split())


def _ops(lowered) -> set:
  text = lowered.as_text()
  ops = set(re.findall(r"\b((?:stablehlo|chlo|mhlo|sdy)\.[a-z_]+)", text))
  ops -= {"mhlo.num_partitions", "mhlo.num_replicas", "mhlo.frontend_attributes",
          "mhlo.sharding", "mhlo.layout_mode", "mhlo.memory_kind"}
  ops |= {"custom_call @" + t for t in re.findall(r"custom_call @([A-Za-z0-9_.]+)", text)}
  return ops


@pytest.mark.parametrize("preset", ["smoke", "cpu_opt"])  # diffusion (adaptive head); OPT, AR
def test_train_step_and_sampler_use_only_ops_jax_mps_executes(preset):
  # Lowered (not compiled) for this machine's backend: the same StableHLO the plugin would get,
  # except where JAX has Metal-specific lowerings (jax-mps registers its own for GELU,
  # attention, norms, RoPE, threefry: its mps.* custom calls).
  c = helpers.load_config("configs/wikitext2.py", preset)
  parts = step_memory.step_parts(c, 33_278)
  step = make_train_step(parts.objective, parts.network, parts.rule, ema_decay=c.train.ema_decay)
  tokens = jax.ShapeDtypeStruct((2, int(c.data.seq_len)), jnp.int32)
  ops = _ops(step.lower(parts.abstract_state, tokens))
  sample = jax.jit(lambda p, key: parts.objective.sample(
      parts.network, p, key, settings=sample_mode.sample_settings(c.sample),
      max_len=int(c.data.seq_len)))
  ops |= _ops(sample.lower(parts.abstract_state.params, jax.random.PRNGKey(0)))
  assert ops and ops <= JAX_MPS_0_10_11_OPS, sorted(ops - JAX_MPS_0_10_11_OPS)


def _installed_plugin(monkeypatch, backend, *, x64=False, requested=""):
  """start_backend as on a Mac with the plugin, JAX answering `backend` (config updates noted,
  not made: this process's backend has started already)."""
  updates = []
  monkeypatch.setattr(platform_info, "_started", None)
  monkeypatch.setattr(platform_info, "metal_plugin_installed", lambda: True)
  monkeypatch.setattr(platform_info, "_x64_enabled", lambda: x64)
  monkeypatch.setattr(platform_info, "_requested_platforms", lambda: requested)
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setattr(jax.config, "update", lambda *a: updates.append(a))
  return updates


def test_start_backend_on_metal_says_nothing(monkeypatch):
  assert _installed_plugin(monkeypatch, "mps") == []
  assert platform_info.start_backend() == ("mps", "")


def test_start_backend_notes_a_plugin_that_gave_no_backend(monkeypatch):
  _installed_plugin(monkeypatch, "cpu")
  assert platform_info.start_backend() == (
      "cpu", "the Metal plugin jax-mps did not start (JAX started no Metal backend); running "
             "on the cpu")
  _installed_plugin(monkeypatch, "cpu", requested="cpu")  # the user's choice: no note
  assert platform_info.start_backend() == ("cpu", "")


def test_float64_on_metal_too_late_to_route_is_one_line(monkeypatch):
  updates = _installed_plugin(monkeypatch, "mps", x64=True)
  with pytest.raises(UserError, match="float64") as e:
    platform_info.start_backend()
  assert updates == [("jax_platforms", "cpu")] and "\n" not in str(e.value)
  assert "Fix: unset JAX_ENABLE_X64" in str(e.value)


def _load_checker():
  spec = importlib.util.spec_from_file_location(
      "check_metal_requirements", os.path.join(helpers.REPO, "scripts",
                                               "check_metal_requirements.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_requirements_metal_adds_only_the_plugin_and_only_on_a_mac():
  checker = _load_checker()
  path = os.path.join(helpers.REPO, "requirements-metal.txt")
  mac = checker.flatten(path, checker.target_environment("macosx_14_0_arm64", "3.11"))
  linux = dict(checker.target_environment("macosx_14_0_arm64", "3.11"),
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64")
  base = checker.flatten(os.path.join(helpers.REPO, "requirements.txt"), linux)
  assert checker.pins(checker.flatten(path, linux)) == checker.pins(base)
  intel_mac = dict(checker.target_environment("macosx_14_0_x86_64", "3.11"))
  assert checker.pins(checker.flatten(path, intel_mac)) == checker.pins(base)
  mac_pins = checker.pins(mac)
  assert mac_pins == dict(checker.pins(base), **{"jax-mps": mac_pins["jax-mps"]})
  # jax-mps 0.10.x declares jax>=0.10.0,<0.11 and jaxlib>=0.10.0,<0.11: the project's pins.
  assert mac_pins["jax-mps"].startswith("0.10.")
  assert mac_pins["jax"].startswith("0.10.") and mac_pins["jaxlib"].startswith("0.10.")


def test_check_report_catches_moved_pins_and_foreign_wheels():
  checker = _load_checker()

  def item(name, version, wheel):
    return {"metadata": {"name": name, "version": version},
            "download_info": {"url": f"https://files.example/{wheel}"}}

  good = {"install": [item("jax", "0.10.2", "jax-0.10.2-py3-none-any.whl"),
                      item("jax-mps", "0.10.11",
                           "jax_mps-0.10.11-py3-none-macosx_14_0_arm64.whl")]}
  wanted = {"jax": "0.10.2", "jax-mps": "0.10.11"}
  assert checker.check_report(good, wanted, "macosx_14_0_arm64") == []
  moved = {"install": [good["install"][0], item("jax-mps", "0.10.10",
                                                "jax_mps-0.10.10-py3-none-macosx_14_0_arm64.whl")]}
  assert checker.check_report(moved, wanted, "macosx_14_0_arm64")
  linux = {"install": good["install"] + [item("numpy", "2.4.6",
                                              "numpy-2.4.6-cp311-cp311-manylinux_2_17_x86_64.whl")]}
  assert checker.check_report(linux, wanted, "macosx_14_0_arm64")
  assert checker.check_report({"install": good["install"][:1]}, {"jax": "0.10.2"},
                              "macosx_14_0_arm64")  # no plugin


# A stand-in for jax-mps that fails as the real one can on a Mac: its initialize() raises (jax-mps
# raises MPSPluginError off macOS or without its library), or it registers the "mps" backend
# whose client then fails to start (no Metal device: JAX raises "Unable to initialize backend").
_FAKE_PLUGIN = '''
import os

def initialize():
  mode = os.environ.get("FAKE_MPS_MODE", "")
  if mode == "init_raises":
    raise RuntimeError("fake jax-mps: no Metal device")
  from jax._src import xla_bridge as xb

  def factory():
    with open(os.environ["FAKE_MPS_CALLED"], "a") as f:
      f.write("called\\n")
    raise RuntimeError("fake jax-mps: failed to create the Metal client")

  xb.register_backend_factory("mps", factory, priority=500, fail_quietly=False,
                              experimental=True)
'''

_PROBE = textwrap.dedent('''
    import json
    import os
    import jax.numpy as jnp
    from bdiff_jax.runtime import platform_info
    from tests import helpers
    c = helpers.load_config("configs/wikitext2.py", os.environ.get("PROBE_PRESET", ""))
    backend, note = platform_info.start_backend()
    print(json.dumps({"preset": c.preset, "reason": c.preset_reason, "backend": backend,
                      "note": note, "sum": float(jnp.ones(3).sum())}))
''')


def _run_with_fake_plugin(tmp_path, mode, **env):
  (tmp_path / "jax_plugins" / "mps").mkdir(parents=True)
  (tmp_path / "jax_plugins" / "mps" / "__init__.py").write_text(_FAKE_PLUGIN)
  called = tmp_path / "called.txt"
  proc = helpers.run_python(
      _PROBE, timeout=300,
      env_extra={"PYTHONPATH": f"{helpers.REPO}{os.pathsep}{tmp_path}", "FAKE_MPS_MODE": mode,
                 "FAKE_MPS_CALLED": str(called), "JAX_PLATFORMS": "", **env})
  helpers.assert_ok(proc)
  assert "Traceback" not in proc.stderr, proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["backend"] == "cpu" and out["sum"] == 3.0
  assert out["preset"] == (env.get("PROBE_PRESET") or "cpu")
  assert "\n" not in out["note"] and out["note"] in out["reason"]
  return out, called.exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["", "smoke"])  # auto, and a preset forced on the command line
def test_plugin_whose_initialize_fails_runs_on_the_cpu_and_says_so(tmp_path, preset):
  out, _ = _run_with_fake_plugin(tmp_path, "init_raises", PROBE_PRESET=preset)
  assert out["note"] == ("the Metal plugin jax-mps did not start (RuntimeError: fake jax-mps: "
                         "no Metal device); running on the cpu")
  if preset:
    assert out["reason"] == f"chosen on the command line; {out['note']}"


@pytest.mark.slow
@pytest.mark.parametrize("platforms", ["", "mps"])
def test_plugin_whose_backend_fails_runs_on_the_cpu_and_says_so(tmp_path, platforms):
  out, called = _run_with_fake_plugin(tmp_path, "backend_raises", JAX_PLATFORMS=platforms)
  assert called
  assert out["note"].startswith("the Metal plugin jax-mps did not start (Unable to initialize "
                                "backend 'mps': ")
  assert "failed to create the Metal client" in out["note"]
  assert out["note"].endswith("); running on the cpu")


@pytest.mark.slow
def test_float64_is_routed_to_the_cpu_before_metal_starts(tmp_path):
  out, called = _run_with_fake_plugin(tmp_path, "backend_raises", JAX_ENABLE_X64="1")
  assert not called  # the Metal backend was never tried
  assert out["note"] == ("float64 (JAX_ENABLE_X64) is not supported on Metal (jax-mps); "
                         "running on the cpu")


@pytest.mark.slow
def test_requirements_metal_resolves_for_macos_arm64():
  proc = subprocess.run([sys.executable, os.path.join("scripts", "check_metal_requirements.py")],
                        cwd=helpers.REPO, capture_output=True, text=True, timeout=1200,
                        check=False)
  if proc.returncode == 3:
    pytest.skip(proc.stdout.strip() or "the package registry is unreachable")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert proc.stdout.startswith("ok: ") and "jax-mps 0.10.11" in proc.stdout
