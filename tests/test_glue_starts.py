"""The GLUE start models pretrained by the train mode (bdiff_jax/modes/glue_starts.py).

* the commands are the train mode's (what a user runs by hand), one per row model;
* a workdir is finished only when the train mode's end wrote its evaluation and plot after the
  latest checkpoint;
* every level's command is a valid train-mode config of its row model (parsed as main.py parses
  it, in this process);
* (slow) smoke-sized pretraining of a start model: an attempt stopped early is one
  `StartModelError` line and is resumed by the next call with the budget that is left; a
  finished workdir is reused without starting a child. (One model, the OPT start: the three
  commands differ only in the overrides the test above checks, and each child costs a cold
  compile of its own programs.)
"""

import json
import os
import re
import sys
import time

from absl import flags
import pytest
from ml_collections import config_flags

from bdiff_jax.config import configuration
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


def _parsed(argv):
  """The config main.py would run for `argv` (its --config flags, parsed by ml_collections as
  main.py parses them), validated."""
  args = [argv[0]] + [a for a in argv[2:] if a.startswith("--config")]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=args)
  values(args)
  configuration.validate(values.config)
  return values.config


@pytest.mark.parametrize("level", sorted(glue_starts.LEVELS))
def test_every_command_is_a_valid_config_of_its_row_model(level):
  for name in glue_starts.NAMES:
    c = _parsed(glue_starts.command(name, "/w", data_dir="/data/wt2", budget_seconds=60.0,
                                    level=level))
    assert c.train.max_wall_seconds == 60.0 and c.data.data_dir == "/data/wt2", name
    if name == "opt":
      assert (c.model.backbone, c.model.objective, c.model.positional) == (
          "opt", "autoregressive", "learned")
    else:
      assert (c.model.backbone, c.model.block, c.model.objective) == (
          name.split("_")[0], "qwen3", "diffusion"), name
    if level == "cpu" and name != "opt":
      assert c.train.num_steps == 5000


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
def test_pretrains_resumes_and_reuses_a_start(tmp_path, real_data_dir):
  starts, env = str(tmp_path / "starts"), helpers.tiny_compile_env()
  kw = dict(budget_seconds=600.0, data_dir=real_data_dir, level="smoke", env=env,
            which=("opt",))
  opt = glue_starts.workdir_of(starts, "opt")

  # An attempt that stops early (as an interrupted one would): one error line, a checkpoint.
  with pytest.raises(glue_starts.StartModelError, match="ended without its final evaluation"):
    glue_starts.ensure_starts(starts, reporter=Lines(),
                              extra_args=SMOKE_ARGS + ("--config.train.stop_at_step=2",), **kw)
  assert glue_starts.latest_checkpoint_step(opt) == 2 and not glue_starts.is_finished(opt)
  spent = glue_starts.read_ledger(opt)["spent_seconds"]
  assert spent > 0

  rep = Lines()
  assert glue_starts.ensure_starts(starts, reporter=rep, extra_args=SMOKE_ARGS, **kw) == {
      "opt": opt}
  assert glue_starts.is_finished(opt) and glue_starts.latest_checkpoint_step(opt) == 4
  config = json.load(open(os.path.join(opt, "config.json")))
  assert config["data"]["data_dir"] == real_data_dir and config["model"]["backbone"] == "opt"
  # The workdir was resumed from step 2 with the budget left over from the first attempt.
  assert any(l.startswith("[opt] resuming from") for l in rep.lines), rep.lines
  record = glue_starts.read_ledger(opt)
  assert record["attempts"] == 2 and record["finished_step"] == 4
  log = open(os.path.join(opt, "pretrain.log")).read()
  budgets = re.findall(r"max_wall_seconds=([0-9.]+)", log)
  assert float(budgets[0]) == 600.0 and float(budgets[1]) == pytest.approx(600.0 - spent, abs=1)

  # A finished workdir is reused: no child, nothing written.
  before = open(os.path.join(opt, "pretrain.log")).read()
  t0 = time.time()
  rep = Lines()
  assert glue_starts.ensure_starts(starts, reporter=rep, extra_args=SMOKE_ARGS, **kw) == {
      "opt": opt}
  assert time.time() - t0 < 2.0
  assert len(rep.lines) == 1 and "is finished" in rep.lines[0], rep.lines
  assert open(os.path.join(opt, "pretrain.log")).read() == before


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
