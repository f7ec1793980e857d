"""Config presets: the automatic choice, its reason, and the up-front memory refusal."""

import importlib.util
import os

import pytest

from bdiff_jax.runtime import platform_info
from tests import helpers


def _wikitext2_module():
  spec = importlib.util.spec_from_file_location(
      "wt2_config", os.path.join(helpers.REPO, "configs", "wikitext2.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _wikitext2_config(preset=""):
  return _wikitext2_module().get_config(preset)


def test_auto_preset_on_this_machine_says_why():
  c = _wikitext2_config()
  p = platform_info.detect()
  expected = {"cpu": "cpu", "tpu": "tpu"}.get(p.backend, c.preset)
  assert c.preset == expected
  assert p.backend in c.preset_reason and c.preset_reason
  assert _wikitext2_config("default").preset == "gpu"  # the old name still works
  forced = _wikitext2_config("smoke")
  assert (forced.preset, forced.preset_reason) == ("smoke", "chosen on the command line")
  with pytest.raises(ValueError, match="unknown preset"):
    _wikitext2_config("nosuch")


@pytest.mark.parametrize("gib,expected", [(4, "cpu"), (6, "cpu"), (16, "gpu"), (80, "gpu")])
def test_auto_picks_gpu_only_where_its_step_fits(monkeypatch, gib, expected):
  module = _wikitext2_module()
  gpu = platform_info.Platform(backend="gpu", device_kind="NVIDIA test", num_devices=1,
                               memory_bytes=gib * 2**30, cpu_count=8)
  monkeypatch.setattr(platform_info, "detect", lambda: gpu)
  c = module.get_config()
  assert c.preset == expected and "GPU" in c.preset_reason
  # The threshold leaves the fit check's headroom over the gpu preset's measured step (the
  # 4,859 MiB in the config's docstring): a GPU that gets the preset can run it.
  assert 4_859 * 2**20 <= platform_info.FIT_HEADROOM * module.GPU_PRESET_MIN_BYTES


def test_step_that_does_not_fit_is_refused():
  small = platform_info.Platform(backend="cpu", device_kind="cpu", num_devices=1,
                                 memory_bytes=2**30, cpu_count=2)
  stats = {"held_bytes": 2**30}  # more than 90% of the machine
  with pytest.raises(platform_info.ResourceError, match="GiB"):
    platform_info.check_step_fits(stats, small, what="x", fix="y")
  platform_info.check_step_fits({"held_bytes": 2**29}, small, what="x", fix="y")


def test_memory_limit_environment_variable(monkeypatch):
  monkeypatch.setenv(platform_info.MEMORY_LIMIT_ENV, "12345")
  assert platform_info.detect().memory_bytes == 12345
  monkeypatch.setenv(platform_info.MEMORY_LIMIT_ENV, "lots")
  with pytest.raises(platform_info.UserError):
    platform_info.detect()


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_compile_children")  # only the refusal is tested, not numbers
def test_main_refuses_a_step_that_does_not_fit(tmp_path, real_data_dir, shared_tfds_dir):
  workdir = tmp_path / "wd"
  proc = helpers.run_main(
      ["--config", helpers.SMOKE, "--workdir", str(workdir),
       f"--config.data.data_dir={real_data_dir}", f"--config.data.tfds_dir={shared_tfds_dir}"],
      env_extra={platform_info.MEMORY_LIMIT_ENV: "1000000"})
  assert proc.returncode == 2, proc.stdout + proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "XLA memory analysis" in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr
  assert "preset: smoke" in proc.stdout
  assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())


@pytest.mark.parametrize("gib,expected", [(0, "cpu"), (4, "cpu"), (16, "gpu"), (64, "gpu")])
def test_auto_on_the_metal_plugin_fits_unified_memory(monkeypatch, gib, expected):
  # jax-mps registers the platform "mps"; its memory is a share of the RAM (0: unknown).
  module = _wikitext2_module()
  mps = platform_info.Platform(backend="mps", device_kind="Apple M3", num_devices=1,
                               memory_bytes=gib * 2**30, cpu_count=8)
  monkeypatch.setattr(platform_info, "detect", lambda: mps)
  c = module.get_config()
  assert c.preset == expected
  reason = c.preset_reason
  assert "\n" not in reason and "mps" in reason and "Metal" in reason
  assert platform_info.METAL_PLUGIN in reason and "fit check is skipped" in reason
  assert ("memory unknown" in reason) == (gib == 0)


def test_auto_says_when_the_metal_plugin_did_not_start(monkeypatch):
  note = "the Metal plugin jax-mps did not start (no Metal device); running on the cpu"
  cpu = platform_info.Platform(backend="cpu", device_kind="cpu", num_devices=1,
                               memory_bytes=16 * 2**30, cpu_count=8, note=note)
  monkeypatch.setattr(platform_info, "detect", lambda: cpu)
  c = _wikitext2_module().get_config()
  assert c.preset == "cpu" and note in c.preset_reason and "\n" not in c.preset_reason
