"""Sample quality (bdiff_jax/sample_quality.py): the metrics, and the judge's NLL against its
evaluator."""

import math

import jax
import numpy as np
import pytest

from bdiff_jax import models, sample_quality
from bdiff_jax.errors import ConfigError
from bdiff_jax.evaluator import Evaluator
from bdiff_jax.objective import build_objective
from tests.helpers import tiny_config

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
  net = models.build_network(c.model, vocab_size=vocab, max_len=seq_len, causal=True)
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
