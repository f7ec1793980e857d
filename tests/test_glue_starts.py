"""The GLUE start models pretrained by the train mode (bdiff_jax/modes/glue_starts.py).

* the commands are the train mode's (what a user runs by hand), one per row model;
* a workdir is finished only when the train mode's end wrote its evaluation and plot after the
  latest checkpoint;
* (slow) smoke-sized pretraining of the three models: an attempt stopped early is one
  `StartModelError` line and is resumed by the next call with the budget that is left; a
  finished workdir is reused without starting a child.
"""

import json
import os
import re
import sys
import time

import pytest

from bdiff_jax.errors import ConfigError
from bdiff_jax.modes import glue_starts
from bdiff_jax.runtime.reporter import QUIET, Reporter
from tests import helpers

SMOKE_ARGS = ("--config.train.num_steps=4", "--config.train.log_every=2",
              "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
              "--config.eval.max_tokens=512", "--config.eval.seeds=(0,)",
              "--config.sample.num_samples=1", "--config.sample.num_steps=4")


class Lines(Reporter):
  def __init__(self):
    super().__init__(verbose=True)
    self.lines = []

  def info(self, message):
    self.lines.append(message)


def test_commands_are_the_train_mode_of_each_start_model(tmp_path):
  got = {n: glue_starts.command(n, f"/w/{n}", data_dir="/data/wt2", budget_seconds=1800.0)
         for n in glue_starts.NAMES}
  for argv in got.values():
    assert argv[1] == os.path.join(helpers.REPO, "main.py") and "--mode=train" in argv
    assert "--config.train.max_wall_seconds=1800.0" in argv
    assert "--config.train.progress_bar=false" in argv
    assert "--config.data.data_dir=/data/wt2" in argv
  assert got["reversible_qwen3"][2].endswith("configs/wikitext2.py:cpu")
  assert {"--config.model.block=qwen3", "--config.model.backbone=reversible"} <= set(
      got["reversible_qwen3"])
  assert {"--config.model.block=qwen3", "--config.model.backbone=standard"} <= set(
      got["standard_qwen3"])
  assert got["opt"][2].endswith("configs/wikitext2.py:cpu_opt") and len(got["opt"]) == 8
  assert glue_starts.workdir_of(str(tmp_path), "opt") == str(tmp_path / "wt2_opt")
  assert glue_starts.glue_fields({"opt": "/a", "standard_qwen3": "/b"}) == {
      "opt_dir": "/a", "init_workdir_standard": "/b"}


def test_bad_arguments_are_one_config_error(tmp_path):
  with pytest.raises(ConfigError, match="no start model 'bert'"):
    glue_starts.ensure_starts(str(tmp_path), reporter=Reporter(verbose=False), data_dir="",
                              which=("opt", "bert"))
  with pytest.raises(ConfigError, match="budget_seconds=0"):
    glue_starts.ensure_starts(str(tmp_path), budget_seconds=0, reporter=Reporter(), data_dir="")
  with pytest.raises(ConfigError, match="level 'gpu'"):
    glue_starts.ensure_starts(str(tmp_path), reporter=Reporter(), data_dir="", level="gpu")
  assert not os.listdir(tmp_path)  # nothing created before the arguments are checked


def _touch(path, mtime):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if not os.path.exists(path):
    open(path, "w").close()
  os.utime(path, (mtime, mtime))


def test_finished_means_evaluated_and_plotted_after_the_latest_checkpoint(tmp_path):
  w = str(tmp_path)
  assert not glue_starts.is_finished(w)  # no checkpoint
  os.makedirs(os.path.join(w, "checkpoints", "100"))
  os.makedirs(os.path.join(w, "checkpoints", "200.orbax-checkpoint-tmp-1"))
  os.utime(os.path.join(w, "checkpoints", "100"), (1000, 1000))
  assert glue_starts.latest_checkpoint_step(w) == 100
  assert not glue_starts.is_finished(w)  # not evaluated
  _touch(os.path.join(w, "eval_best.json"), 2000)  # e.g. --mode=eval on a partial run
  assert not glue_starts.is_finished(w)
  _touch(os.path.join(w, "training_curves.png"), 2000)
  assert glue_starts.is_finished(w)
  os.makedirs(os.path.join(w, "checkpoints", "300"))  # trained on after that evaluation
  os.utime(os.path.join(w, "checkpoints", "300"), (3000, 3000))
  assert not glue_starts.is_finished(w)


