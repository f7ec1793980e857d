"""Evaluation on the canonical validation and test splits, compiled once.

Each split is cut into blocks of `data.seq_len` tokens plus its final partial block, so every
token is scored exactly once. For every block we compute -log p(block): an upper bound from the
diffusion ELBO with K time samples per block (`eval.num_time_samples`), or the exact value for the
autoregressive model. Blocks are scored independently (no context across block boundaries), the
same for both objectives.

One shape, one compilation: blocks are scored in batches of exactly `eval.batch_size` rows of
`seq_len` tokens with a bool `valid` mask. The partial last block is padded at its end (padding is
excluded from the sum and, through the attention padding mask, cannot influence the real tokens);
a short last batch is filled with all-padding rows, which contribute exactly 0. An `Evaluator` is
built once per experiment and reused by periodic and final evaluations, so evaluation compiles
once per process.

Placement. In one process every evaluation (periodic, final, `--mode=eval`) runs one
single-device program. With a `mesh` (a multi-process run: `experiment.inference_mesh`) the
program runs over the run's global mesh instead, every process taking part: the parameters in the
training layout (`sharding.state_shardings`: replicated, or FSDP-sharded), each batch's rows split
over all devices (each process feeds the rows its devices hold, `sharding.shard_batch`), the key
replicated, the per-row NLLs gathered to every process, which sum them alike. Each row is scored
by the same computation with the same random draws (threefry keys are partitionable), so the
numbers equal the single-device program's up to float rounding.

Reported per split, as mean and spread (std) over the evaluation seeds:
  nll_per_token   total NLL / number of tokens (nats)
  bits_per_token  nll_per_token / ln 2
  token_ppl       exp(nll_per_token)
  word_ppl        exp(total NLL / number of words), words counted the WikiText way: whitespace
                  words plus one <eos> per line. For the word-level v1 tokenizer a token is a
                  word, so word_ppl == token_ppl; for the byte-level raw variant they differ.
"""

import math
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bdiff_jax import models
from bdiff_jax.data import pipeline
from bdiff_jax.runtime import sharding as sharding_lib

SPLITS = ("valid", "test")


def padded_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int,
                   pad_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(tokens int32[batch_size, seq_len], valid bool[batch_size, seq_len]) covering `tokens`.

  Full blocks in stream order, then the final partial block padded at its end; the last batch
  is filled with all-padding rows. Every token appears exactly once with valid=True.
  """
  blocks, tail = pipeline.eval_blocks(tokens, seq_len)
  valid = np.ones(blocks.shape, bool)
  if tail is not None and tail.size:
    row = np.full((1, seq_len), pad_id, np.int32)
    row[0, :tail.size] = tail
    row_valid = np.zeros((1, seq_len), bool)
    row_valid[0, :tail.size] = True
    blocks = np.concatenate([blocks, row])
    valid = np.concatenate([valid, row_valid])
  yield from _fixed_batches(blocks, valid, batch_size=batch_size, pad_id=pad_id)


def _fixed_batches(blocks: np.ndarray, valid: np.ndarray, *, batch_size: int,
                   pad_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Rows [N, seq_len] and their mask in batches of exactly batch_size rows (one compiled
  shape): the last batch is filled with all-padding rows."""
  seq_len = blocks.shape[1]
  for start in range(0, blocks.shape[0], batch_size):
    b, v = blocks[start:start + batch_size], valid[start:start + batch_size]
    if b.shape[0] < batch_size:
      fill = batch_size - b.shape[0]
      b = np.concatenate([b, np.full((fill, seq_len), pad_id, np.int32)])
      v = np.concatenate([v, np.zeros((fill, seq_len), bool)])
    yield b, v


def _count_words(tokenizer, ids: np.ndarray) -> int:
  counter = getattr(tokenizer, "count_words", None)
  if counter is not None:
    return int(counter(ids))
  return int(ids.size)


