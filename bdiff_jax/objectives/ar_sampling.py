"""Ancestral left-to-right sampling of the autoregressive baseline with a key/value cache.

The AR network reads [BOS, x_0, ..., x_{L-2}] and predicts x_i at position i (see
`objectives.ar_inputs`). Sampling position i needs the logits at position i only, which depend
on inputs 0..i. The full-forward sampler recomputes the whole sequence for each position
(L forwards of length L: O(L^2) tokens through the network); here each position is one forward
of a single token through the network in decode mode (`Network(..., decode=True)`), whose
attention layers keep the keys and values of the earlier positions in the Flax "cache"
collection: L forwards of one token.

Draws are those of the full-forward sampler: position i uses `sampling.filter_logits` and
`sampling.categorical` with the key fold_in(key, i), so for the same key the tokens are the
same up to float rounding of the logits (decoding computes the same attention row, over a cache
instead of a full sequence).
"""

import jax
import jax.numpy as jnp

from bdiff_jax.diffusion import sampling
from bdiff_jax.models.network import Network

SamplingArgumentError = sampling.SamplingArgumentError


def init_decode_cache(network: Network, *, batch_size: int, length: int):
  """An empty decoding cache (zeros, index 0) for `batch_size` sequences of up to `length`
  tokens: the "cache" collection of `network` in decode mode. Allocates only the cache."""
  tokens = jnp.zeros((batch_size, length), jnp.int32)
  shapes = jax.eval_shape(
      lambda: network.init({"params": jax.random.key(0)}, tokens, train=False, decode=True))
  return jax.tree_util.tree_map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes["cache"])


def decode_step(network: Network, params, cache, tokens: jax.Array):
  """One decoding step: tokens int32[B, 1] at the cache's position -> (logits float32[B, V],
  new cache)."""
  logits, mutated = network.apply({"params": params, "cache": cache}, tokens, train=False,
                                  decode=True, mutable=["cache"])
  return logits[:, 0], mutated["cache"]


def sample_autoregressive(network: Network, params, key: jax.Array, *, length: int,
                          num_samples: int, bos_id: int, prompt_ids=None,
                          temperature: float = 1.0, top_k: int = 0,
                          top_p: float = 1.0) -> jax.Array:
  """Samples `num_samples` sequences of `length` tokens left to right with a key/value cache.

  Jittable with every argument but `params`, `key` and `prompt_ids` static (Python values).

  Args:
    network: a causal (objective="autoregressive") `Network` without time conditioning.
    params: its parameters.
    key: a PRNG key; position i draws with jax.random.fold_in(key, i).
    length: L >= 1 tokens per sample; at most the network's max_len with learned positions.
    num_samples: B >= 1.
    bos_id: the id the network reads before the first token (the [MASK] id, vocab_size, here).
    prompt_ids: None, or int ids of shape [P] or [1 or B, P], P <= L: a prefix kept as is.
      Positions holding vocab_size (the [MASK] id) are drawn like the rest.
    temperature: > 0; logits are divided by it.
    top_k: > 0 restricts each draw to the k most likely tokens; 0 disables.
    top_p: in (0, 1]; < 1 restricts each draw to the nucleus of probability top_p.

  Returns:
    int32[B, L], ids in [0, vocab_size).

  Raises:
    SamplingArgumentError (a ValueError) for invalid arguments.
  """
  spec = network.spec
  length = sampling.check_int("length", length, 1)
  num_samples = sampling.check_int("num_samples", num_samples, 1)
  bos_id = sampling.check_int("bos_id", bos_id, 0)
  top_k = sampling.check_int("top_k", top_k, 0)
  temperature = sampling.check_float("temperature", temperature)
  top_p = sampling.check_float("top_p", top_p)
  if temperature <= 0 or not 0.0 < top_p <= 1.0:
    raise SamplingArgumentError(
        f"temperature = {temperature} and top_p = {top_p}: need temperature > 0 and top_p in "
        "(0, 1].", "pass a positive temperature and top_p in (0, 1] (1 disables it).")
  if not spec.causal or spec.time_conditioned:
    raise SamplingArgumentError(
        f"autoregressive sampling needs a causal network without time conditioning; this one "
        f"has causal={spec.causal}, time_conditioning={spec.time_conditioning!r}.",
        "use objective=autoregressive with time_conditioning=none, or the diffusion sampler.")
  if bos_id >= spec.embed_rows:
    raise SamplingArgumentError(f"bos_id = {bos_id} is not an input id of the network "
                                f"(0..{spec.embed_rows - 1}).",
                                f"pass bos_id = {spec.vocab_size} (the [MASK] id).")
  if spec.positional == "learned" and length > spec.max_len:
    raise SamplingArgumentError(
        f"length = {length} exceeds the {spec.max_len} learned positions of the network.",
        f"sample at most {spec.max_len} tokens.")
  hole = spec.vocab_size
  fixed = sampling.initial_sequence(prompt_ids, length, num_samples, hole)
  cache = init_decode_cache(network, batch_size=num_samples, length=length)

  def body(i, carry):
    tokens, cache = carry
    previous = jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(i - 1, 0), axis=1)
    inputs = jnp.where(i == 0, bos_id, previous).astype(jnp.int32)
    logits, cache = decode_step(network, params, cache, inputs)
    logits = sampling.filter_logits(logits, temperature, top_k, top_p)
    draw = sampling.categorical(jax.random.fold_in(key, i), logits)
    given = jax.lax.dynamic_index_in_dim(fixed, i, axis=1, keepdims=False)
    token = jnp.where(given != hole, given, draw)
    return jax.lax.dynamic_update_index_in_dim(tokens, token, i, axis=1), cache

  tokens, _ = jax.lax.fori_loop(0, length, body, (fixed, cache))
  return tokens
