"""Count baselines: normalised, fitted on train only, scored on the evaluator's blocks."""

import math
import types

import numpy as np

from bdiff_jax.evaluation import baselines


def _splits(train, valid, test, vocab):
  return types.SimpleNamespace(train=np.asarray(train, np.int32), valid=np.asarray(valid, np.int32),
                               test=np.asarray(test, np.int32),
                               tokenizer=types.SimpleNamespace(vocab_size=vocab))


def test_unigram_is_add_one_and_blocks_change_nothing():
  train = [0, 0, 1, 2, 0, 1]
  valid = [0, 1, 2, 0, 1]
  s = _splits(train, valid, valid, 4)
  out = baselines.compute(s, seq_len=2)
  counts = np.array([3, 2, 1, 0]) + 1.0
  logp = np.log(counts / counts.sum())
  expected = -sum(logp[t] for t in valid)
  assert math.isclose(out["unigram"]["valid"]["nll_per_token"], expected / 5, rel_tol=1e-12)
  assert math.isclose(out["unigram"]["valid"]["word_ppl"], math.exp(expected / 5), rel_tol=1e-12)


def test_bigram_is_normalised_and_uses_block_context_only():
  rng = np.random.default_rng(0)
  train = rng.integers(0, 5, 400)
  s = _splits(train, train[:50], train[:50], 5)
  uni = baselines.unigram_log_probs(train, 5)
  bigram = baselines._Bigram(train, 5)  # pylint: disable=protected-access
  for prev in range(5):
    ml, seen = bigram.ml(np.full(5, prev), np.arange(5))
    p = 0.4 * ml + 0.6 * np.exp(uni)
    assert seen.all() and math.isclose(p.sum(), 1.0, rel_tol=1e-12)
  # Scoring in blocks of 1 leaves no context at all: the bigram equals the unigram.
  out = baselines.compute(s, seq_len=1)
  assert math.isclose(out["bigram"]["valid"]["nll_per_token"],
                      out["unigram"]["valid"]["nll_per_token"], rel_tol=1e-12)
  # With context on a strongly sequential stream the bigram wins clearly.
  cyc = np.tile(np.arange(5), 100)
  out = baselines.compute(_splits(cyc, cyc[:60], cyc[:60], 5), seq_len=20)
  assert out["bigram"]["valid"]["word_ppl"] < 0.5 * out["unigram"]["valid"]["word_ppl"]
  assert 0.0 < out["bigram"]["lambda"] < 1.0


def test_lambda_is_chosen_on_train_only():
  rng = np.random.default_rng(1)
  train = rng.integers(0, 6, 600)
  a = baselines.compute(_splits(train, rng.integers(0, 6, 80), rng.integers(0, 6, 80), 6),
                        seq_len=16)
  b = baselines.compute(_splits(train, np.tile([0, 1], 40), np.tile([2, 3], 40), 6), seq_len=16)
  assert a["bigram"]["lambda"] == b["bigram"]["lambda"]


def test_cached_round_trip(tmp_path):
  s = _splits([0, 1, 2, 0, 1, 2, 0], [0, 1, 2], [2, 1, 0], 3)
  first = baselines.cached(s, str(tmp_path), seq_len=2)
  assert len(list(tmp_path.glob("baselines_*.json"))) == 1
  assert baselines.cached(s, str(tmp_path), seq_len=2) == first
  assert "word ppl" in baselines.format_baselines(first)
