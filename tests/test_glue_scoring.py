"""Candidate scores with the output head only at the positions read (bdiff_jax.glue.objectives).

`CausalPrompt.scores` and `ClozePrompt.scores` with an `apply` from `models.bind` run the head
only at the label positions (causal: the first `max_label_tokens` positions with score_mask = 1,
with an exact fallback to every position; cloze: the mask). Their scores and the gradients of the
loss must equal the full-logits computation that a plain `apply` (logits only) takes, for:

* the Hugging Face OPT fixture (`hf_checkpoint.load_opt` + `classifier.OPTLM`), float32;
* bdiff autoregressive networks (standard and OPT backbones, full and adaptive heads), float64;
* bdiff diffusion networks scored at the mask (full and adaptive heads), float64.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax import models
from bdiff_jax.errors import ConfigError
from bdiff_jax.glue import objectives as classification
from bdiff_jax.models.classifier import OPTLM
from bdiff_jax.models.hf_checkpoint import load_opt
from bdiff_jax.train import builder
from tests import helpers
from tests.helpers import tiny_config

OPT_DIR = os.path.join(helpers.REPO, "tests", "fixtures", "tiny_opt")
VOCAB, LENGTH = 50, 16
ADAPTIVE = dict(head="adaptive", adaptive_cutoffs=(10, 25), adaptive_shrink=4)


def plain(bound):
  """The same network as a plain logits callable: the scores take the full-logits path."""
  return lambda *a, **kw: bound(*a, **kw)


class Spy(models.BoundNetwork):
  """A `BoundNetwork` that records the shapes its head rows and positions had (at trace time)."""

  def __init__(self, network, params):
    super().__init__(network, params, train=False)
    self.rows, self.positions = [], []

  def hidden(self, tokens, t=None, *, padding_mask=None, positions=None):
    self.positions.append(None if positions is None else positions.shape)
    return super().hidden(tokens, t, padding_mask=padding_mask, positions=positions)

  def token_nll(self, h, targets):
    self.rows.append(h.shape)
    return super().token_nll(h, targets)


def causal_batch(vocab, *, words=None, b=3, c=2, length=LENGTH, pad_left,
                 spans=((1, 1), (2, 3), (4, 2)), seed=0):
  """A causal batch [b, c, length]: row (i, j) has a real length and a scored span of
  spans[(i * c + j) % len(spans)] = (offset from the end of the row's text, tokens). Inputs are
  ids < vocab, targets ids < words (default vocab)."""
  rng = np.random.default_rng(seed)
  n = b * c
  inputs = rng.integers(0, vocab, (n, length)).astype(np.int32)
  targets = rng.integers(0, words or vocab, (n, length)).astype(np.int32)
  padding = np.zeros((n, length), bool)
  score_mask = np.zeros((n, length), np.float32)
  for r in range(n):
    real = length - (r % 4)
    start = length - real if pad_left else 0
    padding[r, start:start + real] = True
    back, num = spans[r % len(spans)]
    end = start + real - back + 1
    score_mask[r, end - num:end] = 1.0
  target = np.eye(c, dtype=np.float32)[rng.integers(0, c, b)]
  shape = (b, c, length)
  return {"inputs": jnp.asarray(inputs.reshape(shape)), "targets": jnp.asarray(
      targets.reshape(shape)), "padding": jnp.asarray(padding.reshape(shape)),
          "score_mask": jnp.asarray(score_mask.reshape(shape)), "target": jnp.asarray(target)}


def cloze_batch(vocab, *, b=4, c=3, length=LENGTH, seed=0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, vocab, (b, length)).astype(np.int32)
  real = length - np.arange(b) % 5
  padding = np.arange(length)[None, :] < real[:, None]
  mask_pos = (rng.integers(0, 1000, b) % real).astype(np.int32)
  inputs[np.arange(b), mask_pos] = vocab  # [MASK]
  # Candidates in the shortlist and in both tail clusters of the adaptive layout.
  cands = np.stack([rng.permutation([3, 17, 40])[:c] for _ in range(b)]).astype(np.int32)
  target = np.eye(c, dtype=np.float32)[rng.integers(0, c, b)]
  return {"inputs": jnp.asarray(inputs), "padding": jnp.asarray(padding),
          "mask_pos": jnp.asarray(mask_pos), "candidate_ids": jnp.asarray(cands),
          "t": jnp.asarray(rng.uniform(0.1, 0.9, b).astype(np.float32)),
          "target": jnp.asarray(target)}


def assert_same(objective, network, params, batch, *, rtol, atol):
  """Scores, loss and loss gradients of the gathered path equal the full-logits path."""

  def run(wrap):
    def loss(p):
      return objective.loss(wrap(models.bind(network, p, train=False)), batch, None)[0]

    scores = jax.jit(lambda p: objective.scores(wrap(models.bind(network, p, train=False)),
                                                batch))(params)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return np.asarray(scores), float(value), grads

  got, want = run(lambda a: a), run(plain)
  np.testing.assert_allclose(got[0], want[0], rtol=rtol, atol=atol)
  np.testing.assert_allclose(got[1], want[1], rtol=rtol, atol=atol)
  flat_got = jax.tree_util.tree_leaves_with_path(got[2])
  flat_want = jax.tree_util.tree_leaves(want[2])
  for (path, g), w in zip(flat_got, flat_want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))
  return got[0]


@pytest.fixture(scope="module")
def tiny_opt():
  cfg, params = load_opt(OPT_DIR)
  return OPTLM(cfg), {"opt": params}, cfg.vocab_size


@pytest.mark.parametrize("pad_left", [True, False])
@pytest.mark.parametrize("max_label_tokens", [4, 2])  # 2: some rows overflow (the fallback)
def test_opt_causal_scores_equal_full_logits(tiny_opt, pad_left, max_label_tokens):
  network, params, vocab = tiny_opt
  batch = causal_batch(vocab, pad_left=pad_left)
  objective = classification.CausalPrompt(max_label_tokens=max_label_tokens)
  scores = assert_same(objective, network, params, batch, rtol=2e-5, atol=2e-5)
  assert np.isfinite(scores).all() and np.ptp(scores) > 0.1  # not degenerate


def test_fallback_chunks_that_do_not_divide_the_sequence(tiny_opt):
  """A row of 4 scored tokens with max_label_tokens=3: the fallback scans the 16 positions 3
  at a time (6 chunks, the last padded) and still equals the full logits; row 0 scores its
  position 0, which the padding of the last chunk must not count again."""
  network, params, vocab = tiny_opt
  batch = causal_batch(vocab, b=2, pad_left=False, spans=((16, 1), (2, 4), (4, 2), (1, 1)))
  assert float(batch["score_mask"][0, 0, 0]) == 1.0
  objective = classification.CausalPrompt(max_label_tokens=3)
  assert classification.scored_tokens(batch["score_mask"]) == 4 and LENGTH % 3
  assert_same(objective, network, params, batch, rtol=2e-5, atol=2e-5)


def _one_row_batch(vocab, *, b=3, c=3, length=LENGTH, pad_left, seed=1):
  """A causal batch of one-token candidates in its one-row form (inputs [b, length], label_pos,
  candidate_ids [b, c]) as `encoding._encode_causal` writes it, and the same examples as C rows
  each (inputs [b, c, length]): row (i, j) is the context followed by candidate j."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, vocab, (b, length)).astype(np.int32)
  padding = np.zeros((b, length), bool)
  label_pos = np.zeros(b, np.int32)
  for i in range(b):
    n = int(rng.integers(3, length))  # the context's length (the inputs of every row)
    start = length - n if pad_left else 0
    padding[i, start:start + n] = True
    inputs[i][~padding[i]] = 1
    label_pos[i] = start + n - 1
  cands = rng.integers(0, vocab, (b, c)).astype(np.int32)
  rows = {"inputs": np.repeat(inputs[:, None], c, axis=1),
          "padding": np.repeat(padding[:, None], c, axis=1),
          "targets": np.zeros((b, c, length), np.int32),
          "score_mask": np.zeros((b, c, length), np.float32)}
  for i in range(b):
    nxt = np.roll(inputs[i], -1)  # targets are the inputs shifted by one...
    for j in range(c):
      rows["targets"][i, j] = np.where(padding[i], nxt, 1)
      rows["targets"][i, j, label_pos[i]] = cands[i, j]  # ...then the candidate
      rows["score_mask"][i, j, label_pos[i]] = 1.0
  target = np.eye(c, dtype=np.float32)[rng.integers(0, c, b)]
  one = {"inputs": inputs, "padding": padding, "label_pos": label_pos, "candidate_ids": cands,
         "target": target}
  rows["target"] = target
  to_jax = lambda d: {k: jnp.asarray(v) for k, v in d.items()}
  return to_jax(one), to_jax(rows)


def test_one_token_candidates_scored_from_one_row_equal_one_row_per_candidate(tiny_opt):
  """The one-row form of one-token candidates (C times fewer rows) gives the scores, loss and
  gradients of the C rows (whose path the tests above hold to the full logits); left padding,
  as OPT's encoder writes."""
  network, params, vocab = tiny_opt
  one, rows = _one_row_batch(vocab, pad_left=True)
  objective = classification.CausalPrompt()

  @jax.jit
  def run(p, batch):
    apply = lambda q: models.bind(network, q, train=False)
    loss, grads = jax.value_and_grad(lambda q: objective.loss(apply(q), batch, None)[0])(p)
    return objective.scores(apply(p), batch), loss, grads

  got, want = run(params, one), run(params, rows)
  assert np.isfinite(got[0]).all() and np.ptp(got[0]) > 0.1  # not degenerate
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)


