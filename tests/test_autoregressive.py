"""The autoregressive (AR) baseline: exact likelihood, and train/resume/eval/sample end to end.

Exactness (in-process, tiny random networks):
  * `Autoregressive.sequence_nll` equals the chain rule computed independently, one prefix at a time
    (the network evaluated on [BOS, x_0 .. x_{i-1}] alone, no masking involved);
  * exp(-nll) sums to 1 over *all* sequences of a tiny vocabulary: a normalised distribution.

End to end on the real WikiText-2 (smoke preset, objective=autoregressive): `main.py` trains in a
new process (the loss decreases, the results say "exact"), `--mode=eval` in another new process
reproduces the numbers exactly, a run split by stop_at_step and resumed gives bit-identical losses,
and sampling continues a prompt. Two subprocesses; the rest runs in-process.
"""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax.config import configuration
from bdiff_jax.models import cross_entropy, init_params
from bdiff_jax.modes import sample as sample_mode
from bdiff_jax.modes import train as train_mode
from bdiff_jax.train.builder import build_objective
from bdiff_jax.runtime.reporter import QUIET
from tests.helpers import assert_ok, load_config, network, run_main, smoke_args, train_losses

SMOKE = "configs/wikitext2.py:smoke"
AR_ARGS = ("--config.model.objective=autoregressive", "--config.model.time_conditioning=none",
           "--config.model.block=qwen3")


def _ar_network(backbone, vocab, length):
  m = configuration.base_config().model
  m.backbone = backbone
  m.block = "qwen3"
  m.objective = "autoregressive"
  m.time_conditioning = "none"
  m.num_layers = 1
  m.emb_dim = 32
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 8
  m.mlp_dim = 48
  config = configuration.base_config()
  config.model = m
  return network(m, vocab_size=vocab, max_len=length), config


def _sequence_nll_fn(net, config):
  objective = build_objective(config, mask_id=net.spec.vocab_size)
  return jax.jit(lambda p, tok: objective.sequence_nll(
      lambda *a, **kw: net.apply({"params": p}, *a, train=False, **kw), tok,
      jnp.ones(tok.shape, bool), jax.random.key(0), num_samples=1))


# The reversible backbone: its causality is tested in test_attention.py; one backbone is enough
# here (each prefix length is a compilation).
@pytest.mark.parametrize("backbone", ["standard"])
def test_sequence_nll_is_the_chain_rule(backbone):
  vocab, length, batch = 30, 5, 3
  net, config = _ar_network(backbone, vocab, length)
  params = jax.jit(lambda k: init_params(net, k, seq_len=length))(jax.random.key(1))
  tokens = jax.random.randint(jax.random.key(2), (batch, length), 0, vocab)
  nll = np.asarray(_sequence_nll_fn(net, config)(params, tokens), np.float64)
  assert nll.shape == (batch,)
  bos = vocab  # the [MASK] id doubles as BOS
  apply = jax.jit(lambda p, x: net.apply({"params": p}, x, train=False))
  chain = np.zeros(batch)
  for i in range(length):
    prefix = jnp.concatenate([jnp.full((batch, 1), bos, jnp.int32), tokens[:, :i]], axis=1)
    logits = np.asarray(apply(params, prefix), np.float64)[:, -1]  # [B, V], predicts x_i
    assert logits.shape == (batch, vocab)  # BOS/[MASK] is never predicted
    logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    chain += logz - logits[np.arange(batch), np.asarray(tokens[:, i])]
  np.testing.assert_allclose(nll, chain, rtol=1e-5, atol=1e-4)
  assert np.all(nll > 0.5 * length)  # random params: far from zero (not a vacuous comparison)


def test_exact_likelihood_normalises():
  vocab, length = 4, 3
  net, config = _ar_network("standard", vocab, length)
  params = jax.jit(lambda k: init_params(net, k, seq_len=length))(jax.random.key(3))
  everything = jnp.asarray(list(itertools.product(range(vocab), repeat=length)), jnp.int32)
  nll = np.asarray(_sequence_nll_fn(net, config)(params, everything), np.float64)
  assert nll.shape == (vocab**length,)
  np.testing.assert_allclose(np.exp(-nll).sum(), 1.0, rtol=1e-5)
  assert np.exp(-nll).max() > 1.5 / vocab**length  # not merely uniform
  assert not build_objective(config, mask_id=vocab).is_upper_bound


