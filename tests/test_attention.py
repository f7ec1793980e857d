"""Attention masks, candidate-selection sparse attention and the Qwen3-style block.

Everything runs on tiny random networks in-process, in both backbones (standard and reversible):

  * causal mode: changing token i leaves the logits at positions < i bit-identical and changes
    some at positions >= i; bidirectional mode: it changes positions < i too;
  * padding: changing a padded token changes nothing at real positions, in both modes;
  * candidate selection: checked against an independent NumPy ranking (diagonal always kept,
    exactly k kept per row, sign agreement then lower index), k >= L equals dense attention
    exactly, and a key outside a query's kept set has no influence on that query;
  * Qwen3 block: no biases, QK-norm, grouped-query kv heads, SwiGLU; GQA equals multi-head
    attention with the kv heads repeated; QK-norm makes attention invariant to the q/k scale.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax.config import configuration
from bdiff_jax.models import init_params
from tests import helpers
from bdiff_jax.models.layers import Attention, attention_mask, candidate_selection_mask
from bdiff_jax.models.spec import ModelSpec

VOCAB = 40
LENGTH = 12
BATCH = 2
BACKBONES = ("standard", "reversible")


_DEFAULTS = dict(backbone="standard", block="qwen3", objective="diffusion", num_layers=2,
                 emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
                 attention="dense", candidate_k=0)


def _network(**overrides):
  """A tiny network; `overrides` are config.model fields. Diffusion models are time-conditioned
  (adaLN) unless told otherwise; AR models never are."""
  m = configuration.base_config().model
  fields = dict(_DEFAULTS, **overrides)
  fields.setdefault("time_conditioning",
                    "adaln" if fields["objective"] == "diffusion" else "none")
  if fields["objective"] == "autoregressive":
    fields["time_conditioning"] = "none"
  for k, v in fields.items():
    m[k] = v
  return helpers.network(m, vocab_size=VOCAB, max_len=LENGTH)


class _Model:
  """A network, its initial params and a jitted logits function (params may be swapped)."""

  def __init__(self, net):
    self.net = net
    self._params = None
    t = jnp.full((BATCH,), 0.5)
    self._fn = jax.jit(lambda p, tok, pad: net.apply({"params": p}, tok, t, train=False,
                                                     padding_mask=pad))

  @property
  def params(self):
    if self._params is None:
      net = self.net
      self._params = jax.jit(lambda key: init_params(net, key, seq_len=LENGTH))(
          jax.random.key(0))
    return self._params

  def logits(self, tokens, pad=None, params=None):
    params = self.params if params is None else params
    return np.asarray(self._fn(params, tokens, _NO_PADDING if pad is None else pad))


_MODELS = {}  # compiled models shared by the tests of this module (compilation dominates)


def _model(**overrides) -> _Model:
  net = _network(**overrides)
  if net.spec not in _MODELS:
    _MODELS[net.spec] = _Model(net)
  return _MODELS[net.spec]


def _tokens(seed=0):
  return jax.random.randint(jax.random.key(seed), (BATCH, LENGTH), 0, VOCAB)


_NO_PADDING = jnp.ones((BATCH, LENGTH), bool)


def _change_token(tokens, i):
  return tokens.at[:, i].set((tokens[:, i] + 7) % VOCAB)


def _max_abs(a):
  return float(np.max(np.abs(a))) if a.size else 0.0


# ------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("backbone,block,objective", [
    ("standard", "qwen3", "autoregressive"),
    ("reversible", "qwen3", "autoregressive"),
    ("standard", "simple", "autoregressive"),
    ("standard", "qwen3", "diffusion"),
    ("reversible", "qwen3", "diffusion"),
])
def test_masks(backbone, block, objective):
  """Causal: the past is blind to a change at i. Bidirectional: it is not. Padding: a change at
  a padded position is invisible at every real position, in both modes."""
  model = _model(backbone=backbone, block=block, objective=objective)
  net, logits = model.net, model.logits
  assert net.spec.causal == (objective == "autoregressive")
  assert net.spec.time_conditioned == (objective == "diffusion")
  tokens = _tokens()
  base = logits(tokens)
  if net.spec.causal:
    for i in (0, 5, LENGTH - 1):
      changed = logits(_change_token(tokens, i))
      np.testing.assert_array_equal(changed[:, :i], base[:, :i])  # bit-identical past
      assert _max_abs(changed[:, i:] - base[:, i:]) > 1e-4, i  # the change is visible from i on
  else:
    i = LENGTH - 1
    changed = logits(_change_token(tokens, i))
    # Every earlier position of every sequence sees the change of the last token.
    per_position = np.max(np.abs(changed[:, :i] - base[:, :i]), axis=-1)
    assert np.all(per_position > 1e-6), per_position
  real = np.array([LENGTH, 7])  # sequence 1 has 5 padded positions at the end
  pad = jnp.asarray(np.arange(LENGTH)[None, :] < real[:, None])
  padded = logits(tokens, pad)
  changed = logits(tokens.at[1, 7:].set((tokens[1, 7:] + 3) % VOCAB), pad)
  np.testing.assert_array_equal(changed[1, :7], padded[1, :7])
  np.testing.assert_array_equal(changed[0], padded[0])
  np.testing.assert_array_equal(padded[0], base[0])  # an all-real row is unaffected by the mask
  if not net.spec.causal:
    # The mask is not a no-op: without it the real positions would see the padded tokens.
    assert _max_abs(base[1, :7] - padded[1, :7]) > 1e-6


def test_attention_mask_function():
  pad = jnp.array([[True, True, False], [True, True, True]])
  causal = np.asarray(attention_mask(3, causal=True, padding_mask=pad))
  assert causal.shape == (2, 1, 3, 3)
  np.testing.assert_array_equal(causal[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 0]])
  np.testing.assert_array_equal(causal[1, 0], np.tril(np.ones((3, 3))))
  bidir = np.asarray(attention_mask(3, causal=False, padding_mask=pad))
  np.testing.assert_array_equal(bidir[0, 0], [[1, 1, 0]] * 3)
  np.testing.assert_array_equal(bidir[1, 0], np.ones((3, 3)))


# ------------------------------------------------------------------------------ candidate selection


_candidates = jax.jit(candidate_selection_mask, static_argnums=3)


def _reference_candidates(q, k, allowed, num):
  """NumPy statement of the rule: per query, allowed keys sorted by sign agreement (desc), then
  key index (asc); the diagonal first whenever allowed; keep the first `num`."""
  q, k, allowed = np.asarray(q), np.asarray(k), np.asarray(allowed)
  b, length, h, _ = q.shape
  allowed = np.broadcast_to(allowed, (b, h, length, length))
  out = np.zeros((b, h, length, length), bool)
  for bi in range(b):
    for hi in range(h):
      for i in range(length):
        keys = [j for j in range(length) if allowed[bi, hi, i, j]]
        agree = {j: int(np.sign(q[bi, i, hi]) @ np.sign(k[bi, j, hi])) for j in keys}
        order = sorted(keys, key=lambda j: (j != i, -agree[j], j))
        out[bi, hi, i, order[:num]] = True
  return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num", [1, 3, 5])
def test_candidate_mask_matches_reference(causal, num):
  key_q, key_k = jax.random.split(jax.random.key(3))
  length, heads, dim = 9, 2, 4  # small head_dim: many ties, which must break to lower index
  q = jax.random.normal(key_q, (2, length, heads, dim))
  k = jax.random.normal(key_k, (2, length, heads, dim))
  pad = jnp.asarray(np.arange(length)[None, :] < np.array([length, 6])[:, None])
  allowed = attention_mask(length, causal=causal, padding_mask=pad)
  mask = np.asarray(_candidates(q, k, allowed, num))
  np.testing.assert_array_equal(mask, _reference_candidates(q, k, allowed, num))
  allowed_b = np.broadcast_to(np.asarray(allowed), mask.shape)
  assert not np.any(mask & ~allowed_b)  # never un-masks a masked key
  diag = np.eye(length, dtype=bool)[None, None] & allowed_b
  assert np.all(mask[diag])  # the diagonal is kept wherever it is allowed
  kept, avail = mask.sum(-1), allowed_b.sum(-1)
  np.testing.assert_array_equal(kept, np.minimum(avail, num))  # exactly k when allowed >= k


def test_candidate_mask_is_not_only_the_diagonal():
  # The sibling prototype's bug: every query ended up attending only to itself.
  q = jax.random.normal(jax.random.key(0), (1, 16, 2, 8))
  k = jax.random.normal(jax.random.key(1), (1, 16, 2, 8))
  mask = np.asarray(_candidates(q, k, attention_mask(16, causal=False), 4))
  assert np.all(mask.sum(-1) == 4)
  off_diag = mask & ~np.eye(16, dtype=bool)[None, None]
  assert np.all(off_diag.sum(-1) == 3)


@pytest.mark.parametrize("backbone,objective", [("standard", "autoregressive"),
                                                ("reversible", "diffusion")])
def test_candidate_with_large_k_equals_dense(backbone, objective):
  dense = _model(backbone=backbone, objective=objective)
  tokens = _tokens()
  pad = jnp.asarray(np.arange(LENGTH)[None, :] < np.array([LENGTH, 9])[:, None])
  base = dense.logits(tokens, pad)
  # Candidate selection adds no parameters: the dense model's params serve all.
  sparse = _model(backbone=backbone, objective=objective, attention="candidate",
                  candidate_k=LENGTH)
  np.testing.assert_array_equal(sparse.logits(tokens, pad, dense.params), base)
  # A small k is a different function (the comparison above is not vacuous).
  small = _model(backbone=backbone, objective=objective, attention="candidate", candidate_k=2)
  assert _max_abs(small.logits(tokens, pad, dense.params) - base) > 1e-4


def test_candidate_perturbation_outside_kept_set_has_no_effect():
  """Module-level: perturb the key and value of one position j. Keys are perturbed by positive
  per-element factors (learned positions, no QK-norm: the signs, hence the ranking, stay), values
  arbitrarily. Queries that did not keep j are bit-identical; those that kept j change."""
  spec = ModelSpec(vocab_size=VOCAB, max_len=LENGTH, block="simple", positional="learned",
                   emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
                   attention="candidate", candidate_k=3, time_conditioning="none")
  x = jax.random.normal(jax.random.key(0), (1, LENGTH, spec.emb_dim))
  module = Attention(spec)
  params = jax.jit(module.init)(jax.random.key(1), x)
  j = 4
  factors = jax.random.uniform(jax.random.key(2), (spec.num_kv_heads, spec.head_dim), minval=0.3,
                               maxval=3.0)
  noise = jax.random.normal(jax.random.key(3), (spec.num_kv_heads, spec.head_dim))
  captured = {}

  def interceptor(perturb):
    def intercept(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      name = context.module.name
      if context.method_name == "__call__" and name in ("query", "key", "value"):
        if perturb and name == "key":
          out = out.at[:, j].multiply(factors)
        if perturb and name == "value":
          out = out.at[:, j].add(noise)
        captured[(perturb, name)] = out
      return out
    return intercept

  def run(perturb):
    def fn(p, inputs):
      captured.clear()
      with nn.intercept_methods(interceptor(perturb)):
        out = module.apply(p, inputs)
      return out, {name: captured[(perturb, name)] for name in ("query", "key")}
    out, qk = jax.jit(fn)(params, x)
    return np.asarray(out), qk

  base, qk_base = run(False)
  pert, qk_pert = run(True)
  groups = spec.num_heads // spec.num_kv_heads
  masks = []
  for qk in (qk_base, qk_pert):
    k = jnp.repeat(qk["key"], groups, axis=2)
    masks.append(np.asarray(_candidates(qk["query"], k, attention_mask(LENGTH, causal=False),
                                        spec.candidate_k)))
  np.testing.assert_array_equal(masks[0], masks[1])  # the perturbation keeps the ranking
  keeps_j = masks[0][0, :, :, j].any(axis=0)  # [L]: some head of query i kept key j
  assert keeps_j.sum() >= 2 and (~keeps_j).sum() >= 2, keeps_j  # both cases occur
  np.testing.assert_array_equal(pert[0, ~keeps_j], base[0, ~keeps_j])
  assert np.all(np.max(np.abs(pert[0, keeps_j] - base[0, keeps_j]), axis=-1) > 1e-6)


# ------------------------------------------------------------------------------ Qwen3 block


def _shapes(net):
  return jax.eval_shape(lambda: init_params(net, jax.random.key(0), seq_len=LENGTH))


def _paths(params):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(getattr(p, "key", p)) for p in path): leaf.shape for path, leaf in flat}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_qwen3_block_structure(backbone):
  net = _network(backbone=backbone, block="qwen3", num_layers=3, time_conditioning="none")
  s = net.spec
  paths = _paths(_shapes(net))
  assert not [p for p in paths if "bias" in p]
  attn = "backbone/layers/attn/attention/"
  mlp = "backbone/layers/mlp/mlp/"
  assert paths[attn + "query/kernel"] == (3, s.emb_dim, s.num_heads, s.head_dim)
  assert paths[attn + "key/kernel"] == (3, s.emb_dim, s.num_kv_heads, s.head_dim)
  assert paths[attn + "value/kernel"] == (3, s.emb_dim, s.num_kv_heads, s.head_dim)
  assert paths[attn + "out/kernel"] == (3, s.num_heads, s.head_dim, s.emb_dim)
  assert paths[attn + "query_norm/scale"] == (3, s.head_dim)
  assert paths[attn + "key_norm/scale"] == (3, s.head_dim)
  assert paths[mlp + "gate/kernel"] == (3, s.emb_dim, s.mlp_dim)
  assert paths[mlp + "up/kernel"] == (3, s.emb_dim, s.mlp_dim)
  assert paths[mlp + "down/kernel"] == (3, s.mlp_dim, s.emb_dim)
  # RMSNorm everywhere: a scale and nothing else.
  norms = [p for p in paths if "norm" in p]
  assert norms and all(p.endswith("/scale") for p in norms), norms
  # The simple block, for contrast: biases, GELU MLP without a gate, no QK-norm.
  simple = _paths(_shapes(_network(backbone=backbone, block="simple", time_conditioning="none")))
  assert any(p.endswith("query/bias") for p in simple)
  assert not any("gate" in p or "query_norm" in p for p in simple)


def test_qwen3_with_time_conditioning_has_no_bias_in_attention_or_mlp():
  net = _network(block="qwen3", time_conditioning="adaln")
  paths = _paths(_shapes(net))
  assert not [p for p in paths if "bias" in p and ("/attention/" in p or "/mlp/mlp/" in p)]


def test_gqa_equals_multihead_with_repeated_kv():
  gqa = _model(backbone="reversible", num_heads=4, num_kv_heads=2)
  mha = _model(backbone="reversible", num_heads=4, num_kv_heads=4)

  def expand(path, leaf):
    names = [getattr(p, "key", "") for p in path]
    if names[-1] == "kernel" and names[-2] in ("key", "value") and "attention" in names:
      return jnp.repeat(leaf, 2, axis=2)  # [layers, emb, kv_heads, head_dim]
    return leaf

  mha_params = jax.tree_util.tree_map_with_path(expand, gqa.params)
  tokens = _tokens()
  np.testing.assert_allclose(gqa.logits(tokens), mha.logits(tokens, params=mha_params),
                             rtol=1e-5, atol=1e-5)


def _scale_qk(params, factor=5.0):
  def scale(path, leaf):
    names = [getattr(p, "key", "") for p in path]
    return leaf * factor if names[-1] == "kernel" and names[-2] in ("query", "key") else leaf
  return jax.tree_util.tree_map_with_path(scale, params)


def test_qk_norm_makes_attention_scale_invariant():
  tokens = _tokens()
  qwen3 = _model(block="qwen3", objective="autoregressive")
  np.testing.assert_allclose(qwen3.logits(tokens), qwen3.logits(tokens, params=_scale_qk(
      qwen3.params)), rtol=1e-4, atol=1e-4)
  # Without QK-norm the same rescaling changes the attention pattern.
  simple = _model(block="simple", objective="autoregressive")
  assert _max_abs(simple.logits(tokens) - simple.logits(tokens, params=_scale_qk(
      simple.params))) > 1e-3
