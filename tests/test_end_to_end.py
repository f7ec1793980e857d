"""End to end, through main.py in new processes, on the real WikiText-2 (smoke preset).

Covers: train -> eval/sample in a new process reproduce the numbers; resume equivalence; bad
inputs give one clear line, exit status != 0, and leave checkpoints untouched. The runs use the
main command's backbone (reversible), at a learning rate that shows the loss falling in 8 steps;
other end-to-end modules (test_reliability, test_multiprocess_modes) run the smoke preset's
standard backbone.
"""

import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pytest

from tests.helpers import (NARROW_SMOKE, assert_ok, config_flags_of, run_main, smoke_args,
                           train_losses)

# Every test here runs main.py in new processes; they compile fast (conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tiny_compile_children")]

CONFIG = "configs/wikitext2.py:smoke"


REVERSIBLE = ("--config.model.backbone=reversible", "--config.train.learning_rate=1e-2")


def _tiny(workdir, data_dir, tfds_dir, *extra):
  """Args for a very small smoke run of the reversible backbone, 2 x 32 wide
  (helpers.NARROW_SMOKE; 8 steps; the final evaluation on 300 tokens: 10 sequences of 32, two
  batches of 8)."""
  return smoke_args(workdir, data_dir, tfds_dir, *config_flags_of(NARROW_SMOKE), *REVERSIBLE,
                    *extra)


def _user_error(proc, *needles):
  assert proc.returncode not in (0, None), proc.stdout + proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, f"expected one 'error:' line\nSTDERR:\n{proc.stderr}"
  assert "Traceback" not in proc.stderr, proc.stderr
  for n in needles:
    assert n.lower() in lines[0].lower(), lines[0]
  return lines[0]


def _tree_digest(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      p = os.path.join(root, name)
      h.update(os.path.relpath(p, path).encode())
      with open(p, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, real_data_dir, shared_tfds_dir):
  workdir = tmp_path_factory.mktemp("smoke")
  proc = assert_ok(run_main(_tiny(workdir, real_data_dir, shared_tfds_dir)))
  return workdir, proc


def test_train_eval_restore_identical(trained, real_data_dir, shared_tfds_dir):
  workdir, proc = trained
  assert "UPPER BOUNDS" in proc.stdout and "reversible backbone" in proc.stdout
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, 9))
  assert np.mean([losses[s] for s in (6, 7, 8)]) < np.mean([losses[s] for s in (1, 2, 3)])
  # Training ended with samples from the evaluated checkpoint: no [MASK] in them.
  samples = [f for f in os.listdir(workdir) if f.startswith("samples_step")]
  assert len(samples) == 1 and "[MASK]" not in open(os.path.join(workdir, samples[0])).read()
  with open(os.path.join(workdir, "eval_best.json")) as f:
    after_training = json.load(f)
  for name in ("valid", "test"):
    r = after_training["results"][name]
    assert r["upper_bound"] and len(r["word_ppl_per_seed"]) == 3
    assert 1.0 < r["word_ppl"] < 1e6
  for f in ("metrics.jsonl", "training_curves.png", "vocab.json", "config.json"):
    assert os.path.exists(os.path.join(workdir, f)), f
  if sys.platform.startswith("linux"):  # each train record says what the process holds
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      train = [r for r in map(json.loads, f) if r["kind"] == "train"]
    assert train and all(0 < r["host_rss_mib"] <= r["host_peak_rss_mib"] for r in train), train
    assert all(a["host_peak_rss_mib"] <= b["host_peak_rss_mib"] for a, b in zip(train, train[1:]))
  # A new process restores the same checkpoint and reproduces the numbers exactly.
  assert_ok(run_main(_tiny(workdir, real_data_dir, shared_tfds_dir, "--mode=eval")))
  with open(os.path.join(workdir, "eval_best.json")) as f:
    again = json.load(f)
  assert again == after_training


def test_sample_new_process(trained, real_data_dir, shared_tfds_dir):
  workdir, _ = trained
  assert_ok(run_main(_tiny(workdir, real_data_dir, shared_tfds_dir, "--mode=sample",
                          "--prompt=the game was [MASK] in")))
  files = [f for f in os.listdir(workdir) if f.startswith("samples_step")]
  assert files
  text = open(os.path.join(workdir, files[0])).read()
  assert "[MASK]" not in text.split("\n", 1)[1]  # header repeats the prompt; samples must not
  body = text.split("\n", 1)[1]
  for block in body.split("--- sample ")[1:]:
    words = block.split("\n", 1)[1].split()
    assert words[:3] == ["the", "game", "was"] and words[4] == "in", words[:6]


