"""Shared test fixtures: where the real WikiText-2 lives, and running main.py in a new process."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wikitext2_dir() -> str:
  return os.environ.get("BDIFF_DATA_DIR") or os.path.join(REPO, "..", "shared", "data",
                                                          "wikitext-2")


@pytest.fixture(scope="session")
def real_data_dir():
  path = wikitext2_dir()
  if not os.path.exists(os.path.join(path, "wiki.train.tokens")):
    pytest.skip(f"WikiText-2 not found at {path}; set BDIFF_DATA_DIR")
  return os.path.abspath(path)


@pytest.fixture(scope="session")
def shared_tfds_dir(tmp_path_factory):
  """One prepared TFDS copy of WikiText-2 for every end-to-end test of the session."""
  return str(tmp_path_factory.mktemp("tfds"))


def run_main(args, *, env_extra=None, timeout=600):
  """Runs `python main.py ARGS` in a new process; returns CompletedProcess (text)."""
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.update(env_extra or {})
  return subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def assert_ok(proc):
  """proc exited 0; otherwise fail showing its output."""
  assert proc.returncode == 0, (f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout}\n"
                                f"STDERR:\n{proc.stderr}")
  return proc


def train_losses(workdir) -> dict:
  """{step: loss} of the 'train' records in <workdir>/metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == "train"}
