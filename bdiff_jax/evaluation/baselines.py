"""Count-based baselines on the same splits and blocks as the evaluator: what a perplexity is worth.

unigram  add-one smoothed token frequencies of the train split.
bigram   Jelinek-Mercer interpolation of the maximum-likelihood bigram with that unigram,
         p(w | v) = lam * c(v, w) / c(v) + (1 - lam) * p_uni(w)   (lam = 0 when c(v) = 0),
         lam chosen on a held-out tenth of the train split (the last 10%, counts from the other
         90%), then the counts are recomputed on the whole train split. Valid and test are never
         used for fitting.

Both are scored exactly like the neural models: each split is cut into blocks of `seq_len`
tokens (plus the final partial block) and each block is scored on its own, so the first token of
a block is scored by the unigram (it has no context), as the neural models see no context across
blocks either. Perplexities are exact (these are normalised distributions), per token and per
word (the word count of the evaluator), so they sit in the same table as the bounds.
"""

import hashlib
import json
import math
import os

import numpy as np

from bdiff_jax.data import pipeline

_LAMBDAS = np.linspace(0.05, 0.95, 19)


def unigram_log_probs(train: np.ndarray, vocab_size: int) -> np.ndarray:
  """Add-one smoothed log frequencies of `train`, float64 [vocab_size] (the unigram baseline;
  also the initial output bias of the simple block, `train_state.init_train_state`)."""
  counts = np.bincount(train, minlength=vocab_size)[:vocab_size].astype(np.float64) + 1.0
  return np.log(counts / counts.sum())


def _pair_ids(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
  return tokens[:-1].astype(np.int64) * vocab_size + tokens[1:].astype(np.int64)


class _Bigram:
  """Bigram counts of a token stream, looked up for many (prev, next) pairs at once."""

  def __init__(self, train: np.ndarray, vocab_size: int):
    self.vocab_size = vocab_size
    keys, counts = np.unique(_pair_ids(train, vocab_size), return_counts=True)
    self.keys, self.counts = keys, counts.astype(np.float64)
    self.context = np.bincount(train[:-1], minlength=vocab_size)[:vocab_size].astype(np.float64)

  def ml(self, prev: np.ndarray, nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c(prev, next) / c(prev) with 0 for unseen contexts, whether the context was seen)."""
    q = prev.astype(np.int64) * self.vocab_size + nxt.astype(np.int64)
    idx = np.clip(np.searchsorted(self.keys, q), 0, max(len(self.keys) - 1, 0))
    pair = np.where(self.keys[idx] == q, self.counts[idx], 0.0) if len(self.keys) else 0.0 * q
    ctx = self.context[prev]
    return np.where(ctx > 0, pair / np.maximum(ctx, 1.0), 0.0), ctx > 0


def _block_pairs(tokens: np.ndarray, seq_len: int):
  """(first tokens of blocks, prev, next) for scoring each block on its own."""
  blocks, tail = pipeline.eval_blocks(tokens, seq_len)
  firsts = [blocks[:, 0]] if blocks.size else []
  prevs = [blocks[:, :-1].ravel()] if blocks.size else []
  nexts = [blocks[:, 1:].ravel()] if blocks.size else []
  if tail is not None and tail.size:
    firsts.append(tail[:1])
    prevs.append(tail[:-1])
    nexts.append(tail[1:])
  cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int32)
  return cat(firsts), cat(prevs), cat(nexts)


class _BigramScorer:
  """The unigram's NLL, and the interpolated bigram's for any lam, of one token stream: the
  lookups (block pairs, bigram and unigram probabilities) are done once, each lam costs one
  vectorised pass."""

  def __init__(self, uni: np.ndarray, bigram: _Bigram, tokens: np.ndarray, seq_len: int):
    firsts, prev, nxt = _block_pairs(tokens, seq_len)
    self.first_nll = -uni[firsts].sum()  # a block's first token has no context: unigram
    self.uni_next = uni[nxt]
    self.ml, self.seen = bigram.ml(prev, nxt)
    self.p_uni = np.exp(self.uni_next)

  def unigram_nll(self) -> float:
    return float(self.first_nll - self.uni_next.sum())

  def nll(self, lam: float) -> float:
    lam_eff = np.where(self.seen, lam, 0.0)
    p = lam_eff * self.ml + (1.0 - lam_eff) * self.p_uni
    return float(self.first_nll - np.log(p).sum())


def _choose_lambda(train: np.ndarray, vocab_size: int, seq_len: int) -> float:
  cut = int(train.size * 0.9)
  fit, held = train[:cut], train[cut:]
  scorer = _BigramScorer(unigram_log_probs(fit, vocab_size), _Bigram(fit, vocab_size), held,
                         seq_len)
  scores = [scorer.nll(lam) for lam in _LAMBDAS]
  return float(_LAMBDAS[int(np.argmin(scores))])


def _metrics(total_nll: float, num_tokens: int, num_words: int) -> dict:
  return {"nll_per_token": total_nll / num_tokens, "token_ppl": math.exp(total_nll / num_tokens),
          "word_ppl": math.exp(total_nll / num_words), "num_tokens": int(num_tokens),
          "num_words": int(num_words), "exact": True}


def compute(splits, *, seq_len: int, max_tokens: int = 0, split_names=("valid", "test"),
            count_words=None) -> dict:
  """{"unigram": {split: metrics}, "bigram": {split: metrics, "lambda": lam}} on `splits`
  (a `pipeline.Splits`: train/valid/test token arrays and the tokenizer)."""
  train = np.asarray(splits.train)
  vocab_size = int(splits.tokenizer.vocab_size)
  uni = unigram_log_probs(train, vocab_size)
  lam = _choose_lambda(train, vocab_size, seq_len)
  bigram = _Bigram(train, vocab_size)
  counter = count_words or getattr(splits.tokenizer, "count_words", None)
  out = {"unigram": {}, "bigram": {"lambda": lam}}
  for name in split_names:
    tokens = np.asarray(getattr(splits, name))
    if max_tokens:
      tokens = tokens[:max_tokens]
    words = int(counter(tokens)) if counter is not None else int(tokens.size)
    scorer = _BigramScorer(uni, bigram, tokens, seq_len)
    out["unigram"][name] = _metrics(scorer.unigram_nll(), tokens.size, words)
    out["bigram"][name] = _metrics(scorer.nll(lam), tokens.size, words)
  return out


def format_baselines(baselines: dict) -> str:
  lines = ["Baselines (exact, same blocks; fitted on train only):"]
  for kind in ("unigram", "bigram"):
    b = baselines[kind]
    extra = f" (lambda {b['lambda']:.2f})" if kind == "bigram" else ""
    parts = [f"{s} word ppl {m['word_ppl']:.1f}" for s, m in b.items() if isinstance(m, dict)]
    lines.append(f"  {kind:7s}{extra}: " + " | ".join(parts))
  return "\n".join(lines)


def cached(splits, workdir: str, *, seq_len: int, max_tokens: int = 0) -> dict:
  """`compute`, stored in <workdir>/baselines_<key>.json (keyed by the data and the blocks)."""
  h = hashlib.sha256()
  for name in ("train", "valid", "test"):
    h.update(np.ascontiguousarray(np.asarray(getattr(splits, name), np.int32)).tobytes())
  h.update(f"{seq_len},{max_tokens},{splits.tokenizer.vocab_size}".encode())
  path = os.path.join(workdir, f"baselines_{h.hexdigest()[:16]}.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  out = compute(splits, seq_len=seq_len, max_tokens=max_tokens)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)
  os.replace(tmp, path)
  return out
