"""LoRA (bdiff_jax/optim/lora.py): factors, the merge, the wrapped network, and rules that train the
factors alone (MeZO's parameter-efficient variant; AdamW masked to the factors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax import models
from bdiff_jax.errors import ConfigError
from bdiff_jax.optim import lora
from bdiff_jax.optim import update_rule
from bdiff_jax.optim import zeroth_order as zo
from bdiff_jax.train import train_step
from bdiff_jax.train.train_state import create_train_state
from tests import helpers

RANK, ALPHA = 4, 8.0


def _opt():
  from bdiff_jax.models.classifier import OPTLM
  from bdiff_jax.models.hf_checkpoint import load_opt
  config, params = load_opt(f"{helpers.REPO}/tests/fixtures/tiny_opt")
  return OPTLM(config), {"opt": params}


def _bdiff_like():
  """Stacked bdiff attention kernels [L=2, d_in=4, heads=2, head_dim=3] and a norm scale."""
  rng = np.random.default_rng(1)
  kernel = lambda: {"kernel": jnp.asarray(rng.normal(size=(2, 4, 2, 3)), jnp.float32)}
  return {"backbone": {"layers": {"attn": {"attention": {
      "query": kernel(), "key": kernel(), "value": kernel(),
      "query_norm": {"scale": jnp.ones((2, 3))}}}}}}


def _randomised(factors, seed=2):
  """The factors with b drawn too (b = 0 at init would hide a wrong product)."""
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))
  return jax.tree_util.tree_map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype),
                                factors)


def test_init_shapes_and_merge_with_zero_b_is_the_base_exactly():
  _, opt = _opt()
  for base in (opt, _bdiff_like()):
    factors = lora.init(jax.random.PRNGKey(0), base, RANK)
    names, leaves, _ = zo.flat_leaves(factors)
    targets = {nm[:-1] for nm in names}
    assert {nm[-2] for nm in targets} in ({"q_proj", "v_proj"}, {"query", "value"})
    for nm, v in zip(names, leaves):
      assert v.shape[0] == 2  # stacked over the 2 layers, as the kernel
      assert v.shape[-1 if nm[-1] == "a" else -2] == RANK
      if nm[-1] == "b":
        np.testing.assert_array_equal(v, 0.0)
      else:
        assert float(jnp.std(v)) > 0
    merged = lora.merge(base, factors, ALPHA, RANK)
    jax.tree_util.tree_map(np.testing.assert_array_equal, merged, base)


def test_merge_is_w_plus_scaled_a_b():
  base = _bdiff_like()
  factors = _randomised(lora.init(jax.random.PRNGKey(0), base, RANK))
  merged = lora.merge(base, factors, ALPHA, RANK)
  attn = lambda t: t["backbone"]["layers"]["attn"]["attention"]
  for name in ("query", "value"):
    w = np.asarray(attn(base)[name]["kernel"], np.float64)
    a = np.asarray(attn(factors)[name]["kernel"]["a"], np.float64)  # [2, 4, r]
    b = np.asarray(attn(factors)[name]["kernel"]["b"], np.float64)  # [2, r, 6]
    want = w + (ALPHA / RANK) * np.stack([a[l] @ b[l] for l in range(2)]).reshape(w.shape)
    np.testing.assert_allclose(attn(merged)[name]["kernel"], want, rtol=1e-5, atol=1e-5)
  for name in ("key", "query_norm"):  # not targets: the same arrays
    assert attn(merged)[name] is attn(base)[name] or jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda x, y: x is y, attn(merged)[name], attn(base)[name]))


def test_wrapped_network_is_the_network_on_the_merged_weights():
  network, base = _opt()
  net, params = lora.wrap(network, base, jax.random.PRNGKey(0), rank=RANK, alpha=ALPHA)
  params = dict(params, lora=_randomised(params["lora"]))
  tokens = jnp.asarray([[2, 5, 9, 11, 4]], jnp.int32)
  got = models.bind(net, params, train=False)(tokens)
  merged = lora.merge(base, params["lora"], ALPHA, RANK)
  want = models.bind(network, merged, train=False)(tokens)
  np.testing.assert_array_equal(got, want)
  plain = models.bind(network, base, train=False)(tokens)
  assert not np.allclose(got, plain)  # the factors do act
  assert net.config is network.config  # other attributes are the wrapped network's


def _merged_loss(params):
  merged = lora.merge(params["base"], params["lora"], ALPHA, RANK)
  return sum(jnp.mean(jnp.sin(x)) for x in jax.tree_util.tree_leaves(merged)), {}


@pytest.mark.parametrize("name", ["mezo", "adamw"])
def test_lora_rules_train_only_the_factors(name):
  _, base = _opt()
  params = {"base": base, "lora": lora.init(jax.random.PRNGKey(0), base, RANK)}
  rule = update_rule.make_rule(name, 10, zo=update_rule.ZOSettings(learning_rate=1e-2),
                               adamw=update_rule.AdamWSettings(learning_rate=1e-2),
                               freeze="none", peft="lora")
  # The trainable count: 2 layers x (q, v) x (d_in r + r d_out), d = 16.
  assert update_rule.trainable_count(rule, params) == lora.num_params(params["lora"]) == (
      2 * 2 * (16 * RANK + RANK * 16))
  rule_state = rule.init(params)
  new, _, m = jax.jit(lambda p, s: rule.update(_merged_loss, p, s, jax.random.PRNGKey(1),
                                               jnp.int32(0)))(params, rule_state)
  assert np.isfinite(float(m["loss"]))
  jax.tree_util.tree_map(np.testing.assert_array_equal, new["base"], base)  # bit-identical
  moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), new["lora"],
                                 params["lora"])
  by_name = dict(zip(zo.flat_leaves(moved)[0], jax.tree_util.tree_leaves(moved)))
  # MeZO perturbs and moves every factor; AdamW's first gradient of `a` is 0 (b = 0).
  assert all(v for nm, v in by_name.items() if name == "mezo" or nm[-1] == "b"), by_name
  if name == "adamw":  # the optimizer state covers the factors only
    sizes = sum(x.size for x in jax.tree_util.tree_leaves(rule_state))
    assert sizes < 3 * lora.num_params(params["lora"]) + 16


def test_mezo_lora_through_the_train_step():
  # The GLUE wiring: the wrapped network is bound like any other; the state holds both parts.
  network, base = _opt()
  net, params = lora.wrap(network, base, jax.random.PRNGKey(0), rank=RANK, alpha=ALPHA)
  rule = update_rule.make_rule("mezo", 10, zo=update_rule.ZOSettings(learning_rate=1e-2),
                               peft="lora")

  class LastToken:
    def loss(self, apply, batch, key):
      del key
      logits = apply(batch).astype(jnp.float32)
      return -jnp.mean(jax.nn.log_softmax(logits[:, -1])[:, 3]), {}

  step = train_step.make_train_step(LastToken(), net, rule, ema_decay=0.0)
  state = create_train_state(jax.tree_util.tree_map(jnp.copy, params), rule,
                             jax.random.PRNGKey(3))
  state, m = step(state, jnp.asarray([[2, 5, 9, 11], [2, 7, 8, 6]], jnp.int32))
  assert float(m["projected_grad"]) != 0.0
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params["base"], base)
  assert all(not np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(state.params["lora"]), jax.tree_util.tree_leaves(params["lora"])))


def test_lora_errors():
  with pytest.raises(ConfigError, match="LoRA target"):
    lora.init(jax.random.PRNGKey(0), {"dense": {"kernel": jnp.ones((2, 2))}}, RANK)
  with pytest.raises(ConfigError, match="rank"):
    lora.init(jax.random.PRNGKey(0), _bdiff_like(), 0)
  rule = update_rule.make_rule("mezo", 10, peft="lora")
  with pytest.raises(ConfigError, match="lora.wrap"):  # params that were not wrapped
    rule.init(_bdiff_like())
  with pytest.raises(ConfigError, match="DiZO"):
    update_rule.make_rule("dizo", 10, peft="lora")


def test_glue_build_rule_takes_peft():
  from bdiff_jax.glue import rows as glue_rows
  from bdiff_jax.glue.settings import GlueSettings
  g = GlueSettings.from_dict(helpers.load_config("configs/glue.py", "test").glue.to_dict())
  wrapped = {"lora": {"x": jnp.ones(3)}, "base": {"y": jnp.ones(5)}}
  count = lambda **kw: update_rule.trainable_count(glue_rows.build_rule("mezo", g, 10, **kw),
                                                   wrapped)
  assert count() == 8 and count(peft="none") == 8  # every parameter
  assert count(peft="lora") == 3
  rule = glue_rows.build_rule("mezo", g, 10, peft="lora")
  assert rule.trainable(("lora", "opt", "q_proj", "kernel", "a"))
  assert not rule.trainable(("base", "opt", "q_proj", "kernel"))
  assert glue_rows.forward_passes(rule, 7) == {"forward": 14, "backward": 0}
  adamw = glue_rows.build_rule("adamw", g, 7, peft="lora")
  assert glue_rows.forward_passes(adamw, 7) == {"forward": 7, "backward": 7}


def test_train_also_trains_a_head_in_full_beside_the_factors():
  # A pooled-head row: the fresh classifier must train too, not stay at its random init.
  base = dict(_bdiff_like(), classifier={"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)})
  _, params = lora.wrap(None, base, jax.random.PRNGKey(0), rank=RANK, alpha=ALPHA,
                        train_also=lambda names: names[0] == "classifier")
  assert set(params) == {"base", "lora", "full"}
  rule = update_rule.make_rule("mezo", 10, zo=update_rule.ZOSettings(learning_rate=1e-2),
                               peft="lora")
  assert update_rule.trainable_count(rule, params) == lora.num_params(params["lora"]) + 10
  loss = lambda p: (sum(jnp.mean(jnp.sin(x)) for x in jax.tree_util.tree_leaves(
      lora.merged_params(p, ALPHA, RANK))), {})
  new, _, _ = rule.update(loss, params, rule.init(params), jax.random.PRNGKey(1), jnp.int32(0))
  jax.tree_util.tree_map(np.testing.assert_array_equal, new["base"], base)
  assert not np.array_equal(new["full"]["classifier"]["kernel"], base["classifier"]["kernel"])
  merged = lora.merged_params(new, ALPHA, RANK)
  np.testing.assert_array_equal(merged["classifier"]["kernel"], new["full"]["classifier"]["kernel"])
