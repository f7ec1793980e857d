"""The head run at masked positions only: equal to the full-head loss, bound and gradients.

* the network's split (`return_hidden=True`, then `Network.head`) gives exactly its logits, the
  parameter layout is that of the single-method network (checkpoints restore), and the adapter
  the trainer uses (one apply closure with dropout) gives the full loss;
* `diffusion_loss_gathered` equals `diffusion_loss` (loss, every aux metric and the parameter
  gradients) in float64 to ~1e-12 and in float32 closely, with the default capacity, a tiny one
  that forces the chunked fallback, and the head run a few rows at a time; `nll_bound_gathered`
  equals `nll_bound`;
* `masked_capacity` against Monte Carlo draws of the real times and masks: no overflow at the
  default k, an overflow rate near the normal tail at small k (which a wrong variance fails);
* `xla_flags`: the user's flags win, `BDIFF_XLA_FLAGS=none` adds nothing, and this jaxlib
  accepts the defaults.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax import models
from bdiff_jax.config import configuration
from bdiff_jax.diffusion import schedules
from bdiff_jax.diffusion.corruption import corrupt
from bdiff_jax.diffusion.elbo import diffusion_loss, diffusion_loss_gathered, nll_bound
from bdiff_jax.diffusion.elbo import nll_bound_gathered
from bdiff_jax.diffusion.masked_head import head_nll, masked_capacity
from bdiff_jax.diffusion.time_draws import sample_times
from bdiff_jax.models import Network
from bdiff_jax.runtime import xla_flags
from tests.helpers import network

VOCAB = 37
LENGTH = 16
BATCH = 4
SCHED = schedules.linear()
TINY_CAPACITY = 8  # far below the ~32 masked positions of a batch: forces the fallback


def _network(dtype: str, **model) -> Network:
  m = configuration.base_config().model
  m.update(num_layers=1, emb_dim=16, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32,
           dtype=dtype, positional="learned", tie_embeddings=False, block="simple",
           dropout_rate=0.1)
  m.update(**model)
  return network(m, vocab_size=VOCAB, max_len=LENGTH)


@functools.lru_cache(maxsize=None)
def _init_fn(net: Network):
  """Initial params with every leaf perturbed (zero-initialised biases included): live grads."""

  def init(key):
    p = models.init_params(net, key, seq_len=LENGTH)
    leaves, tree = jax.tree_util.tree_flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])

  return jax.jit(init)


def _params(net: Network):
  return _init_fn(net)(jax.random.key(0))


def _tokens():
  return jax.random.randint(jax.random.key(2), (BATCH, LENGTH), 0, VOCAB)


def _apply(net, params, dropout_key):
  return functools.partial(net.apply, {"params": params}, train=True,
                           rngs={"dropout": dropout_key})


# (capacity, chunk_rows) of the gathered losses compared with the full one: the default buffer,
# a tiny one (the batch overflows it: exact fallback), and the default one run 8 rows at a time.
VARIANTS = ((None, None), (TINY_CAPACITY, None), (None, 8))


def _toy_params(dtype):
  """A tiny parametric denoiser split like the network: hidden states, then a biased head."""
  keys = jax.random.split(jax.random.key(6), 4)
  shapes = {"embed": (VOCAB + 1, 8), "time": (8,), "out": (8, VOCAB), "bias": (VOCAB,)}
  return {k: jax.random.normal(key, shape, dtype) for key, (k, shape) in zip(keys, shapes.items())}


def _toy_hidden(params, noisy, t):
  h = params["embed"][noisy] + t[:, None, None].astype(params["time"].dtype) * params["time"]
  return jnp.tanh(h + jnp.mean(h, axis=1, keepdims=True))  # [B, L, D], mixes the context


def _toy_head(params, h):
  return h @ params["out"] + params["bias"]


@functools.lru_cache(maxsize=None)
def _losses_fn(corruption: str, variants, estimator: str = "time"):
  """One jitted function: value_and_grad of the full loss and of each gathered variant."""
  kw = dict(schedule=SCHED, mask_id=VOCAB, corruption=corruption, uniform_fraction=0.3,
            estimator=estimator)

  def full(params, tokens, key):
    logits_fn = lambda z, t: _toy_head(params, _toy_hidden(params, z, t))
    return diffusion_loss(logits_fn, tokens, key, **kw)

  def gathered(params, tokens, key, capacity, chunk_rows):
    return diffusion_loss_gathered(functools.partial(_toy_hidden, params),
                                   head_nll(functools.partial(_toy_head, params)), tokens, key,
                                   capacity=capacity, chunk_rows=chunk_rows, **kw)

  def all_losses(params, tokens, key):
    grad = lambda f, *a: jax.value_and_grad(f, has_aux=True)(params, tokens, key, *a)
    return grad(full), [grad(gathered, *v) for v in variants]

  return jax.jit(all_losses)


def _compare_losses(dtype, corruption, rtol, atol, variants=VARIANTS, estimator="time"):
  params, tokens = _toy_params(dtype), _tokens()
  for seed in range(3):
    key = jax.random.key(10 + seed)
    ((loss, aux), grads), results = _losses_fn(corruption, variants, estimator)(params, tokens,
                                                                               key)
    num_masked = float(aux["masked_fraction"]) * BATCH * LENGTH
    assert num_masked > TINY_CAPACITY  # the fallback really runs
    assert float(loss) > 0.5
    flat = jax.tree_util.tree_leaves_with_path(grads)
    # Tolerance relative to the largest gradient entry (some entries are ~0).
    scale = max(float(jnp.max(jnp.abs(g))) for _, g in flat)
    assert scale > 1e-3
    for variant, ((loss_g, aux_g), grads_g) in zip(variants, results):
      msg = f"capacity, chunk_rows = {variant}"
      np.testing.assert_allclose(float(loss_g), float(loss), rtol=rtol, atol=atol, err_msg=msg)
      assert aux.keys() == aux_g.keys()
      for k in aux:
        np.testing.assert_allclose(float(aux_g[k]), float(aux[k]), rtol=rtol, atol=atol,
                                   err_msg=f"{msg} {k}")
      flat_g = jax.tree_util.tree_leaves(grads_g)
      assert len(flat) == len(flat_g)
      for (path, g), g_g in zip(flat, flat_g):
        np.testing.assert_allclose(np.asarray(g_g), np.asarray(g), rtol=rtol, atol=atol * scale,
                                   err_msg=f"{msg} {path}")


def test_network_split_equals_logits_and_keeps_param_layout():
  net = _network("float32")
  params = _params(net)
  d = 16
  assert set(params) == {"embed", "position_embedding", "time_embedding", "backbone",
                         "final_norm", "head", "head_bias"}
  assert params["head"]["kernel"].shape == (d, VOCAB)
  assert params["head_bias"].shape == (VOCAB,)
  assert params["embed"]["embedding"].shape == (VOCAB + 1, d)
  assert set(params["final_norm"]) == {"norm", "modulation"}
  tokens, t, rows = _tokens(), jnp.linspace(0.1, 1.0, BATCH), jnp.asarray([0, 5, 17, 63])

  @jax.jit
  def outputs(p):
    apply = functools.partial(net.apply, {"params": p})
    hidden = apply(tokens, t, return_hidden=True)
    return (apply(tokens, t), hidden, apply(hidden, method=Network.head),
            apply(hidden.reshape(-1, d)[rows], method=Network.head))

  logits, hidden, head_logits, row_logits = outputs(params)
  assert hidden.shape == (BATCH, LENGTH, d)
  np.testing.assert_allclose(head_logits, logits, rtol=1e-6, atol=1e-6)
  # The head on a gathered [N, D] array gives those rows of the logits.
  np.testing.assert_allclose(row_logits, logits.reshape(-1, VOCAB)[rows], rtol=1e-6, atol=1e-6)
  # The bias really is in the head: with it shifted by c, every logit moves by c.
  shifted = outputs(dict(params, head_bias=params["head_bias"] + 3.0))[0]
  np.testing.assert_allclose(shifted, logits + 3.0, rtol=1e-6, atol=1e-5)

  # Tied head: the embedding table scaled by 1/sqrt(D), plus the bias. (Only the head's
  # parameters are needed to apply the head.)
  tied_net = _network("float32", tie_embeddings=True, positional="rope")
  tied = {"embed": {"embedding": params["embed"]["embedding"]},
          "head_bias": jnp.linspace(-1.0, 1.0, VOCAB)}
  expected = (jnp.einsum("bld,vd->blv", hidden, tied["embed"]["embedding"][:VOCAB]) / 4.0
              + tied["head_bias"])
  np.testing.assert_allclose(tied_net.apply({"params": tied}, hidden, method=Network.head),
                             expected, rtol=1e-5, atol=1e-5)


def test_network_adapter_loss_equals_full_loss_with_dropout():
  """The call the trainer makes: one apply closure (params, train, dropout rng) for both parts."""
  net = _network("float32")
  tokens = _tokens()

  @jax.jit
  def losses(params, key):
    noise_key, dropout_key = jax.random.split(key)
    apply = functools.partial(net.apply, {"params": params}, train=True,
                              rngs={"dropout": dropout_key})
    kw = dict(schedule=SCHED, mask_id=VOCAB)
    full = diffusion_loss(lambda z, t: apply(z, t), tokens, noise_key, **kw)[0]
    gathered = diffusion_loss_gathered(lambda z, t: apply(z, t, return_hidden=True),
                                       lambda h, y: apply(h, y, method=Network.token_nll), tokens,
                                       noise_key, **kw)[0]
    no_dropout = diffusion_loss(lambda z, t: net.apply({"params": params}, z, t), tokens,
                                noise_key, **kw)[0]
    return full, gathered, no_dropout

  full, gathered, no_dropout = losses(_params(net), jax.random.key(8))
  np.testing.assert_allclose(float(gathered), float(full), rtol=2e-6)
  assert abs(float(full) - float(no_dropout)) > 1e-4  # dropout was on, in both the same


def test_gathered_loss_and_grads_equal_full_float64():
  with jax.enable_x64(True):
    _compare_losses(jnp.float64, "absorbing", 1e-12, 1e-12)


def test_gathered_count_loss_and_grads_equal_full_float64():
  with jax.enable_x64(True):
    _compare_losses(jnp.float64, "absorbing", 1e-12, 1e-12, estimator="count")


def test_gathered_loss_equals_full_float32_prototype_mix():
  _compare_losses(jnp.float32, "prototype_mix", 2e-5, 2e-6, variants=VARIANTS[1:2])


@pytest.mark.parametrize("estimator", ["time", "count"])
def test_gathered_bound_equals_full_bound_float64(estimator):
  with jax.enable_x64(True):
    params, tokens, key = _toy_params(jnp.float64), _tokens(), jax.random.key(3)
    hidden_fn = functools.partial(_toy_hidden, params)
    head_fn = functools.partial(_toy_head, params)
    # Rows of 16, 11 and 1 valid tokens and a full one (the count estimator's k <= L_b).
    valid = jnp.arange(LENGTH)[None, :] < jnp.asarray([16, 11, 1, 16])[:, None]
    kw = dict(schedule=SCHED, mask_id=VOCAB, num_samples=3, estimator=estimator, valid=valid)

    @jax.jit
    def bounds():
      full = nll_bound(lambda z, t: head_fn(hidden_fn(z, t)), tokens, key, **kw)
      return full, [nll_bound_gathered(hidden_fn, head_nll(head_fn), tokens, key, capacity=c,
                                       chunk_rows=r, **kw) for c, r in VARIANTS]

    full, gathered = bounds()
    assert full.dtype == jnp.float64 and float(jnp.min(full)) > 1.0
    for variant, bound in zip(VARIANTS, gathered):
      np.testing.assert_allclose(np.asarray(bound), np.asarray(full), rtol=1e-12,
                                 err_msg=str(variant))


def _masked_counts(batch, length, antithetic, draws=4000):
  """Numbers of masked positions of `draws` batches drawn by the real time and mask samplers."""
  tokens = jnp.zeros((batch, length), jnp.int32)

  def count(key):
    key_t, key_c = jax.random.split(key)
    t = sample_times(key_t, batch, antithetic=antithetic)
    return jnp.sum(corrupt(key_c, tokens, t, schedule=SCHED, mask_id=VOCAB)[1])

  keys = jax.random.split(jax.random.key(4 + antithetic), draws)
  return np.asarray(jax.jit(jax.vmap(count))(keys))


def test_masked_capacity_against_monte_carlo():
  batch, length = 16, 48
  n = batch * length
  for antithetic in (True, False):
    counts = _masked_counts(batch, length, antithetic)
    assert abs(counts.mean() - n / 2) < 0.02 * n  # linear schedule: half masked on average
    cap = masked_capacity(SCHED, batch, length, antithetic=antithetic)
    assert cap % 16 == 0 and cap <= n
    assert counts.max() <= cap  # default k = 5: no overflow in 4000 batches
    # Overflow rate at k = 2 is about the normal tail (2.3%) less the rounding: a variance
    # formula without the spread of the times (iid) or of the offset would fail one side.
    rate = np.mean(counts > masked_capacity(SCHED, batch, length, antithetic=antithetic,
                                            num_std=2.0))
    assert 0.001 < rate < 0.05, (antithetic, rate)
  # Stratified times concentrate the count: a much smaller buffer than with iid times.
  assert (masked_capacity(SCHED, batch, length) <
          0.8 * masked_capacity(SCHED, batch, length, antithetic=False))
  assert masked_capacity(SCHED, 32, 128) < 0.56 * 32 * 128
  assert masked_capacity(SCHED, 1, 4) <= 4


def test_xla_flags_user_wins_and_opt_out():
  default = xla_flags.DEFAULT_FLAGS[0]
  name = default.split("=")[0]
  env = {}
  assert xla_flags.apply_default_flags(env) == " ".join(xla_flags.DEFAULT_FLAGS)
  assert xla_flags.apply_default_flags(env) == env["XLA_FLAGS"]  # idempotent
  assert env["XLA_FLAGS"].count(name) == 1
  env = {"XLA_FLAGS": f"{name}=dot --xla_foo=1"}
  assert xla_flags.apply_default_flags(env) == f"{name}=dot --xla_foo=1"
  env = {"XLA_FLAGS": "--xla_foo=1", "BDIFF_XLA_FLAGS": "none"}
  assert xla_flags.apply_default_flags(env) == "--xla_foo=1"
  env = {"BDIFF_XLA_FLAGS": "--xla_bar=2"}
  assert xla_flags.apply_default_flags(env) == "--xla_bar=2"
  assert xla_flags.apply_default_flags({"BDIFF_XLA_FLAGS": ""}) == ""


def test_default_xla_flags_are_accepted_by_this_jaxlib():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("BDIFF_XLA_FLAGS", None)
  env.pop("XLA_FLAGS", None)
  code = ("from bdiff_jax.runtime import xla_flags; print(xla_flags.apply_default_flags()); "
          "import jax.numpy as jnp; print(float(jnp.sum(jnp.ones((64, 64)))))")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)) or ".")
  assert proc.returncode == 0, proc.stderr
  flags, total = proc.stdout.split("\n")[:2]
  assert flags == " ".join(xla_flags.default_flags({}))
  assert float(total) == 4096.0
