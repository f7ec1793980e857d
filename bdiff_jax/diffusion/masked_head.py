"""The output head and its cross-entropy, run only at the masked positions of a batch.

The diffusion ELBO scores masked positions only (about half of them on average), and at a large
vocabulary the head (a [N, D] x [D, V] product), its log-softmax and their gradients are most of
a train step. Here the masked positions of the whole batch are gathered into a buffer of a fixed
number of rows C (the *capacity*), the head and the cross-entropy run on those rows only, and
the per-sequence sums come back through a one-hot [C, B] product (no scatter). When a batch has
more than C masked positions, a `lax.cond` switches to an exact fallback that runs the same
computation over all masked positions in chunks of C rows (the chunk body rematerialised, so
memory stays at one chunk). Either way the result equals the full-head computation up to the
order of floating-point additions. The head is passed as a row NLL function (`RowsNllFn`), so a
head that need not compute all V logits per row (the adaptive head) runs the same way.

Capacity (`masked_capacity`): with M the number of masked positions of a batch of B sequences of
length L, each position masked independently with probability p(t_b) = 1 - alpha(t_b),

  E[M | t] = L * sum_b p(t_b),    Var[M | t] = L * sum_b p(t_b) (1 - p(t_b)).

With antithetic (stratified) times the t_b are fixed by one offset u, and the multiset of times
repeats with period 1/B in u, so C = max over a fine grid of u in [0, 1/B) of
E[M | t(u)] + k * sqrt(Var[M | t(u)]): M then exceeds C with probability about P(Z > k) for a
standard normal Z (~3e-7 at the default k = 5); every draw of `nll_bound_gathered` is
stratified the same way (`time_draws.eval_times`). With iid times (`antithetic=False`) the t_b
vary too:
E[M] = B L E[p], Var[M] = B (L E[p (1 - p)] + L^2 Var[p]) (law of total variance), and
C = E[M] + k * sqrt(Var[M]) (a normal approximation; overflows stay exact, only slower). C is
rounded up to a multiple of 16 (GEMM-friendly, and at most 15 padded rows) and capped at B * L.
"""

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bdiff_jax.diffusion.schedules import Schedule
from bdiff_jax.models.cross_entropy import token_nll

HeadFn = Callable[[jnp.ndarray], jnp.ndarray]  # [..., D] -> logits [..., V]
# (rows [C, D], targets int32[C]) -> -log p(target | row), float[C]: the output head and its
# cross-entropy in one, so that a head can score rows without computing all V logits
# (`Network.token_nll`; the adaptive head). `head_nll(head_fn)` makes one from a logits head.
RowsNllFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]

DEFAULT_NUM_STD = 5.0
_GRID = 256  # offsets u per stratum (antithetic) / time points (iid) in the capacity integrals


def _round_up(x: float, multiple: int) -> int:
  return int(math.ceil(x / multiple) * multiple)


def masked_capacity(schedule: Schedule, batch_size: int, seq_len: int, *,
                    antithetic: bool = True, num_std: float = DEFAULT_NUM_STD) -> int:
  """Rows C of the masked-position buffer for a batch [batch_size, seq_len] (see module doc).

  Args:
    schedule: the masking schedule (p(t) = schedule.mask_prob(t)).
    batch_size: B, sequences per batch.
    seq_len: L, positions per sequence.
    antithetic: whether the batch's times are stratified (`sample_times(antithetic=True)`);
      False for iid times.
    num_std: k, standard deviations of the masked count above its mean.

  Returns:
    int C in [1, B * L]: a multiple of 16, or B * L.
  """
  b, l = int(batch_size), int(seq_len)

  def mask_prob(t):  # float64 numpy, evaluated now even while a caller is being traced
    with jax.ensure_compile_time_eval():
      return np.clip(np.asarray(schedule.mask_prob(jnp.asarray(t)), np.float64), 0.0, 1.0)

  if antithetic:
    # Offsets u in [0, 1/B): every other u gives one of these multisets of times.
    u = (np.arange(_GRID) + 0.5) / (_GRID * b)
    t = 1.0 - np.mod(u[:, None] + np.arange(b)[None, :] / b, 1.0)  # [G, B]
    p = mask_prob(t)
    mean = l * p.sum(axis=1)
    std = np.sqrt(l * (p * (1.0 - p)).sum(axis=1))
    cap = float(np.max(mean + num_std * std))
  else:
    t = (np.arange(16 * _GRID) + 0.5) / (16 * _GRID)
    p = mask_prob(t)
    mean = b * l * p.mean()
    var = b * (l * np.mean(p * (1.0 - p)) + l * l * np.var(p))
    cap = mean + num_std * math.sqrt(var)
  n = b * l
  cap = _round_up(max(cap, 1.0), 16)
  return int(min(cap, n))


