"""The adaptive softmax head (`model.head = "adaptive"`, bdiff_jax/models/adaptive_head.py).

* `head(h)` is a distribution over exactly the V words (log-probabilities summing to 1), for
  tied and untied heads, with and without biases;
* `token_nll(h, targets)` equals -head(h)[target] in value and gradient (float64, 1e-12) on its
  three paths: the gathered tail buffer, the exact fallback when a cluster overflows it, and a
  buffer as large as the rows;
* the unigram initialisation makes a head with zero kernels predict the unigram model exactly;
* the diffusion loss and bound through the objective equal their full computation from the
  network's log-probabilities, and the autoregressive likelihood is exact;
* bad settings are one `ConfigError`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax import models
from bdiff_jax.config import configuration
from bdiff_jax.diffusion import elbo
from bdiff_jax.diffusion import schedules
from bdiff_jax.errors import ConfigError
from bdiff_jax.models import adaptive_head
from bdiff_jax.train.builder import build_objective
from bdiff_jax.train import builder
from bdiff_jax.train import train_state
from tests.helpers import tiny_config

VOCAB, LENGTH, BATCH = 50, 16, 4
CUTOFFS = (10, 25)  # shortlist 0..9, tail 0: 10..24 (width 8), tail 1: 25..49 (width 4)


def _config(**model):
  kw = dict(head="adaptive", adaptive_cutoffs=CUTOFFS, adaptive_shrink=4, dtype="float64")
  kw.update(model)
  return tiny_config(**kw)


def _network(config):
  return builder.build_network(config.model, vocab_size=VOCAB, max_len=LENGTH, causal=False)


def _params(net):
  params = models.init_params(net, jax.random.key(0), seq_len=LENGTH)
  # Non-zero biases, so that every bias path is exercised.
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (x + jnp.linspace(-1.0, 1.0, x.size).reshape(x.shape)
                       if "bias" in jax.tree_util.keystr(path) else x), params)


def _rows_and_targets(num_rows=64, tail0=20, tail1=5):
  """Rows [R, 32] and targets: `tail0` in tail cluster 0, `tail1` in cluster 1, the rest in the
  shortlist, shuffled."""
  h = jax.random.normal(jax.random.key(1), (num_rows, 32), jnp.float64)
  rng = np.random.default_rng(0)
  targets = np.concatenate([rng.integers(10, 25, tail0), rng.integers(25, VOCAB, tail1),
                            rng.integers(0, 10, num_rows - tail0 - tail1)])
  return h, jnp.asarray(rng.permutation(targets), jnp.int32)


@pytest.mark.parametrize("tie,block", [(True, "simple"), (False, "simple"), (True, "qwen3")])
def test_head_is_a_distribution_over_the_vocabulary(tie, block):
  with jax.enable_x64(True):
    net = _network(_config(tie_embeddings=tie, block=block))
    params = _params(net)
    names = set(params)
    assert {"cluster_kernel", "tail0_proj", "tail1_proj"} <= names
    assert ("tail0_down" in names) == tie and ("tail0_kernel" in names) == (not tie)
    assert ("tail1_bias" in names) == (block == "simple")
    if block == "simple":
      assert params["head_bias"].shape == (CUTOFFS[0] + 2,)
      assert params["tail1_bias"].shape == (VOCAB - CUTOFFS[1],)
    if not tie:
      assert params["head"]["kernel"].shape == (32, CUTOFFS[0])
      assert params["tail0_kernel"].shape == (8, CUTOFFS[1] - CUTOFFS[0])  # 32 / 4
      assert params["tail1_kernel"].shape == (2, VOCAB - CUTOFFS[1])  # 32 / 16
    h, _ = _rows_and_targets()
    logp = net.apply({"params": params}, h, method="head")
    assert logp.shape == (64, VOCAB) and logp.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(jax.scipy.special.logsumexp(logp, axis=-1)), 0.0,
                               atol=1e-12)
    assert float(jnp.std(logp)) > 0.1  # not uniform
    # The network's call returns the same log-probabilities (what samplers and cloze read).
    tokens = jax.random.randint(jax.random.key(2), (BATCH, LENGTH), 0, VOCAB)
    t = jnp.full((BATCH,), 0.5)
    hidden = net.apply({"params": params}, tokens, t, return_hidden=True)
    np.testing.assert_array_equal(net.apply({"params": params}, tokens, t),
                                  net.apply({"params": params}, hidden, method="head"))


@pytest.mark.parametrize("fraction,tail0,paths", [
    (0.25, 12, "both clusters gathered (16 rows each)"),
    (0.25, 20, "cluster 0 overflows its 16 rows: the exact fallback"),
    (1.0, 20, "buffers as large as the rows"),
])
def test_token_nll_equals_the_log_probabilities_value_and_gradient(fraction, tail0, paths):
  with jax.enable_x64(True):
    net = _network(_config(tie_embeddings=False, adaptive_tail_capacity=fraction))
    params = _params(net)
    h, targets = _rows_and_targets(tail0=tail0)
    assert adaptive_head.tail_capacity(64, fraction) == (16 if fraction < 1 else 64)

    def ours(p, rows):
      return net.apply({"params": p}, rows, targets, method="token_nll")

    def reference(p, rows):
      logp = net.apply({"params": p}, rows, method="head")
      return -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]

    np.testing.assert_allclose(np.asarray(jax.jit(ours)(params, h)),
                               np.asarray(reference(params, h)), rtol=1e-12, err_msg=paths)
    weights = jnp.linspace(0.5, 2.0, 64)
    g_ours = jax.jit(jax.grad(lambda p, x: jnp.sum(weights * ours(p, x)), argnums=(0, 1)))(
        params, h)
    g_ref = jax.grad(lambda p, x: jnp.sum(weights * reference(p, x)), argnums=(0, 1))(params, h)
    for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12,
                                 err_msg=paths)


def test_unigram_initialisation_predicts_the_unigram_model():
  with jax.enable_x64(True):
    config = _config(tie_embeddings=True)
    net = _network(config)
    counts = np.arange(VOCAB, 0, -1).astype(np.float64) ** 1.5  # frequency-sorted ids
    unigram = jnp.asarray(np.log(counts / counts.sum()))
    rule = builder.build_update_rule(config.train)
    state = train_state.init_train_state(net, rule, seed=0, seq_len=LENGTH, head_bias=unigram)
    # Zero every kernel of the head (the tied head's kernels are the embedding rows).
    params = dict(state.params, cluster_kernel=jnp.zeros_like(state.params["cluster_kernel"]),
                  embed={"embedding": jnp.zeros_like(state.params["embed"]["embedding"])})
    h, _ = _rows_and_targets()
    logp = net.apply({"params": params}, h, method="head")
    np.testing.assert_allclose(np.asarray(logp), np.broadcast_to(unigram, logp.shape),
                               atol=1e-12)


def test_diffusion_loss_and_bound_equal_the_full_computation():
  """The objective's gathered loss and bound (the network's token_nll at masked positions)
  equal `diffusion_loss` / `nll_bound` over the network's full log-probabilities (the count
  estimator of the presets; the head does not depend on the estimator)."""
  estimator = "count"
  with jax.enable_x64(True):
    config = _config(tie_embeddings=True, adaptive_tail_capacity=0.25)
    config.diffusion.estimator = estimator
    objective = build_objective(config, mask_id=VOCAB)
    net = _network(config)
    params = _params(net)
    tokens = jax.random.randint(jax.random.key(3), (BATCH, LENGTH), 0, VOCAB)
    key = jax.random.key(4)
    kw = dict(schedule=schedules.linear(), mask_id=VOCAB, estimator=estimator)

    def gathered(p):
      return objective.loss(models.bind(net, p, train=False), tokens, key)[0]

    def full(p):
      apply = models.bind(net, p, train=False)
      return elbo.diffusion_loss(lambda z, t: apply(z, t), tokens, key, **kw)[0]

    (v0, g0), (v1, g1) = (jax.jit(jax.value_and_grad(f))(params) for f in (gathered, full))
    np.testing.assert_allclose(float(v0), float(v1), rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
    valid = jnp.arange(LENGTH)[None, :] < jnp.asarray([16, 9, 1, 16])[:, None]
    apply = models.bind(net, params, train=False)
    bound = objective.sequence_nll(apply, tokens, valid, key, num_samples=3)
    reference = elbo.nll_bound(lambda z, t: apply(z, t, padding_mask=valid), tokens, key,
                                    num_samples=3, valid=valid, **kw)
    np.testing.assert_allclose(np.asarray(bound), np.asarray(reference), rtol=1e-12)


def test_autoregressive_likelihood_is_exact():
  """An AR model with an adaptive head: sequence NLLs of all V^L sequences sum to 1."""
  with jax.enable_x64(True):
    vocab, length = 7, 2
    config = tiny_config(head="adaptive", adaptive_cutoffs=(2, 4), adaptive_shrink=2,
                         dtype="float64", objective="autoregressive", time_conditioning="none")
    objective = build_objective(config, mask_id=vocab)
    net = builder.build_network(config.model, vocab_size=vocab, max_len=length, causal=True)
    params = _params(net)
    grid = jnp.stack(jnp.meshgrid(*[jnp.arange(vocab)] * length, indexing="ij"),
                     -1).reshape(-1, length)
    nll = objective.sequence_nll(models.bind(net, params, train=False), grid,
                                 jnp.ones(grid.shape, bool), None, num_samples=1)
    np.testing.assert_allclose(float(jnp.sum(jnp.exp(-nll))), 1.0, rtol=1e-12)


@pytest.mark.parametrize("model,words", [
    (dict(adaptive_cutoffs=()), "is empty"),
    (dict(adaptive_cutoffs=(10, 10)), "strictly increasing"),
    (dict(adaptive_cutoffs=(0, 10)), "strictly increasing"),
    (dict(adaptive_shrink=0), "integer >= 1"),
    (dict(adaptive_shrink=8), "no dimension"),  # 32 / 8^2 < 1
    (dict(adaptive_tail_capacity=0.0), "adaptive_tail_capacity"),
    (dict(head="softmax"), "model.head"),
])
def test_bad_settings_are_one_config_error(model, words):
  with pytest.raises(ConfigError, match=words):
    _config(**model)


def test_cutoffs_beyond_the_vocabulary_and_opt_are_refused():
  with pytest.raises(ConfigError, match=r"below the vocabulary size \(20\)"):
    builder.build_network(_config(adaptive_cutoffs=(10, 25)).model, vocab_size=20, max_len=LENGTH,
                          causal=False)
  c = configuration.base_config()
  c.model.update(backbone="opt", objective="autoregressive", time_conditioning="none",
                 head="adaptive")
  with pytest.raises(ConfigError, match="not available for backbone 'opt'"):
    configuration.validate(c)