def test_causal_head_runs_only_at_the_gathered_positions(tiny_opt):
  network, params, vocab = tiny_opt
  batch = causal_batch(vocab, pad_left=True)
  spy = Spy(network, params)
  classification.CausalPrompt(max_label_tokens=4).scores(spy, batch)
  # Traced once per lax.cond branch: the gathered rows [B*C, 4, E], and the fallback's chunk of
  # 4 positions in its scan over the whole sequence (never [B*C, L, E] at once).
  assert sorted(spy.rows) == [(6, 4, 16), (6, 4, 16)]
  spy = Spy(network, params)
  classification.CausalPrompt(max_label_tokens=LENGTH).scores(spy, batch)  # no fallback needed
  assert spy.rows == [(6, LENGTH, 16)]


def _bdiff(objective, *, dtype="float64", **model):
  kw = dict(dtype=dtype, objective=objective)
  if objective == "autoregressive":
    kw["time_conditioning"] = "none"
  kw.update(model)
  c = tiny_config(**kw)
  net = builder.build_network(c.model, vocab_size=VOCAB, max_len=LENGTH,
                              causal=objective == "autoregressive")
  params = models.init_params(net, jax.random.key(0), seq_len=LENGTH)
  # Non-zero biases, so that every bias path is exercised.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (x + 0.1 * jnp.linspace(-1.0, 1.0, x.size).reshape(x.shape)
                       if "bias" in jax.tree_util.keystr(path) else x), params)
  return net, params


