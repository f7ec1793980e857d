"""The harness of scripts/attack_reliability.py: main.py in new processes (optionally with a
fault injected into its own process), file digests, the one-line check, the shared inputs (a
tiny trained workdir, a tiny SST-2, a prepared data cache). A dev tool, not part of the tests.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from tests import helpers  # pylint: disable=wrong-import-position
from tests.test_glue_classification import write_sst2  # pylint: disable=wrong-import-position
from tests.test_reliability_units import _torch_bin  # pylint: disable=wrong-import-position

MAIN = os.path.join(REPO, "main.py")
FIXTURE_OPT = os.path.join(REPO, "tests", "fixtures", "tiny_opt")
_INJECT = r"""
import builtins, errno, os, runpy, sys
kind, root = sys.argv[1], os.path.abspath(sys.argv[2])
def under(p):
  try:
    return os.path.abspath(os.fspath(p)).startswith(root)
  except TypeError:
    return False
def refuse(p):
  raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(p))
if kind == "readonly":
  real_open, real_osopen, real_mkdir = builtins.open, os.open, os.mkdir
  def open_(f, mode="r", *a, **k):
    if under(f) and any(c in mode for c in "wax+"): refuse(f)
    return real_open(f, mode, *a, **k)
  def osopen(p, flags, *a, **k):
    if under(p) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT): refuse(p)
    return real_osopen(p, flags, *a, **k)
  def mkdir(p, *a, **k):
    if under(p): refuse(p)
    return real_mkdir(p, *a, **k)
  builtins.open, os.open, os.mkdir = open_, osopen, mkdir
else:  # enospc: the disk fills up as files are flushed
  def fsync(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  os.fsync = fsync
sys.argv = [sys.argv[3]] + sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class Run:
  def __init__(self, rc, out, err, secs):
    self.rc, self.out, self.err, self.secs = rc, out, err, secs

  @property
  def text(self):
    return self.out + self.err

  def errors(self):
    return [l for l in self.text.splitlines() if l.startswith("error:")]


def _env(**extra):
  return helpers.subprocess_env(**helpers.tiny_compile_env(), **extra)


def start(args, *, env=None, prefix=()):
  return subprocess.Popen([*prefix, sys.executable, MAIN, *args], cwd=REPO,
                          env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(p, t0, timeout=900):
  try:
    out, err = p.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    p.kill()
    out, err = p.communicate()
  return Run(p.returncode, out, err, time.time() - t0)


def main_py(args, *, inject=None, env=None, timeout=900):
  t0 = time.time()
  if inject:
    cmd = [sys.executable, "-c", _INJECT, inject[0], inject[1], MAIN, *args]
    p = subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  else:
    p = start(args, env=env)
  return finish(p, t0, timeout)


def digest(root):
  """{relative path: sha256} of every file under root."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      if f == ".lock":  # the holder's record, rewritten by every run
        continue
      path = os.path.join(d, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()[:12]
  return out


def one_line(r, code=2, words=()):
  """(met, evidence) for 'one error line, exit `code`, no traceback, naming `words`'."""
  errs = r.errors()
  ok = (r.rc == code and len(errs) == 1 and "Traceback" not in r.text and
        all(w.lower() in errs[0].lower() for w in words))
  return ok, f"exit {r.rc}, {len(errs)} error line(s): {(errs or [r.text.strip()[-200:]])[0][:230]}"


def wait_for(pred, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if pred():
      return True
    time.sleep(0.2)
  return False


# ------------------------------------------------------------------------------- shared inputs
class Inputs:
  """Made once per attack: a tiny trained workdir, a tiny SST-2, a prepared data cache."""

  def __init__(self, root):
    self.root = root
    self.data = helpers.wikitext2_dir()
    self.tfds = os.path.join(root, "tfds")
    self.sst2 = write_sst2(os.path.join(root, "glue"))
    self._trained = None

  def train_args(self, w, *extra):
    return ["--config", helpers.SMOKE, "--workdir", str(w),
            f"--config.data.data_dir={self.data}", f"--config.data.tfds_dir={self.tfds}",
            "--config.model.emb_dim=32", "--config.model.head_dim=16",
            "--config.model.mlp_dim=64", "--config.data.seq_len=32",
            "--config.train.batch_size=4", "--config.train.num_steps=8",
            "--config.train.warmup_steps=2", "--config.train.log_every=1",
            "--config.train.eval_every=4", "--config.train.checkpoint_every=4",
            "--config.eval.batch_size=2", "--config.eval.max_tokens=64",
            "--config.eval.during_training_max_tokens=64", "--config.eval.seeds=(0,)",
            "--config.sample.num_samples=1", "--config.sample.length=8",
            "--config.sample.num_steps=2", *extra]

  def trained(self, dest):
    """A copy of the tiny trained workdir (8 steps, checkpoints 4 and 8, best)."""
    if self._trained is None:
      w = os.path.join(self.root, "trained")
      r = main_py(self.train_args(w))
      assert r.rc == 0, r.text[-3000:]
      self._trained = w
    shutil.copytree(self._trained, dest)
    return dest

  def glue_args(self, w, *extra, steps=20):
    return ["--config", "configs/glue.py:test", "--workdir", str(w), "--mode=glue",
            f"--config.glue.glue_dir={self.sst2}", "--config.glue.rows=opt:adamw:head",
            "--config.glue.seeds=(0,1)", f"--config.glue.num_steps={steps}",
            f"--config.glue.eval_every={steps}", *extra]


def _units(w):
  d = os.path.join(w, "glue_units")
  return sorted(os.listdir(d)) if os.path.isdir(d) else []