def count_capacity(batch_size: int, seq_len: int, *, antithetic: bool = True,
                   num_std: float = DEFAULT_NUM_STD) -> int:
  """Rows C of the masked-position buffer for the count estimator of `bdiff_jax.diffusion.elbo`.

  Row b masks exactly k_b = ceil(s_b L) positions (`corruption.counts_from_uniform`). With antithetic (stratified) s_b, sum_b s_b
  <= (B + 1) / 2 for every offset, so M = sum_b k_b < L (B + 1) / 2 + B: C is that bound and a
  batch never overflows (a training batch, and each draw of `nll_bound_gathered`; padded rows
  mask ceil(s_b L_b) <= ceil(s_b L) positions). With iid k_b uniform on {1..L}
  (`antithetic=False`), E[M] = B (L + 1) / 2, Var[M] = B (L^2 - 1) / 12 and C = E[M] + k sd[M]
  (overflows stay exact, only slower). Rounded up to a multiple of 16 and capped at B * L.
  """
  b, l = int(batch_size), int(seq_len)
  if antithetic:
    cap = l * (b + 1) / 2 + b
  else:
    cap = b * (l + 1) / 2 + num_std * math.sqrt(b * (l * l - 1) / 12)
  return int(min(_round_up(max(cap, 1.0), 16), b * l))


def head_nll(head_fn: HeadFn) -> RowsNllFn:
  """The row NLL of a head that returns logits: `token_nll(head_fn(rows), targets)`."""
  return lambda rows, targets: token_nll(head_fn(rows), targets)


def _rows_nll_sums(h, tokens, idx, valid, nll_fn, batch_size: int, seq_len: int):
  """Per-sequence sums [B] of the token NLL of rows idx [C] (valid [C]) of h [B*L, D]."""
  # Padding rows (index 0) target word 0: an adaptive head then runs none of its tail clusters
  # for them (tokens[0] may be a rare word), and they add nothing below, not even a NaN.
  nll = nll_fn(h[idx], jnp.where(valid, tokens[idx], 0))
  nll = jnp.where(valid, nll, 0.0)
  seq = idx // seq_len
  onehot = (seq[:, None] == jnp.arange(batch_size, dtype=idx.dtype)[None, :]).astype(nll.dtype)
  return nll @ onehot


def _chunked_sums(h, y, idx, valid, nll_fn, batch_size: int, seq_len: int, rows: int):
  """`_rows_nll_sums` over idx [K * rows] in K chunks of `rows`, one chunk's head at a time.

  The chunk body is rematerialised: the backward keeps only each chunk's indices and recomputes
  its logits, so memory is that of one chunk whatever K is.
  """
  chunks = idx.shape[0] // rows

  @jax.checkpoint
  def body(total, chunk):
    return total + _rows_nll_sums(h, y, chunk[0], chunk[1], nll_fn, batch_size, seq_len), None

  out = jax.eval_shape(lambda: _rows_nll_sums(h, y, idx[:rows], valid[:rows], nll_fn,
                                               batch_size, seq_len))
  total, _ = jax.lax.scan(body, jnp.zeros(out.shape, out.dtype),
                          (idx.reshape(chunks, rows), valid.reshape(chunks, rows)))
  return total


