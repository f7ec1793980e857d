"""The adaptive softmax output head (Grave et al., 2017): exact probabilities, far fewer logits.

Word ids are sorted by descending train frequency (`data.tokenizer.WordTokenizer`), so cutoffs
c_0 < c_1 < ... < c_{n-1} < V split the vocabulary into a *shortlist* [0, c_0) of frequent words
and n *tail clusters* [c_i, c_{i+1}) (c_n = V) of rarer ones. The head scores the shortlist plus
one logit per cluster at full width D; tail cluster i first projects the hidden state down to
d_i = D / shrink^(i+1) dimensions and scores its words there:

  p(w | h) = softmax(head(h))[w]                                        w in the shortlist,
  p(w | h) = softmax(head(h))[c_0 + i] * softmax(tail_i(h))[w - c_i]    w in cluster i.

Both factors are normalised, so p sums to exactly 1 over the V words: the model is an ordinary
categorical distribution and every likelihood (and diffusion ELBO bound) computed from it is as
valid as a full softmax's. What it saves: -log p(w | h) needs the head's c_0 + n logits and, only
when w is in a tail cluster, that cluster's logits. On WikiText-2 with cutoffs (4000, 12000) the
shortlist holds 85% of the training tokens, so a row costs about 4k logits instead of 33k.

`token_nll` runs each tail cluster only on the rows whose target is in it: they are gathered into
a buffer of a fixed number of rows (`tail_capacity`, a fraction of the rows), and a batch with
more such rows takes an exact fallback (`lax.cond`) that runs the cluster on every row. Either way
the result equals -log_probs(h)[target] up to the order of floating-point additions.

Everything here is a pure function of arrays; the network (`network.Network`, `model.head =
"adaptive"`) owns the parameters and passes their values in:
  shortlist_fn(rows [R, D]) -> logits [R, c_0 + n]    (shortlist words, then one per cluster)
  tail_fn(i, rows [R, D]) -> logits [R, c_{i+1} - c_i]
"""

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from bdiff_jax.models import cross_entropy