class Evaluator:
  """Per-split NLL of a network under an objective: one jitted function, one input shape."""

  def __init__(self, objective, network, *, seq_len: int, batch_size: int,
               num_time_samples: int, mesh: Optional[jax.sharding.Mesh] = None):
    """`mesh`: None (one device), or the global mesh every process evaluates on (see the module
    docstring).

    Raises:
      ConfigError: `batch_size` is not a multiple of the mesh's devices.
    """
    self.objective = objective
    self.network = network
    self.seq_len = int(seq_len)
    self.batch_size = int(batch_size)
    self.num_time_samples = int(num_time_samples)
    self.mesh = mesh
    if mesh is not None:
      sharding_lib.check_batch_divisible(self.batch_size, mesh, "eval.batch_size")

    def nll(params, tokens, valid, key):
      return objective.sequence_nll(models.bind(network, params, train=False), tokens, valid, key,
                                    num_samples=self.num_time_samples)

    # On a mesh the rows' NLLs are gathered to every device, so each process reads them all.
    self._nll = jax.jit(nll, out_shardings=None if mesh is None else
                        sharding_lib.replicated(mesh))

  def place(self, params):
    """`params` where this evaluator's program takes them: on this process's first device, or in
    the training layout on the mesh (a no-op for a training state's or a restored state's)."""
    if self.mesh is None:
      return jax.device_put(params, jax.local_devices()[0])
    return jax.device_put(params, sharding_lib.state_shardings(params, self.mesh))

  def _batch_nll(self, params, batch: np.ndarray, valid: np.ndarray, key) -> np.ndarray:
    """float64[batch_size]: the NLL of each row of one batch (`params` placed by `place`)."""
    if self.mesh is None:
      out = self._nll(params, jnp.asarray(batch), jnp.asarray(valid), key)
    else:
      out = self._nll(params, sharding_lib.shard_batch(batch, self.mesh),
                      sharding_lib.shard_batch(valid, self.mesh),
                      sharding_lib.replicate(key, self.mesh))
    return np.asarray(out, np.float64)

  def split_nll(self, params, tokens: np.ndarray, key) -> tuple[float, int]:
    """(total NLL in nats, number of tokens) over a token stream for one evaluation key
    (`params` placed by `place`)."""
    total, count = 0.0, 0
    for i, (batch, valid) in enumerate(padded_batches(
        tokens, seq_len=self.seq_len, batch_size=self.batch_size,
        pad_id=self.objective.mask_id)):
      out = self._batch_nll(params, batch, valid, jax.random.fold_in(key, i))
      total += float(out[valid.any(axis=1)].sum())
      count += int(valid.sum())
    return total, count

  def rows_nll(self, params, rows: np.ndarray, key) -> np.ndarray:
    """-log p(row) in nats for each row of int32[N, L] (L <= seq_len), float64[N]: each row is
    padded at its end to seq_len and scored in batches of batch_size (the last one filled with
    all-padding rows), batch i with fold_in(key, i): the program `evaluate` runs, compiled once.
    Exact for the autoregressive objective (the key is then unused), else the bound."""
    rows = np.asarray(rows, np.int32)
    if rows.ndim != 2 or not 0 < rows.shape[1] <= self.seq_len:
      raise ValueError(f"rows must be [N, L] with 0 < L <= seq_len={self.seq_len}, got "
                       f"{rows.shape}")
    n, length = rows.shape
    tokens = np.full((n, self.seq_len), self.objective.mask_id, np.int32)
    tokens[:, :length] = rows
    valid = np.zeros((n, self.seq_len), bool)
    valid[:, :length] = True
    params = self.place(params)  # as `evaluate` places them
    out = []
    for i, (b, v) in enumerate(_fixed_batches(tokens, valid, batch_size=self.batch_size,
                                               pad_id=self.objective.mask_id)):
      out.append(self._batch_nll(params, b, v, jax.random.fold_in(key, i)))
    return np.concatenate(out)[:n] if out else np.zeros(0, np.float64)

  def evaluate(self, params, splits, *, seeds, max_tokens: int = 0, spread: bool = False,
               split_names=SPLITS) -> dict[str, Any]:
    """Metrics for each split: mean and std over seeds. Deterministic for fixed seeds.

    max_tokens: 0 scores the whole split; otherwise its first `max_tokens` tokens, or with
    `spread` about as many tokens in blocks spread evenly over the split
    (`pipeline.spread_blocks`: the periodic evaluation during training)."""
    seeds = tuple(seeds)
    # One placement for every call: parameters restored from a checkpoint live on one device,
    # a training state's on the run's mesh; as they are, the two would compile `nll` twice
    # (the placement is part of the compiled program) and could differ in rounding. Every
    # evaluation (periodic, final, --mode=eval) runs the same program: the single-device one,
    # or in a multi-process run the mesh's.
    params = self.place(params)
    results = {}
    for split_index, name in enumerate(split_names):
      full = getattr(splits, name)
      if spread:
        tokens = pipeline.spread_blocks(full, self.seq_len, max_tokens)
      else:
        tokens = full[:max_tokens] if max_tokens else full
      full_split = int(tokens.size) == int(full.size)
      subset = ("" if full_split else
                f"{tokens.size // self.seq_len} blocks spread over the split" if spread else
                f"first {tokens.size} tokens")
      words = _count_words(splits.tokenizer, tokens)
      per_seed = []
      for seed in seeds:
        key = jax.random.fold_in(jax.random.PRNGKey(seed), split_index)
        total, count = self.split_nll(params, tokens, key)
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
          "full_split": full_split,
          "subset": subset,
          "seeds": list(seeds),
          "num_time_samples": self.num_time_samples,
          "upper_bound": bool(self.objective.is_upper_bound),
      }
    return results

  def format_results(self, results: dict) -> str:
    lines = [f"Evaluation: {self.objective.describe()}; blocks of {self.seq_len} tokens; "
             f"{len(next(iter(results.values()))['seeds']) if results else 0} seeds x "
             f"K={self.num_time_samples} Monte Carlo draws per block."]
    if self.objective.is_upper_bound:
      lines.append("Diffusion numbers are UPPER BOUNDS on the true NLL / perplexity.")
    for name, r in results.items():
      subset = "" if r["full_split"] else f" [SUBSET: {r['subset']}]"
      lines.append(
          f"  {name:5s}: nll/token {r['nll_per_token']:.4f} ± {r['nll_per_token_std']:.4f} nats"
          f" | bits/token {r['bits_per_token']:.4f} | token ppl {r['token_ppl']:.2f}"
          f" | word ppl {r['word_ppl']:.2f} ± {r['word_ppl_std']:.2f}"
          f" ({r['num_tokens']} tokens, {r['num_words']} words){subset}")
    return "\n".join(lines)
