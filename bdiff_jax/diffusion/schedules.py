"""Masking schedules of absorbing-state diffusion.

alpha(t) is the probability that a token is still clean at time t in [0, 1], decreasing from
alpha(0) = 1 to alpha(1) = 0. The continuous-time ELBO weights the cross-entropy of each masked
token at time t by  w(t) = -alpha'(t) / (1 - alpha(t)).

Because alpha(0) = 1 and alpha(1) = 0 exactly for every schedule here, the ELBO has no
reconstruction or prior term: -log p(x) <= integral_0^1 w(t) E[sum_masked -log p(x_i | z_t)] dt.
"""

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp

from bdiff_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A masking schedule: alpha(t) and its derivative, as pure jnp functions of t."""
  name: str
  alpha: Callable[[jnp.ndarray], jnp.ndarray]
  dalpha: Callable[[jnp.ndarray], jnp.ndarray]
  # 1 - alpha(t), written so that it stays accurate for small t (no 1 - (1 - eps) cancellation).
  mask_prob: Callable[[jnp.ndarray], jnp.ndarray]

  def weight(self, t):
    """ELBO weight -alpha'(t) / (1 - alpha(t)); finite for t in (0, 1]."""
    return -self.dalpha(t) / self.mask_prob(t)


def linear() -> Schedule:
  return Schedule("linear", alpha=lambda t: 1.0 - t, dalpha=lambda t: -jnp.ones_like(t),
                  mask_prob=lambda t: t)


def cosine() -> Schedule:
  half_pi = 0.5 * math.pi
  return Schedule(
      "cosine",
      alpha=lambda t: 1.0 - jnp.cos(half_pi * (1.0 - t)),
      dalpha=lambda t: -half_pi * jnp.sin(half_pi * (1.0 - t)),
      mask_prob=lambda t: jnp.sin(half_pi * t))  # = cos(pi/2 (1 - t))


def polynomial(exponent: float) -> Schedule:
  p = float(exponent)
  return Schedule(f"polynomial{p:g}", alpha=lambda t: 1.0 - t**p,
                  dalpha=lambda t: -p * t**(p - 1.0), mask_prob=lambda t: t**p)


def get_schedule(name: str, exponent: float = 2.0) -> Schedule:
  if name == "linear":
    return linear()
  if name == "cosine":
    return cosine()
  if name == "polynomial":
    if exponent <= 0:
      raise ConfigError(f"polynomial schedule exponent {exponent} must be > 0.",
                        "pass --config.diffusion.schedule_exponent=<positive number>.")
    return polynomial(exponent)
  raise ConfigError(f"unknown masking schedule {name!r}.",
                    "use --config.diffusion.schedule=linear, cosine or polynomial.")