ShortlistFn = Callable[[jnp.ndarray], jnp.ndarray]
TailFn = Callable[[int, jnp.ndarray], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class Layout:
  """The static shape of an adaptive head over `vocab_size` words."""
  vocab_size: int
  cutoffs: tuple[int, ...]  # c_0 < ... < c_{n-1} < vocab_size
  tail_dims: tuple[int, ...]  # d_i, the projection width of tail cluster i

  @property
  def num_tails(self) -> int:
    return len(self.cutoffs)

  @property
  def shortlist_size(self) -> int:
    return self.cutoffs[0]

  @property
  def head_size(self) -> int:
    """Logits of the head: the shortlist words, then one per tail cluster."""
    return self.cutoffs[0] + self.num_tails

  def tail_range(self, i: int) -> tuple[int, int]:
    """[lo, hi): the word ids of tail cluster i."""
    bounds = self.cutoffs + (self.vocab_size,)
    return bounds[i], bounds[i + 1]


def layout_problem(vocab_size: int, cutoffs: Sequence[int], emb_dim: int, shrink: int) -> str:
  """"" if the settings make a head, else what is wrong with them (one sentence)."""
  cutoffs = tuple(cutoffs)
  if not cutoffs:
    return "model.adaptive_cutoffs is empty (give at least one cutoff, e.g. (4000, 12000))"
  if any(not isinstance(c, int) or isinstance(c, bool) for c in cutoffs):
    return f"model.adaptive_cutoffs={cutoffs!r} must be integers"
  if cutoffs[0] < 1 or any(b <= a for a, b in zip(cutoffs, cutoffs[1:])):
    return f"model.adaptive_cutoffs={cutoffs!r} must be positive and strictly increasing"
  if vocab_size is not None and cutoffs[-1] >= vocab_size:
    return (f"model.adaptive_cutoffs={cutoffs!r} must stay below the vocabulary size "
            f"({vocab_size}), so that every tail cluster holds at least one word")
  if not isinstance(shrink, int) or isinstance(shrink, bool) or shrink < 1:
    return f"model.adaptive_shrink={shrink!r} must be an integer >= 1"
  if emb_dim // shrink ** len(cutoffs) < 1:
    return (f"model.adaptive_shrink={shrink} leaves tail cluster {len(cutoffs)} of an "
            f"emb_dim={emb_dim} model with no dimension (emb_dim / shrink^{len(cutoffs)} < 1)")
  return ""


def make_layout(vocab_size: int, cutoffs: Sequence[int], emb_dim: int, shrink: int) -> Layout:
  """The layout of the head; raises ValueError for settings `layout_problem` rejects."""
  problem = layout_problem(vocab_size, cutoffs, emb_dim, shrink)
  if problem:
    raise ValueError(problem + ".")
  dims = tuple(emb_dim // shrink ** (i + 1) for i in range(len(cutoffs)))
  return Layout(int(vocab_size), tuple(int(c) for c in cutoffs), dims)


def tail_capacity(num_rows: int, fraction: float) -> int:
  """Rows of each tail cluster's gathered buffer for `num_rows` rows: ceil(fraction * rows),
  rounded up to a multiple of 16 and capped at the rows (then there is no fallback)."""
  cap = int(math.ceil(max(float(fraction), 0.0) * num_rows / 16.0)) * 16
  return max(1, min(cap, int(num_rows)))


def cluster_targets(layout: Layout, targets: jnp.ndarray) -> jnp.ndarray:
  """The head's target per row: the word itself in the shortlist, else c_0 + its cluster."""
  cluster = jnp.zeros(targets.shape, jnp.int32)
  for c in layout.cutoffs:
    cluster = cluster + (targets >= c).astype(jnp.int32)
  return jnp.where(cluster == 0, targets, layout.shortlist_size + cluster - 1).astype(jnp.int32)


def log_probs(layout: Layout, shortlist_logits: jnp.ndarray,
              tail_logits: Sequence[jnp.ndarray]) -> jnp.ndarray:
  """log p(w | h) for every word: [..., V] (float32 or wider), normalised over the V words."""
  dtype = jnp.promote_types(shortlist_logits.dtype, jnp.float32)
  head = jax.nn.log_softmax(shortlist_logits.astype(dtype), axis=-1)
  parts = [head[..., :layout.shortlist_size]]
  for i, logits in enumerate(tail_logits):
    cluster = head[..., layout.shortlist_size + i:layout.shortlist_size + i + 1]
    parts.append(cluster + jax.nn.log_softmax(logits.astype(dtype), axis=-1))
  return jnp.concatenate(parts, axis=-1)


def token_nll(layout: Layout, shortlist_fn: ShortlistFn, tail_fn: TailFn, rows: jnp.ndarray,
              targets: jnp.ndarray, *, capacity_fraction: float) -> jnp.ndarray:
  """-log p(target | row) per row: rows [R, D], targets int[R] in [0, V) -> float[R].

  The head runs on every row; tail cluster i only on the rows whose target is in it (gathered,
  `tail_capacity(R, capacity_fraction)` rows, with an exact fallback to all R rows when more
  targets fall in the cluster). Equal to -log_probs(...)[target] up to summation order.
  """
  targets = jnp.asarray(targets, jnp.int32)
  num_rows = rows.shape[0]
  nll = cross_entropy.token_nll(shortlist_fn(rows), cluster_targets(layout, targets))
  cap = tail_capacity(num_rows, capacity_fraction)
  for i in range(layout.num_tails):
    lo, hi = layout.tail_range(i)
    inside = (targets >= lo) & (targets < hi)
    local = jnp.clip(targets - lo, 0, hi - lo - 1)

    def every_row(i=i, inside=inside, local=local):
      return jnp.where(inside, cross_entropy.token_nll(tail_fn(i, rows), local), 0.0)

    if cap >= num_rows:
      nll = nll + every_row()
      continue
    count = jnp.sum(inside, dtype=jnp.int32)

    def gathered(i=i, inside=inside, local=local, count=count):
      idx = jnp.nonzero(inside, size=cap, fill_value=0)[0].astype(jnp.int32)
      part = cross_entropy.token_nll(tail_fn(i, rows[idx]), local[idx])
      part = jnp.where(jnp.arange(cap, dtype=jnp.int32) < count, part, 0.0)
      # Each row is gathered at most once; the padding entries (index 0) add exactly 0.
      return jnp.zeros((num_rows,), part.dtype).at[idx].add(part)

    nll = nll + jax.lax.cond(count <= cap, gathered, every_row)
  return nll


def bias_values(layout: Layout, log_probs_v: jnp.ndarray) -> tuple[jnp.ndarray, list]:
  """(head bias [c_0 + n], [tail bias i [c_{i+1} - c_i]]) that make a head with zero kernels
  predict exactly the distribution `log_probs_v` [V] (e.g. the unigram model of the train split):
  the shortlist words keep their log-probabilities, cluster i gets log P(cluster i) and its
  words log p(w | cluster i)."""
  logp = jnp.asarray(log_probs_v)
  head = [logp[:layout.shortlist_size]]
  tails = []
  for i in range(layout.num_tails):
    lo, hi = layout.tail_range(i)
    mass = jax.scipy.special.logsumexp(logp[lo:hi])
    head.append(mass[None])
    tails.append(logp[lo:hi] - mass)
  return jnp.concatenate(head), tails