def test_resume_identical(trained, tmp_path, real_data_dir, shared_tfds_dir):
  """A new process resumed from the step-4 checkpoint of the straight 8-step run (what a run
  stopped there leaves) trains steps 5-8 with the straight run's losses bit for bit, after
  dropping the metrics records the checkpoint does not cover."""
  straight, _ = trained  # 8 steps in one process, checkpoints at steps 4 and 8
  split = tmp_path / "split"
  shutil.copytree(straight, split)
  for sub in ("checkpoints", "checkpoints_best"):
    shutil.rmtree(split / sub / "8", ignore_errors=True)
  assert sorted(os.listdir(split / "checkpoints")) == ["4"]
  proc = assert_ok(run_main(_tiny(split, real_data_dir, shared_tfds_dir)))
  assert "resuming from latest step 4" in proc.stdout
  # (steps 5-8 and the step-8 evaluation)
  assert "dropped 5 metrics records after step 4" in proc.stdout, proc.stdout
  a, b = train_losses(straight), train_losses(split)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  assert a == b  # bit-identical losses


def test_unknown_prompt_word(trained, real_data_dir, shared_tfds_dir):
  workdir, _ = trained
  before = _tree_digest(os.path.join(workdir, "checkpoints"))
  proc = run_main(_tiny(workdir, real_data_dir, shared_tfds_dir, "--mode=sample",
                        "--config.sample.prompt=the zqxjkv game"))
  _user_error(proc, "zqxjkv")
  assert _tree_digest(os.path.join(workdir, "checkpoints")) == before


def test_no_data_directory(tmp_path, shared_tfds_dir):
  proc = run_main(_tiny(tmp_path / "w", tmp_path / "missing", tmp_path / "tfds"))
  _user_error(proc, "missing")


def test_truncated_data_file(tmp_path, real_data_dir):
  data = tmp_path / "data"
  shutil.copytree(real_data_dir, data)
  valid = data / "wiki.valid.tokens"
  os.chmod(valid, 0o644)
  content = valid.read_bytes()
  valid.write_bytes(content[: len(content) // 2])
  proc = run_main(_tiny(tmp_path / "w", data, tmp_path / "tfds"))
  _user_error(proc, "wiki.valid.tokens")


def test_unknown_config_key(tmp_path, real_data_dir, shared_tfds_dir):
  proc = run_main(_tiny(tmp_path / "w", real_data_dir, shared_tfds_dir,
                        "--config.train.learning_rat=0.1"))
  assert proc.returncode != 0
  assert "learning_rat" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_negative_learning_rate(tmp_path, real_data_dir, shared_tfds_dir):
  proc = run_main(_tiny(tmp_path / "w", real_data_dir, shared_tfds_dir,
                        "--config.train.learning_rate=-0.001"))
  _user_error(proc, "learning_rate")


def test_corrupt_checkpoint_untouched(trained, tmp_path, real_data_dir, shared_tfds_dir):
  workdir, _ = trained
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  latest = max(int(d) for d in os.listdir(copy / "checkpoints") if d.isdigit())
  state_dir = copy / "checkpoints" / str(latest) / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:  # scribble over every file of the state item
        size = os.path.getsize(path)
        f.write(b"\x00garbage" * max(1, size // 8))
  before = _tree_digest(copy / "checkpoints")
  for mode_args in (["--mode=eval", "--config.eval.checkpoint=latest"],
                    ["--config.train.num_steps=12"]):  # resume must refuse too
    proc = run_main(_tiny(copy, real_data_dir, shared_tfds_dir, *mode_args))
    _user_error(proc, "checkpoint")
    assert _tree_digest(copy / "checkpoints") == before


def test_nan_loss_stops_and_keeps_checkpoint(trained, tmp_path, real_data_dir, shared_tfds_dir):
  workdir, _ = trained
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  steps_before = sorted(int(d) for d in os.listdir(copy / "checkpoints") if d.isdigit())
  before = {s: _tree_digest(copy / "checkpoints" / str(s)) for s in steps_before}
  # Continue the run with an absurd learning rate: the loss blows up to inf/nan.
  proc = run_main(_tiny(copy, real_data_dir, shared_tfds_dir, "--config.train.num_steps=40",
                        "--config.train.learning_rate=1e30", "--config.train.warmup_steps=0",
                        "--config.train.grad_clip=0"))
  line = _user_error(proc, "loss became")
  assert "untouched" in line
  steps_after = sorted(int(d) for d in os.listdir(copy / "checkpoints") if d.isdigit())
  assert steps_after[: len(steps_before)] == steps_before
  for s in steps_before:  # every good checkpoint is still there, byte for byte
    assert _tree_digest(copy / "checkpoints" / str(s)) == before[s]