@pytest.mark.parametrize("model", [
    dict(), dict(ADAPTIVE), dict(block="qwen3", **ADAPTIVE), dict(backbone="opt", num_layers=1)],
    ids=["full", "adaptive", "qwen3_adaptive", "opt_backbone"])
def test_bdiff_autoregressive_scores_equal_full_logits(model):
  with jax.enable_x64(True):
    net, params = _bdiff("autoregressive", **model)
    batch = causal_batch(VOCAB + 1, words=VOCAB, pad_left=False)
    # 3 label positions (the longest span: every row gathered exactly) for every network; 8
    # (positions past the spans) once: how many positions are gathered does not depend on the
    # network, and each k compiles four more float64 programs.
    for k in ((3, 8) if not model else (3,)):
      assert_same(classification.CausalPrompt(max_label_tokens=k), net, params, batch,
                  rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", [dict(), dict(ADAPTIVE), dict(block="qwen3", **ADAPTIVE)],
                         ids=["full", "adaptive", "qwen3_adaptive"])
def test_bdiff_diffusion_cloze_scores_equal_full_logits(model):
  with jax.enable_x64(True):
    net, params = _bdiff("diffusion", **model)
    batch = cloze_batch(VOCAB)
    objective = classification.ClozePrompt(time_conditioned=True)
    scores = assert_same(objective, net, params, batch, rtol=1e-6, atol=1e-6)
    assert np.ptp(scores) > 0.01
    spy = Spy(net, params)
    objective.scores(spy, batch)
    assert spy.positions == [(4, 1)] and spy.rows == [(4, 3, 32)]


def test_scored_tokens_and_bad_max_label_tokens():
  batch = causal_batch(VOCAB, pad_left=True)
  assert classification.scored_tokens(batch["score_mask"]) == 3
  assert classification.scored_tokens(np.zeros((2, 2, 5))) == 0
  with pytest.raises(ConfigError, match="max_label_tokens=0"):
    classification.CausalPrompt(max_label_tokens=0)
