"""Shared test helpers: paths, running main.py in a new process, and tiny models.

Imported by the test modules (`from tests import helpers`); fixtures live in conftest.py.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np

from bdiff_jax import models
from bdiff_jax.config import configuration
from bdiff_jax.objectives import objective_class
from bdiff_jax.train.builder import build_objective
from bdiff_jax.runtime import xla_flags
from bdiff_jax.train import builder
from bdiff_jax.train import train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "configs/wikitext2.py:smoke"


def load_config(path: str, preset: str = ""):
  """`get_config(preset)` of the config file `path` (relative to the repo, e.g. configs/x.py)."""
  spec = importlib.util.spec_from_file_location(
      "config_" + os.path.splitext(os.path.basename(path))[0], os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


# The smoke preset narrowed to a 2 x 32 model on 4 x 32 batches, for runs where only the wiring
# is tested (test_reliability, test_notebook): config field -> value.
NARROW_SMOKE = {"model.emb_dim": 32, "model.head_dim": 16, "model.mlp_dim": 64,
                "data.seq_len": 32, "train.batch_size": 4, "train.warmup_steps": 2}


def config_flags_of(fields: dict) -> list:
  """`--config.<field>=<value>` arguments of {field: value}."""
  return [f"--config.{k}={v}" for k, v in fields.items()]


def smoke_args(workdir, data_dir, tfds_dir, *extra, config: str = SMOKE, log_every: int = 1,
               eval_tokens: int = 300, eval_batch_size: int = 8) -> list:
  """main.py arguments of a very small run of the smoke preset on the real WikiText-2: 8 steps,
  periodic evaluations and checkpoints at steps 4 and 8 on 128 tokens, the final evaluation on
  `eval_tokens` tokens of each split; `extra` arguments last (a later one wins)."""
  return ["--config", config, "--workdir", str(workdir),
          f"--config.data.data_dir={data_dir}", f"--config.data.tfds_dir={tfds_dir}",
          "--config.train.num_steps=8", f"--config.train.log_every={log_every}",
          "--config.train.eval_every=4", "--config.train.checkpoint_every=4",
          f"--config.eval.max_tokens={eval_tokens}",
          f"--config.eval.during_training_max_tokens={min(128, eval_tokens)}",
          f"--config.eval.batch_size={eval_batch_size}", *extra]


def wikitext2_dir() -> str:
  return os.environ.get("BDIFF_DATA_DIR") or os.path.join(REPO, "..", "shared", "data",
                                                          "wikitext-2")


def subprocess_env(**extra) -> dict:
  """Environment of a child Python process: CPU, the repo importable, the test session's
  persistent compilation cache (identical programs compile once across processes)."""
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  env.update({k: str(v) for k, v in extra.items()})
  return env


# XLA flags for child processes that compile tiny models and compare them only with themselves
# (sharded vs one device, several processes vs one, recompute vs autodiff, the memory
# benchmark's wiring): compiling is nearly all of their time, so they compile without LLVM
# optimisation and with XLA:CPU's older elemental fusion emitters. Measured on a tiny
# reversible train step: 3.5 s -> 1.5 s per compile; the 8-device FSDP script 37 s -> 26 s.
# Never for processes whose numbers are compared bit for bit with the test process or with a
# main.py run that compiles otherwise: without optimisations the emitters differ in rounding
# (e.g. normal noise drawn inside a fusion).
# Use with JAX_DISABLE_MOST_OPTIMIZATIONS=1 (see `tiny_compile_env`).
ELEMENTAL_EMITTERS_FLAG = "--xla_cpu_use_fusion_emitters=false"

# XLA:CPU splits each program's LLVM module into parts that it compiles on parallel threads. The
# suite keeps both cores busy with its two workers, so the split only adds work: one part per
# program spends less CPU (paired runs, 2026-12-07: a tiny train step's compile 3.1 -> 2.7
# CPU-s, a tiny-compile smoke run of main.py 19.3 -> 17.4 CPU-s). Like the emitters it is set
# alike for every process of the session, so processes that compare numbers compile alike.
ONE_CODEGEN_PART_FLAG = "--xla_cpu_parallel_codegen_split_count=1"

# What the test session adds to every process's XLA flags (conftest.py; `tiny_compile_env`
# adds it to its own).
SESSION_XLA_FLAGS = f"{ELEMENTAL_EMITTERS_FLAG} {ONE_CODEGEN_PART_FLAG}"


def xla_defaults_requested() -> bool:
  """BDIFF_TEST_OPTIMIZE=1: the tests compile with XLA's defaults, as users run the program,
  instead of the fast-compile settings of conftest.py and `tiny_compile_env`."""
  return os.environ.get("BDIFF_TEST_OPTIMIZE", "0") == "1"


# SESSION_XLA_FLAGS only on the jaxlib bdiff_jax.runtime.xla_flags verified its flags on.
TINY_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0" + (
    " " + SESSION_XLA_FLAGS if xla_flags.verified_jaxlib() else "")


def tiny_compile_env(devices: int = 0, **extra) -> dict:
  """Environment entries (for `subprocess_env(**...)`) of a child that compiles tiny models
  fast: TINY_COMPILE_XLA_FLAGS, most XLA optimisations off (neither with BDIFF_TEST_OPTIMIZE=1),
  and `devices` host CPU devices."""
  default = xla_defaults_requested()
  flags = "" if default else TINY_COMPILE_XLA_FLAGS
  if devices:
    flags += f" --xla_force_host_platform_device_count={devices}"
  return {"XLA_FLAGS": flags.strip(),
          "JAX_DISABLE_MOST_OPTIMIZATIONS": "0" if default else "1", **extra}


def run_main(args, *, env_extra=None, timeout=600):
  """Runs `python main.py ARGS` in a new process; returns CompletedProcess (text)."""
  return subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *args], cwd=REPO,
                        env=subprocess_env(**(env_extra or {})), capture_output=True, text=True,
                        timeout=timeout)


def run_python(code: str, *, env_extra=None, timeout=600):
  """Runs `python -c CODE` in a new process from the repo root; returns CompletedProcess."""
  return subprocess.run([sys.executable, "-c", code], cwd=REPO,
                        env=subprocess_env(**(env_extra or {})), capture_output=True, text=True,
                        timeout=timeout)


def assert_ok(proc):
  """proc exited 0; otherwise fail showing its output."""
  assert proc.returncode == 0, (f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout}\n"
                                f"STDERR:\n{proc.stderr}")
  return proc


def train_losses(workdir) -> dict:
  """{step: loss} of the 'train' records in <workdir>/metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == "train"}


