"""Defaults and validation of the zeroth-order update rules' config sections: `config.train.zo`
(MeZO, also used by DiZO) and `config.train.dizo`. The rules themselves (`bdiff_jax/optim/`)
take plain settings (`update_rule.ZOSettings`, `update_rule.DiZOSettings`)."""

import ml_collections

from bdiff_jax.errors import ConfigError
from bdiff_jax.optim.zeroth_order import DIZO_TARGETS, SCHEDULES


def default_config() -> ml_collections.ConfigDict:
  """Defaults for config.train.zo (MeZO, also used by DiZO) and config.train.dizo."""
  c = ml_collections.ConfigDict()
  c.zo = ml_collections.ConfigDict()
  c.zo.learning_rate = 1e-6  # MeZO's OPT full-parameter setting (grid 1e-6 / 1e-7)
  c.zo.schedule = "constant"  # "constant" | "linear" (decay to 0 at total_steps)
  c.zo.eps = 1e-3
  c.zo.num_perturbations = 1
  c.zo.weight_decay = 0.0
  c.zo.freeze_embeddings = True  # token embedding (tied head) not perturbed nor updated
  c.dizo = ml_collections.ConfigDict()
  c.dizo.interval = 50  # κ: project after steps κ-1, 2κ-1, ...
  c.dizo.iterations = 10  # zeroth-order iterations on γ per projection
  c.dizo.eps_p = 0.1
  c.dizo.step_size = 2.0
  c.dizo.tau = 0.2  # γ/||θ-θ0|| clipped to [1-τ, 1+τ]
  c.dizo.targets = "kv"  # "kv": attention key/value kernels | "kernels": every dense kernel
  return c


def _int_at_least(low):
  return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


_CHECKS = (  # (field of config.train, test, what it must be)
    ("zo.learning_rate", lambda v: v > 0, "> 0"),
    ("zo.schedule", lambda v: v in SCHEDULES, " or ".join(map(repr, SCHEDULES))),
    ("zo.eps", lambda v: v > 0, "> 0"),
    ("zo.num_perturbations", _int_at_least(1), "an integer >= 1"),
    ("zo.weight_decay", lambda v: v >= 0, ">= 0"),
    ("zo.freeze_embeddings", lambda v: isinstance(v, bool), "True or False"),
    ("dizo.interval", _int_at_least(1), "an integer >= 1"),
    ("dizo.iterations", _int_at_least(1), "an integer >= 1"),
    ("dizo.eps_p", lambda v: v > 0, "> 0"),
    ("dizo.step_size", lambda v: v > 0, "> 0"),
    ("dizo.tau", lambda v: 0 < v < 1, "in (0, 1)"),
    ("dizo.targets", lambda v: v in DIZO_TARGETS, " or ".join(map(repr, DIZO_TARGETS))),
)


def validate(train_config) -> None:
  """Raises ConfigError naming the first invalid field of train.zo / train.dizo."""
  for path, ok, need in _CHECKS:
    section, field = path.split(".")
    value = train_config[section][field]
    if not ok(value):
      raise ConfigError(f"config.train.{path}={value!r} is invalid: it must be {need}.",
                        f"pass --config.train.{path}=<{need}>.")
