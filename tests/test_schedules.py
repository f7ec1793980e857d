"""Tests of the masking schedules: boundary values, monotonicity, ELBO weights, small-t accuracy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax.config import configuration
from bdiff_jax.diffusion import schedules
from bdiff_jax.errors import ConfigError
from bdiff_jax.train import builder

SCHEDULES = [schedules.linear(), schedules.cosine(), schedules.polynomial(2.0),
             schedules.polynomial(0.5), schedules.polynomial(3.0)]
IDS = [s.name for s in SCHEDULES]


def _exact_mask_prob(name: str, t: float) -> float:
  """1 - alpha(t) in float64, written without cancellation."""
  if name == "linear":
    return t
  if name == "cosine":
    return math.sin(0.5 * math.pi * t)
  exponent = float(name[len("polynomial"):])
  return t**exponent


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_boundary_values(schedule):
  assert float(schedule.alpha(jnp.float32(0.0))) == 1.0
  assert float(schedule.alpha(jnp.float32(1.0))) == 0.0
  assert float(schedule.mask_prob(jnp.float32(0.0))) == 0.0
  assert float(schedule.mask_prob(jnp.float32(1.0))) == 1.0


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_monotone(schedule):
  t = jnp.linspace(0.0, 1.0, 2001, dtype=jnp.float32)
  alpha = np.asarray(schedule.alpha(t))
  mask_prob = np.asarray(schedule.mask_prob(t))
  assert np.all(np.diff(alpha) <= 0.0)
  assert np.all(np.diff(mask_prob) > 0.0)  # accurate form: strictly increasing even near 0
  assert alpha[0] > alpha[1000] > alpha[-1]
  np.testing.assert_allclose(alpha + mask_prob, 1.0, atol=2e-7)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_dalpha_and_weight_match_autodiff(schedule):
  t32 = jnp.linspace(0.01, 0.99, 99, dtype=jnp.float32)
  grad_alpha32 = jax.vmap(jax.grad(schedule.alpha))(t32)
  np.testing.assert_allclose(schedule.dalpha(t32), grad_alpha32, rtol=1e-4, atol=1e-6)
  # Reference -alpha'(t) / (1 - alpha(t)) in float64, so that 1 - alpha(t) does not cancel.
  with jax.enable_x64(True):
    t64 = jnp.asarray(np.asarray(t32), jnp.float64)
    grad_alpha64 = jax.vmap(jax.grad(schedule.alpha))(t64)
    expected_weight = np.asarray(-grad_alpha64 / (1.0 - schedule.alpha(t64)))
  weight = np.asarray(schedule.weight(t32))
  assert weight.dtype == np.float32
  np.testing.assert_allclose(weight, expected_weight, rtol=1e-5)
  assert np.all(weight > 0.0)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_weight_integrates_to_log_ratio(schedule):
  """int_a^b w(t) dt = log((1 - alpha(b)) / (1 - alpha(a))), checked by the trapezoid rule."""
  a, b = 0.05, 1.0
  t = np.linspace(a, b, 20001)
  w = np.asarray(schedule.weight(jnp.asarray(t, jnp.float32)), np.float64)
  integral = np.sum(0.5 * (w[1:] + w[:-1]) * np.diff(t))
  expected = -math.log(_exact_mask_prob(schedule.name, a))
  assert abs(integral - expected) < 1e-4 * max(1.0, abs(expected))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_mask_prob_accurate_at_small_t(schedule):
  t = 1e-6
  exact = _exact_mask_prob(schedule.name, t)
  got = float(schedule.mask_prob(jnp.float32(t)))
  assert got > 0.0
  assert abs(got - exact) <= 1e-5 * exact
  # The weight is finite and close to its exact value (~ exponent / t for these schedules).
  w = float(schedule.weight(jnp.float32(t)))
  assert math.isfinite(w) and w > 0.0


def test_naive_one_minus_alpha_is_inaccurate_where_mask_prob_is_not():
  """Documents why Schedule.mask_prob exists: 1 - alpha(1e-8) in float32 rounds to 0."""
  for name in ("linear", "cosine"):
    sched = schedules.get_schedule(name)
    t = jnp.float32(1e-8)
    exact = _exact_mask_prob(name, 1e-8)
    assert float(1.0 - sched.alpha(t)) == 0.0
    assert abs(float(sched.mask_prob(t)) - exact) <= 1e-5 * exact


def test_get_schedule_and_from_config():
  assert schedules.get_schedule("linear").name == "linear"
  assert schedules.get_schedule("cosine").name == "cosine"
  poly = schedules.get_schedule("polynomial", 3.0)
  assert float(poly.mask_prob(jnp.float32(0.5))) == pytest.approx(0.125)
  cfg = configuration.base_config()
  assert builder.build_objective(cfg, mask_id=9).schedule.name == cfg.diffusion.schedule
  with pytest.raises(ConfigError):
    schedules.get_schedule("quadratic")
  with pytest.raises(ConfigError):
    schedules.get_schedule("polynomial", 0.0)
