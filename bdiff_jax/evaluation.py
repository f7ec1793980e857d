"""Evaluation on the canonical validation and test splits.

Each split is cut into blocks of `data.seq_len` tokens (plus its final partial block, so every
token is scored exactly once and nothing is padded). For every block we compute -log p(block):
an upper bound from the diffusion ELBO with K time samples per block (`eval.num_time_samples`),
or the exact value for the autoregressive model. Blocks are scored independently (no context
across block boundaries), the same for both objectives.

Reported per split, as mean and spread (std) over the evaluation seeds:
  nll_per_token   total NLL / number of tokens (nats)
  bits_per_token  nll_per_token / ln 2
  token_ppl       exp(nll_per_token)
  word_ppl        exp(total NLL / number of words), words counted the WikiText way: whitespace
                  words plus one <eos> per line. For the word-level v1 tokenizer a token is a
                  word, so word_ppl == token_ppl; for the byte-level raw variant they differ.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bdiff_jax import objectives
from bdiff_jax.data import pipeline

SPLITS = ("valid", "test")


def make_nll_fn(network, config):
  """jitted (params, tokens[B, L], key) -> per-sequence NLL [B]."""
  num_samples = int(config.eval.num_time_samples)

  @jax.jit
  def nll_fn(params, tokens, key):
    apply = lambda *a, **kw: network.apply({"params": params}, *a, train=False, **kw)
    return objectives.sequence_nll(apply, tokens, key, config,
                                   vocab_size=network.spec.vocab_size, num_samples=num_samples)

  return nll_fn


def _count_words(tokenizer, ids: np.ndarray) -> int:
  counter = getattr(tokenizer, "count_words", None)
  if counter is not None:
    return int(counter(ids))
  return int(ids.size)


def split_nll(nll_fn, params, tokens: np.ndarray, *, seq_len: int, batch_size: int, key,
              max_tokens: int = 0) -> tuple[float, int]:
  """(total NLL in nats, number of tokens) over a split for one evaluation key."""
  blocks, tail = pipeline.eval_blocks(tokens, seq_len, max_tokens)
  total = 0.0
  count = 0
  n = blocks.shape[0]
  for i, start in enumerate(range(0, n, batch_size)):
    batch = blocks[start:start + batch_size]
    real = batch.shape[0]
    if real < batch_size:  # pad with copies of the first block; their NLL is discarded
      batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, axis=0)])
    nll = np.asarray(nll_fn(params, jnp.asarray(batch), jax.random.fold_in(key, i)),
                     dtype=np.float64)
    total += float(nll[:real].sum())
    count += real * seq_len
  if tail is not None and tail.size:
    nll = nll_fn(params, jnp.asarray(tail[None]), jax.random.fold_in(key, n + 1))
    total += float(np.asarray(nll, np.float64).sum())
    count += tail.size
  return total, count


def evaluate(network, params, splits, config, *, max_tokens: int = 0, seeds=None,
             split_names=SPLITS) -> dict[str, Any]:
  """Metrics for each split: mean and std over seeds. Deterministic for fixed seeds."""
  seeds = tuple(config.eval.seeds if seeds is None else seeds)
  nll_fn = make_nll_fn(network, config)
  results = {}
  for split_index, name in enumerate(split_names):
    tokens = getattr(splits, name)
    if max_tokens:
      tokens = tokens[:max_tokens]
    words = _count_words(splits.tokenizer, tokens)
    per_seed = []
    for seed in seeds:
      key = jax.random.fold_in(jax.random.PRNGKey(seed), split_index)
      total, count = split_nll(nll_fn, params, tokens, seq_len=config.data.seq_len,
                               batch_size=config.eval.batch_size, key=key)
      per_seed.append((total / count, total / words))
    per_token = np.array([p[0] for p in per_seed])
    per_word = np.array([p[1] for p in per_seed])
    results[name] = {
        "nll_per_token": float(per_token.mean()),
        "nll_per_token_std": float(per_token.std()),
        "bits_per_token": float(per_token.mean() / math.log(2)),
        "token_ppl": float(np.exp(per_token.mean())),
        "token_ppl_std": float(np.exp(per_token).std()),
        "word_ppl": float(np.exp(per_word.mean())),
        "word_ppl_std": float(np.exp(per_word).std()),
        "word_ppl_per_seed": [float(np.exp(v)) for v in per_word],
        "num_tokens": int(tokens.size),
        "num_words": words,
        "full_split": int(tokens.size) == int(getattr(splits, name).size),
        "seeds": list(seeds),
        "num_time_samples": int(config.eval.num_time_samples),
        "upper_bound": objectives.is_upper_bound(config),
    }
  return results


def format_results(results: dict, config) -> str:
  kind = ("diffusion NLL upper bound (ELBO)" if objectives.is_upper_bound(config)
          else "autoregressive NLL (exact)")
  lines = [f"Evaluation: {kind}; blocks of {config.data.seq_len} tokens; "
           f"{len(config.eval.seeds)} seeds x K={config.eval.num_time_samples} time samples."]
  if objectives.is_upper_bound(config):
    lines.append("Diffusion numbers are UPPER BOUNDS on the true NLL / perplexity.")
  for name, r in results.items():
    subset = "" if r["full_split"] else f" [SUBSET: first {r['num_tokens']} tokens]"
    lines.append(
        f"  {name:5s}: nll/token {r['nll_per_token']:.4f} ± {r['nll_per_token_std']:.4f} nats"
        f" | bits/token {r['bits_per_token']:.4f} | token ppl {r['token_ppl']:.2f}"
        f" | word ppl {r['word_ppl']:.2f} ± {r['word_ppl_std']:.2f}"
        f" ({r['num_tokens']} tokens, {r['num_words']} words){subset}")
  return "\n".join(lines)
