"""Sample quality (bdiff_jax/evaluation/sample_quality.py) and its table in `--mode=sample`.

Unit tests of the metrics, the judge's NLL against its evaluator, and end to end on two tiny
workdirs trained here on a synthetic corpus (a diffusion model and its autoregressive judge).
"""

import io
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from bdiff_jax import models
from bdiff_jax.data import wikitext2
from bdiff_jax.errors import ConfigError
from bdiff_jax.evaluation import sample_quality
from bdiff_jax.evaluation.evaluator import Evaluator
from bdiff_jax.modes import sample as sample_mode
from bdiff_jax.modes import train as train_mode
from bdiff_jax.train.builder import build_objective
from bdiff_jax.runtime.reporter import Reporter
from bdiff_jax.train import builder
from tests.helpers import SMOKE, run_main, tiny_config

# ------------------------------------------------------------------------------------ metrics


def test_entropy_of_constant_and_distinct_rows():
  rows = np.array([[7] * 16, list(range(16)), [3, 4] * 8])
  np.testing.assert_allclose(sample_quality.unigram_entropy(rows),
                             [0.0, math.log(16), math.log(2)], rtol=1e-12, atol=0)
  assert sample_quality.mean_entropy(rows) == pytest.approx((math.log(16) + math.log(2)) / 3)


def test_repeating_row_has_low_entropy():
  rng = np.random.default_rng(0)
  text = rng.integers(0, 1000, size=(1, 64))
  repeating = np.full((1, 64), 11)
  repeating[0, ::16] = [1, 2, 3, 4]  # a few other tokens among the repetition
  low, high = sample_quality.unigram_entropy(np.concatenate([repeating, text]))
  assert low < 0.5 < 3.5 < high, (low, high)
  row = sample_quality.score("rep", None, repeating)
  assert row["gen_ppl"] is None and row["entropy"] == pytest.approx(low)


def test_real_text_rows_are_spread_blocks():
  stream = np.arange(100)
  rows = sample_quality.real_text_rows(stream, 10, 3)
  assert rows.tolist() == [list(range(0, 10)), list(range(30, 40)), list(range(60, 70))]
  assert sample_quality.real_text_rows(stream, 40, 5).shape == (2, 40)  # all there are
  with pytest.raises(ConfigError, match=r"fewer than config\.sample\.length=200.* Fix: "):
    sample_quality.real_text_rows(stream, 200, 2)


@pytest.mark.parametrize("length", [16, 10])  # whole blocks; rows padded to the block length
def test_gen_ppl_equals_the_judges_exact_nll(length):
  c = tiny_config(objective="autoregressive", time_conditioning="none")
  vocab, seq_len = 50, c.data.seq_len
  objective = build_objective(c, mask_id=vocab)
  net = builder.build_network(c.model, vocab_size=vocab, max_len=seq_len, causal=True)
  params = models.init_params(net, jax.random.PRNGKey(0), seq_len=seq_len)
  evaluator = Evaluator(objective, net, seq_len=seq_len, batch_size=4, num_time_samples=1)
  rows = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (6, length), 0, vocab), np.int32)
  key = jax.random.PRNGKey(2)
  judged = sample_quality.score("x", None, rows,
                                judge_nll=lambda r: evaluator.rows_nll(params, r, key))
  # The sequence NLL straight from the objective, unpadded, one batch.
  direct = np.asarray(jax.jit(lambda p, t: objective.sequence_nll(
      models.bind(net, p, train=False), t, np.ones(t.shape, bool), key, num_samples=1))(
          params, rows), np.float64)
  np.testing.assert_allclose(judged["nll_per_sample"], direct, rtol=2e-5)
  assert judged["gen_ppl"] == pytest.approx(math.exp(direct.sum() / rows.size), rel=2e-5)
  assert 10 < judged["gen_ppl"] < 500  # a random model: about the vocabulary size
  if length == seq_len:  # the evaluator's own split NLL on the same blocks: the same program
    total, count = evaluator.split_nll(params, rows.reshape(-1), key)
    assert count == rows.size
    assert judged["gen_ppl"] == pytest.approx(math.exp(total / count), rel=1e-12)


# ------------------------------------------------------------------------------ end to end

NUM_STEPS = 8  # the samples' step count; the table adds 2


def _config(corpus, cache, **model):
  c = tiny_config(**model)
  c.data.data_dir, c.data.tfds_dir, c.data.verify_counts = str(corpus), str(cache), False
  c.train.num_steps, c.train.log_every, c.train.progress_bar = 4, 2, False
  c.train.eval_every = c.train.checkpoint_every = 4
  c.eval.seeds = (0,)
  c.sample.num_samples, c.sample.length, c.sample.num_steps = 3, 12, NUM_STEPS
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config of the diffusion model, its workdir, the AR judge's workdir), trained 4 steps."""
  root = tmp_path_factory.mktemp("quality")
  corpus = wikitext2.write_synthetic_corpus(root / "src", num_train_lines=60)
  diffusion = _config(corpus, root / "cache")
  judge = _config(corpus, root / "cache", objective="autoregressive", time_conditioning="none")
  for config, name in ((diffusion, "diffusion"), (judge, "ar")):
    result = train_mode.run(config, str(root / name), Reporter(verbose=False))
    assert result.evaluated
  return diffusion, root / "diffusion", root / "ar"


