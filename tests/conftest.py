"""Shared test fixtures: where the real WikiText-2 lives, and session-wide settings.

Helpers (running main.py, tiny models) live in tests/helpers.py. Integration tests (end to end
through main.py, subprocesses, multi-device) are marked `slow`; the fast unit layer is
`python -m pytest -q -m "not slow" tests`.
"""

import gc
import os
import signal

import pytest

from bdiff_jax.runtime import bootstrap
from bdiff_jax.runtime import xla_flags

# As main.py does first thing (every child it starts does it too; bdiff_jax/runtime/bootstrap.py):
# freed host memory is kept for reuse, so each step's large buffers are not page-faulted in
# again, and the same XLA flags as main.py, before any test starts JAX's backend: in-process and
# subprocess runs must compute identically (e.g. resume tests compare losses bit for bit).
# Besides: one persistent XLA compilation cache for the session, shared by the in-process tests,
# every subprocess and every pytest-xdist worker: identical programs (the smoke preset's steps in
# many fresh processes, the same tiny model in several tests) compile once. Set before JAX is
# imported, which reads it then. It lives in .pytest_cache (entries are keyed by the program and
# the JAX version, so a stale entry is never used).
bootstrap.bootstrap(compilation_cache_dir=os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
    "jax_compilation_cache"))

# A suite started in the background by a non-interactive shell (`nohup ... &`, a CI script)
# inherits SIGINT ignored, and so would every process it starts; the interrupt tests need Ctrl-C
# to reach this process and its children, as it does from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from bdiff_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

# In this process only (not in subprocesses, which run real training steps): compile without
# most XLA optimisations. The unit tests' programs are tiny, so compiling dominates them, and
# this cuts it by ~40% (a tiny model's train step: 4.5 s -> 2.6 s); results stay exact where
# the tests need them to be (the same program twice) and within float tolerance elsewhere.
# Tests whose programs run long, or that compare bits with a subprocess, use `xla_optimized`.
# BDIFF_TEST_OPTIMIZE=1 turns it off.
if not helpers.xla_defaults_requested():
  jax.config.update("jax_disable_most_optimizations", True)

# The whole session (this process and every child it starts, main.py runs included) compiles
# with XLA:CPU's elemental fusion emitters instead of the newer MLIR ones, each program's machine
# code as one part (helpers.SESSION_XLA_FLAGS; on the pinned jaxlib, where the flags exist;
# never on another, where XLA would abort on an unknown flag). Like the setting above they are
# there for compile speed (the emitters: the fast layer 136 s -> 115 s on 2 cores; the single
# part: helpers.py), and every process of a test compiles alike, so bit-for-bit comparisons
# between them still hold. BDIFF_TEST_OPTIMIZE=1 runs the suite with XLA's
# defaults, exactly as users run the program.
if not helpers.xla_defaults_requested() and xla_flags.verified_jaxlib():
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                             helpers.SESSION_XLA_FLAGS).strip()

# Start the backend now, with the flags above: XLA reads XLA_FLAGS once, when it starts, and
# fixtures such as `tiny_compile_children` change the environment for child processes only.
jax.devices()


# The test processes' cyclic garbage collector. They hold millions of long-lived objects
# (JAX, Flax, orbax, every test module, compiled programs), and each full collection walked them
# all: 7% of the fast layer's CPU (20 of 282 CPU-s, 2026-12-07). `bootstrap()` above collects
# the youngest generation every 10,000 allocations instead of 700 (as in every process main.py
# starts; bootstrap.GC_THRESHOLDS), and the objects that exist once collection has finished are
# moved out of the collector's sight (`gc.freeze()`, after one last collection): 6.5 CPU-s in the
# two workers over the whole suite, their peak memory 3.9 and 2.9 GiB (one held 3.8 GiB
# mid-suite before). Garbage is still collected, a little later.


def pytest_collection_finish(session):
  del session
  gc.collect()
  gc.freeze()


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: integration test (subprocesses, end to end)")
  # pytest-xdist (3.6 on) reorders `--dist loadfile`'s modules by their number of tests unless
  # told not to, which put the costliest modules (few tests, long ones) last; keep the order
  # below instead.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


# The costliest modules first, by their CPU seconds in a cold suite (this process's and its
# children's, a per-test rusage plugin, 2026-12-07). pytest-xdist's `--dist loadfile` hands
# whole modules to whichever worker is free, in collection order; starting with the long ones
# lets the two workers finish together instead of one waiting for a long module picked up last.
# Within a module the order is unchanged.
_SLOW_MODULES_FIRST = ("test_multiprocess_modes", "test_reliability", "test_glue_scoring",
                       "test_end_to_end", "test_train", "test_glue_learning",
                       "test_autoregressive", "test_glue_classification", "test_compare",
                       "test_sharding", "test_reversible", "test_adaptive_head",
                       "test_glue_reliability", "test_sampling", "test_wall_schedule",
                       "test_zeroth_order", "test_sample_quality", "test_glue_starts",
                       "test_distributed", "test_benchmark_memory", "test_benchmark_throughput",
                       "test_metal", "test_masked_head", "test_notebook", "test_count_estimator",
                       "test_host_allocator")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_SLOW_MODULES_FIRST)}
  module = lambda item: os.path.splitext(os.path.basename(str(item.fspath)))[0]
  items.sort(key=lambda item: rank.get(module(item), len(rank)))


@pytest.fixture
def xla_optimized():
  """This test compiles with every XLA optimisation (as subprocesses and users always do): its
  programs run long enough for optimised code to win, or it compares numbers bit for bit with
  a subprocess."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def tiny_compile_children():
  """Child processes started by this module's tests compile fast (helpers.tiny_compile_env):
  for end-to-end modules whose processes compare numbers only with each other (resume, eval in
  a new process) or only check an error path, where compiling is most of each process's time
  (a cold smoke run: 23.7 s -> 17.9 s). Tests that compare a child's numbers with this
  process's, or that stand for what users run as is (test_autoregressive), do not use it."""
  # (This process's own backend started, with the session's flags, when conftest.py was
  # imported: what is set here reaches only the children.)
  with pytest.MonkeyPatch.context() as mp:
    for name, value in helpers.tiny_compile_env().items():
      mp.setenv(name, value)
    yield


@pytest.fixture(scope="session")
def real_data_dir():
  path = helpers.wikitext2_dir()
  if not os.path.exists(os.path.join(path, "wiki.train.tokens")):
    pytest.skip(f"WikiText-2 not found at {path}; set BDIFF_DATA_DIR")
  return os.path.abspath(path)


@pytest.fixture(scope="session", autouse=True)
def shared_tfds_dir(tmp_path_factory):
  """One prepared TFDS copy of WikiText-2 for every end-to-end test of the session, shared by
  the pytest-xdist workers (the session's temporary root; preparing publishes atomically, so
  two workers preparing at once is safe) and the default cache ($BDIFF_CACHE_DIR) of the child
  processes that set no tfds_dir (e.g. the GLUE start models' pretraining): WikiText-2 is
  prepared once per session, not once per worker and per such child. Autouse: set before the
  first test of each worker, whatever order the files come in."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  path = root / "shared_tfds"
  path.mkdir(exist_ok=True)
  # Children inherit it; the tests of the default cache itself set or unset it themselves.
  os.environ[pipeline.CACHE_ENV] = str(path)
  return str(path)
