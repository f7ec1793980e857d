"""The start probe (bdiff_jax/glue/probe.py): a linear readout of the start model's features
where a prompt row reads its candidates, and the objectives' readout it is fitted on."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax import models
from bdiff_jax.errors import ConfigError
from bdiff_jax.glue import objectives as classification
from bdiff_jax.glue import probe as glue_probe
from bdiff_jax.models.classifier import OPTLM
from bdiff_jax.models.hf_checkpoint import load_opt
from tests import helpers


def _two_classes(n, d, signal, seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  features = rng.normal(size=(n, d))
  features[:, 0] += signal * (2 * labels - 1)
  return features, labels


@pytest.mark.parametrize("signal,low,high", [(4.0, 0.95, 1.0), (0.0, 0.3, 0.7)])
def test_probe_reads_what_the_features_carry(signal, low, high):
  x, y = _two_classes(400, 8, signal, 0)
  xd, yd = _two_classes(400, 8, signal, 1)
  out = glue_probe.start_probe("SST-2", x, y, {"dev": (xd, yd, None)}, regression=False,
                               num_labels=2)
  assert low <= out["dev"]["accuracy"] <= high, out


def test_probe_regression_and_shifted_scaled_features():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 4)) * 1e3 + 5e3  # standardised before the fit
  score = np.clip(2.5 + (x[:, 1] - 5e3) / 1e3, 0, 5)
  out = glue_probe.start_probe("STS-B", x[:200], score[:200],
                               {"dev": (x[200:], score[200:], None)}, regression=True,
                               num_labels=1)
  assert out["dev"]["pearson"] > 0.9


def test_probe_indices_are_capped_drawn_by_the_seed_and_sorted():
  assert glue_probe.probe_indices(10, 0, cap=20).tolist() == list(range(10))
  a, b = glue_probe.probe_indices(100, 0, cap=10), glue_probe.probe_indices(100, 1, cap=10)
  assert len(a) == 10 and list(a) == sorted(set(a)) and not np.array_equal(a, b)
  assert np.array_equal(a, glue_probe.probe_indices(100, 0, cap=10))


def test_probe_refuses_empty_features():
  with pytest.raises(ConfigError, match="shape"):
    glue_probe.start_probe("SST-2", np.zeros((0, 3)), np.zeros(0), {}, regression=False,
                           num_labels=2)


def test_readout_is_the_hidden_state_the_candidates_are_scored_from():
  cfg, opt_params = load_opt(os.path.join(helpers.REPO, "tests", "fixtures", "tiny_opt"))
  net, params = OPTLM(cfg), {"opt": opt_params}
  apply = models.bind(net, params, train=False)
  rng = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(rng.integers(4, 50, (3, 9)), jnp.int32),
           "padding": jnp.ones((3, 9), bool), "label_pos": jnp.asarray([8, 5, 2], jnp.int32),
           "candidate_ids": jnp.asarray([[7, 9]] * 3, jnp.int32),
           "target": jnp.asarray([[1.0, 0.0]] * 3)}
  objective = classification.CausalPrompt()
  scores, h = objective.scores_and_readout(apply, batch)
  np.testing.assert_allclose(scores, objective.scores(apply, batch), rtol=1e-6)
  full = apply.hidden(batch["inputs"], None, padding_mask=batch["padding"])
  np.testing.assert_allclose(h, full[np.arange(3), batch["label_pos"]], rtol=1e-5, atol=1e-6)
  # The scores are the tied head's log-probabilities of the candidates at that hidden state.
  logp = jax.nn.log_softmax(h @ params["opt"]["embed_tokens"]["embedding"].T, axis=-1)
  np.testing.assert_allclose(scores, np.asarray(logp)[:, [7, 9]], rtol=1e-5, atol=1e-5)
  # Candidates read at several positions (a span batch) or a pooled head: no readout.
  assert classification.PooledHead(causal=True, time_conditioned=False).scores_and_readout(
      lambda *a, **k: jnp.zeros((3, 2)), batch)[1] is None
