"""The evaluator: one compilation per process, padding that changes nothing, every token once."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax.evaluation import evaluator as evaluator_lib
from bdiff_jax.models import init_params
from bdiff_jax.train.builder import build_objective
from bdiff_jax.runtime import sharding
from tests import helpers

VOCAB, SEQ = 30, 8


def _setup(objective_name):
  fields = dict(objective=objective_name, num_layers=1)
  if objective_name == "autoregressive":
    fields["time_conditioning"] = "none"
  c = helpers.tiny_config(**fields)
  c.data.seq_len = SEQ
  objective = build_objective(c, mask_id=VOCAB)
  net = helpers.network(c.model, vocab_size=VOCAB, max_len=SEQ)
  params = jax.jit(lambda k: init_params(net, k, seq_len=SEQ))(jax.random.key(0))
  ev = evaluator_lib.Evaluator(objective, net, seq_len=SEQ, batch_size=4, num_time_samples=2)
  return objective, net, params, ev


def _splits(n_valid, n_test):
  rng = np.random.default_rng(0)
  return types.SimpleNamespace(valid=rng.integers(0, VOCAB, n_valid).astype(np.int32),
                               test=rng.integers(0, VOCAB, n_test).astype(np.int32),
                               tokenizer=types.SimpleNamespace())


def test_padded_batches_cover_every_token_once():
  tokens = np.arange(45, dtype=np.int32)
  batches = list(evaluator_lib.padded_batches(tokens, seq_len=8, batch_size=4, pad_id=99))
  assert all(b.shape == (4, 8) and v.shape == (4, 8) for b, v in batches)
  seen = np.concatenate([b[v] for b, v in batches])
  np.testing.assert_array_equal(seen, tokens)  # stream order, each token once
  assert all((b[~v] == 99).all() for b, v in batches)


def test_evaluation_compiles_once_across_evaluations():
  _, _, params, ev = _setup("diffusion")
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if (
      event == "/jax/core/compile/backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    # Different split lengths: full batches, a partial last batch and a ragged tail block.
    first = ev.evaluate(params, _splits(70, 37), seeds=(0, 1))
    n_first = len(compiles)
    second = ev.evaluate(params, _splits(53, 64), seeds=(2,))
    n_second = len(compiles) - n_first
    # Training evaluates its state's parameters, placed on the run's mesh; the final
    # evaluation, parameters restored from a checkpoint onto one device. Same program.
    mesh = sharding.make_mesh()
    on_mesh = sharding.place_state(params, mesh)[0]
    third = ev.evaluate(on_mesh, _splits(70, 37), seeds=(0, 1))
    n_third = len(compiles) - n_first - n_second
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert n_first >= 1  # the listener sees compilations at all (not a vacuous count)
  assert n_second == 0, f"{n_second} recompilations in the second evaluation"
  assert n_third == 0, f"{n_third} recompilations for parameters placed on a mesh"
  assert third == first
  assert first["valid"]["num_tokens"] == 70 and second["test"]["num_tokens"] == 64


def test_spread_subset_scores_exactly_the_picked_blocks():
  _, _, params, ev = _setup("autoregressive")  # exact NLL: equal sums, not only in expectation
  splits = _splits(16 * SEQ + 3, SEQ)
  r = ev.evaluate(params, splits, seeds=(0,), max_tokens=4 * SEQ, spread=True,
                  split_names=("valid",))["valid"]
  picked = splits.valid[:16 * SEQ].reshape(16, SEQ)[[0, 4, 8, 12]].reshape(-1)
  direct = ev.evaluate(params, types.SimpleNamespace(valid=picked, tokenizer=splits.tokenizer),
                       seeds=(0,), split_names=("valid",))["valid"]
  assert r["num_tokens"] == 4 * SEQ and not r["full_split"]
  assert r["subset"] == "4 blocks spread over the split" and direct["subset"] == ""
  assert r["nll_per_token"] == pytest.approx(direct["nll_per_token"], rel=1e-6)
  prefix = ev.evaluate(params, splits, seeds=(0,), max_tokens=4 * SEQ,
                       split_names=("valid",))["valid"]
  assert prefix["subset"] == f"first {4 * SEQ} tokens"
  assert "[SUBSET: 4 blocks spread over the split]" in ev.format_results({"valid": r})


@pytest.mark.parametrize("name", ["diffusion", "autoregressive"])
def test_padding_does_not_change_the_valid_tokens(name):
  objective, net, params, _ = _setup(name)
  apply = lambda *a, **kw: net.apply({"params": params}, *a, train=False, **kw)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, VOCAB, (3, SEQ)).astype(np.int32)
  valid = np.zeros((3, SEQ), bool)
  valid[0, :] = True
  valid[1, :5] = True  # a ragged tail block; row 2 is all padding
  other = tokens.copy()
  other[~valid] = rng.integers(0, VOCAB, (~valid).sum())  # different padding content
  nll = jax.jit(lambda t: objective.sequence_nll(apply, t, jnp.asarray(valid), jax.random.key(3),
                                                 num_samples=4))
  a, b = np.asarray(nll(jnp.asarray(tokens))), np.asarray(nll(jnp.asarray(other)))
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert a[2] == 0.0 and a[0] > 0 and a[1] > 0
  if name == "autoregressive":  # exact: equals the unpadded prefix scored alone
    short = jax.jit(lambda t: objective.sequence_nll(
        apply, t, jnp.ones(t.shape, bool), jax.random.key(3), num_samples=1))
    np.testing.assert_allclose(a[1], np.asarray(short(jnp.asarray(tokens[1:2, :5])))[0],
                               rtol=1e-5)
