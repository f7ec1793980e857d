"""The autoregressive sampler with a key/value cache, against the full-forward sampler.

Tiny random causal networks in-process, over both backbones, both positional encodings (RoPE
and learned), both blocks and candidate attention:

  * decoding one token at a time through the cache gives the logits of the full causal forward
    at every position;
  * `sample_autoregressive` draws the same tokens as the full-forward reference sampler (the
    algorithm of generate.py: a full forward per position, fold_in(key, i), the same filters),
    with and without a prompt; prompt tokens are kept.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax.config import configuration
from bdiff_jax.diffusion import sampling
from bdiff_jax.errors import UserError
from bdiff_jax.models import init_params
from bdiff_jax.objectives import ar_sampling
from tests.helpers import network

VOCAB, LENGTH, BATCH = 13, 8, 3

# (backbone, block, positional, attention): both backbones, blocks and positional encodings, and
# candidate attention (whose decoding ranks the cached keys like the full forward).
CASES = [("standard", "qwen3", "rope", "candidate"),
         ("reversible", "simple", "learned", "dense")]


def _network(backbone, block, positional, attention, objective="autoregressive"):
  m = configuration.base_config().model
  m.backbone, m.block, m.positional, m.attention = backbone, block, positional, attention
  m.candidate_k = 3
  m.objective = objective
  m.time_conditioning = "none"
  m.num_layers, m.emb_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 2, 16, 4, 2, 4, 24
  return network(m, vocab_size=VOCAB, max_len=LENGTH)


def _ar_inputs(tokens):
  """The block shifted right behind BOS (= the [MASK] id VOCAB), written out independently."""
  return jnp.concatenate([jnp.full((tokens.shape[0], 1), VOCAB, tokens.dtype), tokens[:, :-1]], 1)


@functools.lru_cache(maxsize=None)
def _model(case):
  """(network, params, jitted full forward)."""
  net = _network(*case)
  params = jax.jit(lambda k: init_params(net, k, seq_len=LENGTH))(jax.random.key(1))
  full = jax.jit(lambda p, x: net.apply({"params": p}, x, train=False))
  return net, params, full


def _reference_sample(case, key, *, prompt=None, temperature=1.0, top_k=0, top_p=1.0):
  """The full-forward sampler: position i from a full forward of the inputs, key fold_in(key, i)."""
  net, params, full = _model(case)
  tokens = np.full((BATCH, LENGTH), VOCAB, np.int32)
  if prompt is not None:
    tokens[:, :prompt.shape[-1]] = prompt
  fixed = tokens.copy()
  for i in range(LENGTH):
    logits = full(params, _ar_inputs(jnp.asarray(tokens)))[:, i]
    logits = sampling.filter_logits(logits, temperature, top_k, top_p)
    draw = np.asarray(sampling.categorical(jax.random.fold_in(key, i), logits))
    tokens[:, i] = np.where(fixed[:, i] != VOCAB, fixed[:, i], draw)
  return tokens


@pytest.mark.parametrize("case", CASES)
def test_decode_and_sampler_match_full_forward(case):
  net, params, full = _model(case)
  # Decoding token by token through the cache gives the full forward's logits everywhere.
  tokens = jax.random.randint(jax.random.key(2), (BATCH, LENGTH), 0, VOCAB + 1)
  expected = np.asarray(full(params, tokens))
  cache = ar_sampling.init_decode_cache(net, batch_size=BATCH, length=LENGTH)
  step = jax.jit(functools.partial(ar_sampling.decode_step, net))
  for i in range(LENGTH):
    logits, cache = step(params, cache, tokens[:, i:i + 1])
    np.testing.assert_allclose(np.asarray(logits), expected[:, i], rtol=1e-5, atol=1e-5)
  # Not vacuous: the positions differ from one another, so the position must be right.
  assert np.max(np.abs(expected[:, 1:] - expected[:, :1])) > 0.1

  # The sampler draws the full-forward sampler's tokens, with and without a prompt.
  prompt = np.array([4, 11], np.int32)
  run = jax.jit(functools.partial(ar_sampling.sample_autoregressive, net, length=LENGTH,
                                  num_samples=BATCH, bos_id=VOCAB, temperature=2.0, top_k=9))
  for seed, given in ((0, None), (1, prompt)):
    key = jax.random.key(seed)
    out = np.asarray(run(params, key, prompt_ids=given))
    assert out.dtype == np.int32 and out.shape == (BATCH, LENGTH)
    np.testing.assert_array_equal(
        out, _reference_sample(case, key, prompt=given, temperature=2.0, top_k=9))
    assert out.max() < VOCAB and len(np.unique(out)) > 3  # real, varied draws
    if given is not None:
      np.testing.assert_array_equal(out[:, :2], np.broadcast_to(prompt, (BATCH, 2)))


def test_rejects_diffusion_network_and_too_long_learned_length():
  net, params, _ = _model(CASES[1])  # learned positions, max_len = LENGTH
  with pytest.raises(ValueError) as info:
    ar_sampling.sample_autoregressive(net, params, jax.random.key(0), length=LENGTH + 1,
                                      num_samples=1, bos_id=VOCAB)
  assert isinstance(info.value, UserError)
  diffusion = _network("standard", "qwen3", "rope", "dense", objective="diffusion")
  with pytest.raises(ValueError) as info:
    ar_sampling.sample_autoregressive(diffusion, params, jax.random.key(0), length=4,
                                      num_samples=1, bos_id=VOCAB)
  assert isinstance(info.value, UserError) and info.value.fix
