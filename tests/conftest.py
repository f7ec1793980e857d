"""Shared test fixtures: where the real WikiText-2 lives, and session-wide settings.

Helpers (running main.py, tiny models) live in tests/helpers.py. Integration tests (end to end
through main.py, subprocesses, multi-device) are marked `slow`; the fast unit layer is
`python -m pytest -q -m "not slow" tests`.
"""

import os

import pytest

from bdiff_jax import xla_flags

# The same XLA flags as main.py, before any test starts JAX's backend: in-process and
# subprocess runs must compute identically (e.g. resume tests compare losses bit for bit).
xla_flags.apply_default_flags()

from tests import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: integration test (subprocesses, end to end)")
  # One persistent XLA compilation cache for the session, inherited by every subprocess: the
  # end-to-end tests compile the same smoke-preset programs in many fresh processes.
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    cache = os.path.join(str(config.rootpath), ".pytest_cache", "jax_compilation_cache")
    os.makedirs(cache, exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="session")
def real_data_dir():
  path = helpers.wikitext2_dir()
  if not os.path.exists(os.path.join(path, "wiki.train.tokens")):
    pytest.skip(f"WikiText-2 not found at {path}; set BDIFF_DATA_DIR")
  return os.path.abspath(path)


@pytest.fixture(scope="session")
def shared_tfds_dir(tmp_path_factory):
  """One prepared TFDS copy of WikiText-2 for every end-to-end test of the session."""
  return str(tmp_path_factory.mktemp("tfds"))