def test_loss_and_gradient_equal_log_softmax_and_gather():
  """The AR loss runs the cross-entropy through the network's `token_nll` method
  (`cross_entropy.token_nll`: its own backward, no scatter): value and gradient equal
  jax.nn.log_softmax + take_along_axis by autodiff."""
  vocab, length, batch, dim = 37, 6, 3, 8
  _, config = _ar_network("standard", vocab, length)
  objective = build_objective(config, mask_id=vocab)
  k = jax.random.split(jax.random.key(4), 3)
  params = {"emb": jax.random.normal(k[0], (vocab + 1, dim)),
            "out": jax.random.normal(k[1], (dim, vocab))}
  tokens = jax.random.randint(k[2], (batch, length), 0, vocab)
  logits = lambda p, x: jnp.tanh(p["emb"][x]) @ p["out"]

  def apply_of(p):  # the interface of a bound network (models.bind), as the objective calls it
    def apply(x, *args, return_hidden=False, method=None):
      if method == "token_nll":  # as Network.token_nll computes it for a full head
        h, y = x, args[0]
        return cross_entropy.token_nll((h @ p["out"]).reshape(-1, vocab),
                                       y.reshape(-1)).reshape(y.shape)
      h = jnp.tanh(p["emb"][x])
      return h if return_hidden else h @ p["out"]
    return apply

  def ours(p):
    return objective.loss(apply_of(p), tokens, None)[0]

  def reference(p):
    logp = jax.nn.log_softmax(logits(p, objective.inputs(tokens)), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], axis=-1))

  (v0, g0), (v1, g1) = jax.value_and_grad(ours)(params), jax.value_and_grad(reference)(params)
  np.testing.assert_allclose(float(v0), float(v1), rtol=1e-6)
  assert float(v0) > 1.0  # random logits: far from zero
  for name in params:
    np.testing.assert_allclose(np.asarray(g0[name]), np.asarray(g1[name]), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ end to end


def _args(workdir, data_dir, tfds_dir, *extra):
  """A straight AR smoke run of 8 steps, with periodic evaluations at steps 4 and 8."""
  return smoke_args(workdir, data_dir, tfds_dir, *AR_ARGS, "--config.sample.length=12", *extra,
                    eval_tokens=128, eval_batch_size=2)  # 128 tokens: one batch of 2 sequences


def _config(data_dir, tfds_dir, **train_overrides):
  """The run of `_args` as an in-process config, without periodic evaluations (cheaper; they
  change neither the training trajectory nor the final evaluation)."""
  c = load_config("configs/wikitext2.py", "smoke")
  c.data.data_dir, c.data.tfds_dir = str(data_dir), str(tfds_dir)
  c.model.objective, c.model.time_conditioning, c.model.block = "autoregressive", "none", "qwen3"
  c.train.num_steps, c.train.log_every = 8, 1
  c.train.eval_every, c.train.checkpoint_every = 100, 100
  c.eval.max_tokens, c.eval.during_training_max_tokens, c.eval.batch_size = 128, 128, 2
  c.sample.length = 12  # training ends with samples: keep them cheap
  for k, v in train_overrides.items():
    c.train[k] = v
  return c


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory, real_data_dir, shared_tfds_dir):
  workdir = tmp_path_factory.mktemp("ar")
  proc = assert_ok(run_main(_args(workdir, real_data_dir, shared_tfds_dir)))
  return workdir, proc


@pytest.mark.slow
def test_ar_train_and_eval_in_new_process(ar_run, real_data_dir, shared_tfds_dir):
  workdir, proc = ar_run
  assert "autoregressive" in proc.stdout and "(exact)" in proc.stdout
  assert "UPPER BOUND" not in proc.stdout
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, 9))
  assert losses[8] < losses[1] - 0.2, losses  # it learns (from about ln(33k) = 10.4 nats)
  with open(os.path.join(workdir, "eval_best.json")) as f:
    first = json.load(f)
  for name in ("valid", "test"):
    r = first["results"][name]
    assert r["upper_bound"] is False
    assert 1.0 < r["word_ppl"] < 1e6
    # Exact: the evaluation seeds change nothing.
    assert len(set(r["word_ppl_per_seed"])) == 1 and r["word_ppl_std"] == 0.0
  assert_ok(run_main(_args(workdir, real_data_dir, shared_tfds_dir, "--mode=eval")))
  with open(os.path.join(workdir, "eval_best.json")) as f:
    assert json.load(f) == first


@pytest.mark.slow
@pytest.mark.usefixtures("xla_optimized")  # bit-identical to the straight run, a subprocess
def test_ar_resume_identical(ar_run, tmp_path, real_data_dir, shared_tfds_dir):
  straight, _ = ar_run
  split = tmp_path / "split"
  first = train_mode.run(_config(real_data_dir, shared_tfds_dir, stop_at_step=4), str(split),
                         QUIET)
  assert first.status == train_mode.STOPPED_AT_STEP and first.evaluation is None
  assert max(train_losses(split)) == 4
  results = train_mode.run(_config(real_data_dir, shared_tfds_dir), str(split), QUIET).evaluation
  assert results["results"]["valid"]["upper_bound"] is False
  a, b = train_losses(straight), train_losses(split)
  assert sorted(b) == list(range(1, 9))
  assert a == b  # bit-identical losses
  with open(os.path.join(straight, "eval_best.json")) as f:
    assert json.load(f)["results"] == results["results"]


@pytest.mark.slow
def test_ar_sample(ar_run, real_data_dir, shared_tfds_dir):
  workdir, _ = ar_run
  config = _config(real_data_dir, shared_tfds_dir)
  config.sample.prompt = "the game was"
  texts = sample_mode.run(config, str(workdir), QUIET)
  assert len(texts) == config.sample.num_samples
  for text in texts:
    words = text.split()
    assert words[:3] == ["the", "game", "was"] and len(words) > 3, text
    assert "[MASK]" not in text