def _json(path):
  with open(path) as f:
    return json.load(f)


def test_sample_mode_writes_the_quality_table(trained):
  config, workdir, judge = trained
  # Training's own samples: the table without a judge (entropies only), at sample.num_steps.
  after_training = _json(workdir / "sample_quality_step4.json")
  assert [r["name"] for r in after_training["rows"]] == [f"diffusion@{NUM_STEPS}", "real"]
  assert all(r["gen_ppl"] is None for r in after_training["rows"])
  # A workdir from before these settings: its config.json lacks them.
  saved = _json(workdir / "config.json")
  del saved["sample"]["judge_workdir"], saved["sample"]["quality_steps"]
  with open(workdir / "config.json", "w") as f:
    json.dump(saved, f)
  config = config.copy_and_resolve_references()
  config.sample.judge_workdir, config.sample.quality_steps = str(judge), f"2,{NUM_STEPS}"
  out = io.StringIO()
  texts = sample_mode.run(config, str(workdir), Reporter(stream=out))
  assert len(texts) == 3
  table = _json(workdir / "sample_quality_step4_1.json")  # the training's file is kept
  assert _json(workdir / "sample_quality_step4.json") == after_training
  names = [r["name"] for r in table["rows"]]
  assert names == ["diffusion@2", f"diffusion@{NUM_STEPS}", "ar", "real"]
  assert [r["num_steps"] for r in table["rows"]] == [2, NUM_STEPS, None, None]
  for r in table["rows"]:
    assert r["num_tokens"] == 3 * 12 and len(r["nll_per_sample"]) == 3
    assert 1.0 < r["gen_ppl"] < 1e4 and 0.0 <= r["entropy"] <= math.log(12) + 1e-9, r
    assert r["gen_ppl"] == pytest.approx(math.exp(sum(r["nll_per_sample"]) / 36))
  s = table["settings"]
  assert s["judge_workdir"] == str(judge) and s["judge_step"] == 4 and s["steps"] == [2, 8]
  assert (s["temperature"], s["seed"], s["length"], s["num_samples"]) == (1.0, 0, 12, 3)
  printed = out.getvalue()
  assert "sample quality:" in printed and "diffusion@2" in printed and "real" in printed
  # The samples file is written as before, next to it.
  assert os.path.exists(workdir / "samples_step4_1.txt")


def _main_args(config, workdir, *extra):
  return ["--config", SMOKE, "--workdir", str(workdir), "--mode=sample",
          f"--config.data.data_dir={config.data.data_dir}",
          f"--config.data.tfds_dir={config.data.tfds_dir}", "--config.data.verify_counts=false",
          "--config.sample.length=12", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["diffusion", "missing"])
def test_wrong_judge_is_one_line_through_main(trained, tmp_path, which):
  config, workdir, _ = trained
  judge = workdir if which == "diffusion" else tmp_path / "nowhere"
  before = sorted(os.listdir(workdir))
  proc = run_main(_main_args(config, workdir, f"--config.sample.judge_workdir={judge}"))
  assert proc.returncode not in (0, None), proc.stdout + proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert "config.sample.judge_workdir=" in lines[0] and " Fix: " in lines[0], lines[0]
  assert ("'diffusion' model" if which == "diffusion" else "no such directory") in lines[0]
  assert sorted(os.listdir(workdir)) == before  # refused before sampling or writing


def _copy_without_checkpoints(src, dst):
  shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names
                                                     if n.startswith("checkpoints")])
  return dst


def test_judge_refusals(trained, tmp_path):
  config, workdir, judge = trained
  cases = {
      "blocks of 16 tokens, shorter than config.sample.length=32": (judge, {"length": 32}),
      "has no checkpoint": (_copy_without_checkpoints(judge, tmp_path / "empty"), {}),
      "is not the workdir of a trained run": (tmp_path, {}),
  }
  other_vocab = _copy_without_checkpoints(judge, tmp_path / "vocab")
  spec = _json(other_vocab / "vocab.json")
  spec["words"] = spec["words"][::-1]
  with open(other_vocab / "vocab.json", "w") as f:
    json.dump(spec, f)
  cases["has another vocabulary"] = (other_vocab, {})
  for needle, (path, sample) in cases.items():
    c = config.copy_and_resolve_references()
    c.sample.judge_workdir = str(path)
    for k, v in sample.items():
      c.sample[k] = v
    with pytest.raises(ConfigError, match=r"config\.sample\.judge_workdir=.* Fix: ") as info:
      sample_mode.run(c, str(workdir), Reporter(verbose=False))
    assert needle in str(info.value) and "\n" not in str(info.value)
  # Training checks the judge before its first step (not after the run).
  c = config.copy_and_resolve_references()
  c.sample.judge_workdir = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match=r"judge_workdir=.*: no such directory\. Fix: "):
    train_mode.run(c, str(tmp_path / "run"), Reporter(verbose=False))
  assert not os.path.exists(tmp_path / "run")