def network(model_config, *, vocab_size: int, max_len: int) -> models.Network:
  """The network of a `config.model` section, causal when its objective says so."""
  causal = objective_class(model_config.objective).causal
  return builder.build_network(model_config, vocab_size=vocab_size, max_len=max_len,
                               causal=causal)


def tiny_config(**model):
  """A validated config of a tiny model (2 x 32) on 8 x 16 batches; `model` overrides fields."""
  c = configuration.base_config()
  c.model.num_layers = 2
  c.model.emb_dim = 32
  c.model.num_heads = 2
  c.model.num_kv_heads = 2
  c.model.head_dim = 16
  c.model.mlp_dim = 64
  for k, v in model.items():
    c.model[k] = v
  c.data.seq_len = 16
  c.train.batch_size = 8
  c.train.num_steps = 20
  c.train.warmup_steps = 2
  c.train.learning_rate = 1e-2
  c.train.ema_decay = 0.9
  configuration.validate(c)
  return c


def train_setup(c, vocab=50):
  """(objective, network, update rule, initial state, a random batch) of config `c`."""
  objective = build_objective(c, mask_id=vocab)
  net = builder.build_network(c.model, vocab_size=vocab, max_len=c.data.seq_len,
                              causal=objective.causal)
  rule = builder.build_update_rule(c.train)
  # One compiled program (the library's own runs jit their initialisation too); eagerly, the
  # initialisers dispatch dozens of separately compiled ops (~3 s per call on 2 cores).
  state = jax.jit(lambda k_params, k_train: train_state.create_train_state(
      models.init_params(net, k_params, seq_len=c.data.seq_len), rule, k_train))(
          jax.random.PRNGKey(0), jax.random.PRNGKey(1))
  batch = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (c.train.batch_size,
                                                                 c.data.seq_len), 0, vocab))
  return objective, net, rule, state, batch