def masked_nll_sums(hidden: jnp.ndarray, nll_fn: RowsNllFn, tokens: jnp.ndarray,
                    masked: jnp.ndarray, *, capacity: int,
                    chunk_rows: Optional[int] = None) -> jnp.ndarray:
  """sum_{i masked} nll_fn(hidden[b, i], tokens[b, i]) per sequence.

  Equal (up to summation order) to the same sums computed at every position: for a logits head
  (`head_nll(head_fn)`), to the sums of -log softmax(head_fn(hidden))[tokens] over the full
  logits [B, L, V].

  Args:
    hidden: float[B, L, D] the head's inputs (final-normed hidden states).
    nll_fn: (rows [C, D], targets [C]) -> -log p(target | row) [C] (`RowsNllFn`).
    tokens: int[B, L] target tokens in [0, V).
    masked: bool[B, L] the positions that are scored.
    capacity: C, rows of the gathered buffer (`masked_capacity`); batches with more masked
      positions take the exact chunked fallback.
    chunk_rows: None: the head runs on all C rows at once (fastest; holds [C, V] logits and
      their gradient). An int R: it runs on R rows at a time, recomputing each chunk's logits in
      the backward (one more head forward, ~1/3 more head FLOPs; holds [R, V]), for memory.
      C is rounded up to a multiple of R.

  Returns:
    float[B] (float32, or float64 for float64 logits), in nats.
  """
  b, l = masked.shape
  n = b * l
  capacity = max(1, min(int(capacity), n))
  rows = capacity if not chunk_rows else max(1, min(int(chunk_rows), capacity))
  capacity = -(-capacity // rows) * rows
  h = hidden.reshape(n, hidden.shape[-1])
  y = jnp.asarray(tokens, jnp.int32).reshape(n)
  m = masked.reshape(n)
  count = jnp.sum(m, dtype=jnp.int32)

  def gathered(size):
    idx = jnp.nonzero(m, size=size, fill_value=0)[0].astype(jnp.int32)
    return idx, jnp.arange(size, dtype=jnp.int32) < count

  def one_buffer():
    idx, valid = gathered(capacity)
    if rows == capacity:
      return _rows_nll_sums(h, y, idx, valid, nll_fn, b, l)
    return _chunked_sums(h, y, idx, valid, nll_fn, b, l, rows)

  if capacity >= n:
    return one_buffer()

  def all_masked():  # exact fallback: every masked position, in chunks of `rows`
    idx, valid = gathered(-(-n // rows) * rows)
    return _chunked_sums(h, y, idx, valid, nll_fn, b, l, rows)

  return jax.lax.cond(count <= capacity, one_buffer, all_masked)


def subsampled_nll_sums(hidden: jnp.ndarray, nll_fn: RowsNllFn, tokens: jnp.ndarray,
                        masked: jnp.ndarray, key: jax.Array, *, per_row: int) -> jnp.ndarray:
  """An unbiased estimate of `masked_nll_sums`, the head run at <= per_row positions per row.

  Row b with k_b masked positions scores a uniform random subset S_b of m_b = min(k_b, per_row)
  of them and returns (k_b / m_b) sum_{i in S_b} nll_fn(hidden[b, i], tokens[b, i]).
  Each masked position is in S_b with probability m_b / k_b, so the expectation over S_b is the
  sum over all k_b masked positions; a row with k_b <= per_row is scored exactly (S_b is all of
  them). The head runs on B * per_row rows: a fixed shape, no capacity and no fallback. For
  training only (it adds variance; the evaluation bound scores every masked position).

  Args:
    hidden: float[B, L, D] the head's inputs.
    nll_fn: (rows [C, D], targets [C]) -> -log p(target | row) [C] (`RowsNllFn`).
    tokens: int[B, L] target tokens in [0, V).
    masked: bool[B, L] the positions that are scored.
    key: PRNG key for the subsets; consumed.
    per_row: positions scored per row at most (>= 1).

  Returns:
    float[B] (float32, or float64 for float64 logits), in nats.
  """
  b, l = masked.shape
  m_cap = max(1, min(int(per_row), l))
  # Random keys at the masked positions, +inf elsewhere: the m_cap smallest are a uniform
  # random subset of the masked positions (all of them when there are at most m_cap).
  scores = jnp.where(masked, jax.random.uniform(key, (b, l)), jnp.inf)
  _, pos = jax.lax.top_k(-scores, m_cap)  # [B, m_cap], most negative = smallest key first
  k = jnp.sum(masked, axis=-1, dtype=jnp.int32)
  m = jnp.minimum(k, m_cap)
  chosen = jnp.arange(m_cap, dtype=jnp.int32)[None, :] < m[:, None]  # [B, m_cap]
  rows = (jnp.arange(b, dtype=jnp.int32)[:, None] * l + pos.astype(jnp.int32)).reshape(-1)
  h = hidden.reshape(b * l, hidden.shape[-1])
  y = jnp.asarray(tokens, jnp.int32).reshape(b * l)
  nll = nll_fn(h[rows], y[rows]).reshape(b, m_cap)
  total = jnp.sum(jnp.where(chosen, nll, 0.0), axis=-1)
  scale = k.astype(total.dtype) / jnp.maximum(m, 1).astype(total.dtype)
  return total * scale