@pytest.mark.slow
def test_pretrains_resumes_and_reuses_the_three_starts(tmp_path, real_data_dir):
  starts, env = str(tmp_path / "starts"), helpers.tiny_compile_env()
  kw = dict(budget_seconds=600.0, data_dir=real_data_dir, level="smoke", env=env)
  opt = glue_starts.workdir_of(starts, "opt")

  # An attempt that stops early (as an interrupted one would): one error line, a checkpoint.
  with pytest.raises(glue_starts.StartModelError, match="ended without its final evaluation"):
    glue_starts.ensure_starts(starts, reporter=Lines(), which=("opt",),
                              extra_args=SMOKE_ARGS + ("--config.train.stop_at_step=2",), **kw)
  assert glue_starts.latest_checkpoint_step(opt) == 2 and not glue_starts.is_finished(opt)
  spent = glue_starts.read_ledger(opt)["spent_seconds"]
  assert spent > 0

  rep = Lines()
  dirs = glue_starts.ensure_starts(starts, reporter=rep, extra_args=SMOKE_ARGS, **kw)
  assert dirs == {n: glue_starts.workdir_of(starts, n) for n in glue_starts.NAMES}
  for name, w in dirs.items():
    assert glue_starts.is_finished(w) and glue_starts.latest_checkpoint_step(w) == 4, name
    config = json.load(open(os.path.join(w, "config.json")))
    assert config["data"]["data_dir"] == real_data_dir
  assert json.load(open(os.path.join(dirs["opt"], "config.json")))["model"]["backbone"] == "opt"
  for name in ("reversible_qwen3", "standard_qwen3"):
    model = json.load(open(os.path.join(dirs[name], "config.json")))["model"]
    assert (model["backbone"], model["block"]) == (name.split("_")[0], "qwen3")
  # The opt workdir was resumed from step 2 with the budget left over from the first attempt.
  assert any(l.startswith("[opt] resuming from") for l in rep.lines), rep.lines
  record = glue_starts.read_ledger(opt)
  assert record["attempts"] == 2 and record["finished_step"] == 4
  log = open(os.path.join(opt, "pretrain.log")).read()
  budgets = re.findall(r"max_wall_seconds=([0-9.]+)", log)
  assert float(budgets[0]) == 600.0 and float(budgets[1]) == pytest.approx(600.0 - spent, abs=1)

  # Finished workdirs are reused: no child, nothing written.
  logs = {n: open(os.path.join(w, "pretrain.log")).read() for n, w in dirs.items()}
  t0 = time.time()
  rep = Lines()
  assert glue_starts.ensure_starts(starts, reporter=rep, extra_args=SMOKE_ARGS, **kw) == dirs
  assert time.time() - t0 < 2.0
  assert all("is finished" in l for l in rep.lines) and len(rep.lines) == 3
  assert logs == {n: open(os.path.join(w, "pretrain.log")).read() for n, w in dirs.items()}


def test_a_stop_request_is_forwarded_to_the_training_child(tmp_path):
  # SIGTERM (preemption) reaches only the GLUE process: the pretraining child must be told too,
  # or the run would go on for the rest of the child's 30 minutes.
  child = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: (print('saved', flush=True), sys.exit(143)))\n"
           "for i in range(600):\n  print('step', i, flush=True); time.sleep(0.05)\n")
  asked = []
  should_stop = lambda: asked.append(1) or len(asked) > 3
  record = {}
  t0 = time.time()
  code, last = glue_starts._attempt("opt", str(tmp_path), [sys.executable, "-c", child], QUIET,
                                    record, None, should_stop)
  assert code == 143 and last == "saved" and time.time() - t0 < 20
  assert record["attempts"] == 1 and record["spent_seconds"] > 0
