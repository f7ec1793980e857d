"""LoRA: low-rank adapters on frozen weights, the parameter-efficient variant of MeZO.

(Hu et al. 2022; MeZO's "MeZO (LoRA)" rows: rank 8, alpha 16 on the attention query and value
projections.) A target kernel W [d_in, *out] (or [L, d_in, *out] when stacked over layers for
`lax.scan`) gets two factors

    a [.., d_in, r] ~ N(0, 1/d_in)        b [.., r, prod(out)] = 0

and the network runs with the merged weight

    W' = W + (alpha / r) · (a @ b).reshape(W.shape)

so at initialisation (b = 0) the merged network is the base network exactly. A LoRA row's
parameters are `{"base": the frozen base parameters, "lora": the factors}`, plus `"full"`: base
leaves trained in full (e.g. a fresh classifier head; `wrap(..., train_also=...)`), which
replace the base's (stale) copies at the same paths; `LoRANetwork` wraps
the network so that `models.bind(LoRANetwork(...), {"base": .., "lora": ..}, train=..)` merges
before every application, and the update rules train only the leaves under "lora"
(`update_rule.make_rule(..., peft="lora")`: its trainable predicate is `is_lora`: the leaves
under "lora" and "full").

The factors are nested like the base parameters, one {"a", "b"} pair under each target
kernel's path: e.g. lora["opt"]["layers"]["self_attn"]["q_proj"]["kernel"]["a"].
"""

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from bdiff_jax.errors import ConfigError
from bdiff_jax.optim.zeroth_order import PathNames, Predicate, flat_leaves, is_stacked, path_names

BASE, LORA, FULL = "base", "lora", "full"


def qv_targets(names: PathNames) -> bool:
  """The attention query and value projection kernels (MeZO's LoRA targets): `query`/`value` of
  a bdiff `Network` (Qwen3 block), `q_proj`/`v_proj` of OPT."""
  return len(names) >= 2 and names[-1] == "kernel" and names[-2] in (
      "query", "value", "q_proj", "v_proj")


def is_lora(names: PathNames) -> bool:
  """The trainable leaves of a LoRA row: everything under params["lora"] and params["full"]."""
  return bool(names) and names[0] in (LORA, FULL)


def _split_shape(shape, stacked: bool):
  """(leading layer axes, d_in, d_out) of a kernel [.., d_in, *out]."""
  lead = 1 if stacked else 0
  if len(shape) < lead + 2:
    raise ConfigError(f"a LoRA target of shape {tuple(shape)} is not a kernel [d_in, d_out].",
                      "choose LoRA targets that are dense kernels.")
  return tuple(shape[:lead]), int(shape[lead]), int(math.prod(shape[lead + 1:]))


def init(key: jax.Array, base_params, rank: int, targets: Predicate = qv_targets,
         stacked: Predicate = is_stacked) -> dict:
  """The LoRA factors of `base_params`' target kernels: a ~ N(0, 1/d_in), b = 0 (float32).

  Target leaf i (tree_leaves order over all base leaves) draws a from split(key, n)[i].
  Raises ConfigError when no leaf is a target.
  """
  rank = int(rank)
  if rank < 1:
    raise ConfigError(f"LoRA rank {rank} is invalid.", "use a rank >= 1.")
  names, leaves, _ = flat_leaves(base_params)
  keys = jax.random.split(key, len(leaves))
  out: dict = {}
  for i, (nm, v) in enumerate(zip(names, leaves)):
    if not targets(nm):
      continue
    lead, d_in, d_out = _split_shape(v.shape, stacked(nm))
    a = jax.random.normal(keys[i], lead + (d_in, rank), jnp.float32) / math.sqrt(d_in)
    node = out
    for k in nm:
      node = node.setdefault(k, {})
    node["a"], node["b"] = a, jnp.zeros(lead + (rank, d_out), jnp.float32)
  if not out:
    raise ConfigError("no parameter of this model is a LoRA target.",
                      "LoRA needs attention query/value kernels (query/value or q_proj/v_proj).")
  return out


def delta(a, b, shape) -> jax.Array:
  """a @ b (per leading layer slice) in float32, reshaped to the kernel's `shape`."""
  return jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32),
                    b.astype(jnp.float32)).reshape(shape)


def merge(base, lora_params, alpha: float, rank: int):
  """base with every LoRA target kernel W replaced by W + (alpha/rank)·a@b (in W's dtype).

  Leaves without factors are returned as they are (the same arrays).
  """
  scale = float(alpha) / int(rank)
  factors = {}
  for nm, v in zip(*flat_leaves(lora_params)[:2]):
    factors.setdefault(nm[:-1], {})[nm[-1]] = v

  def one(path, w):
    f = factors.get(path_names(path))
    if f is None:
      return w
    return (w.astype(jnp.float32) + scale * delta(f["a"], f["b"], w.shape)).astype(w.dtype)

  return jax.tree_util.tree_map_with_path(one, base)


def overlay(base, full):
  """base with the leaves of `full` (a subtree of base's paths) in place of base's own."""
  by_name = dict(zip(*flat_leaves(full)[:2]))
  return jax.tree_util.tree_map_with_path(lambda p, v: by_name.get(path_names(p), v), base)


def merged_params(params, alpha: float, rank: int):
  """The network's parameters of a LoRA row's {"base", "lora"[, "full"]}: the base with the
  "full" leaves in place and W + (alpha/rank)·a@b at every factored kernel."""
  base = overlay(params[BASE], params[FULL]) if FULL in params else params[BASE]
  return merge(base, params[LORA], alpha, rank)


def num_params(lora_params) -> int:
  """How many numbers the factors hold (the trainable parameters of a LoRA row)."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(lora_params)))


@dataclasses.dataclass(frozen=True, eq=False)
class LoRANetwork:
  """`network` applied to {"base": .., "lora": ..} parameters: merged, then the network.

  Has the flax `apply(variables, *args, **kwargs)` of the network it wraps (what `models.bind`
  calls); any other attribute (spec, head methods by name, ...) is the wrapped network's.
  """

  network: Any
  rank: int
  alpha: float

  def apply(self, variables, *args, **kwargs):
    return self.network.apply(dict(variables, params=merged_params(variables["params"],
                                                                   self.alpha, self.rank)),
                              *args, **kwargs)

  def effective_params(self, params):
    """The wrapped network's parameters of `params` (merged): what the model computes with."""
    return merged_params(params, self.alpha, self.rank)

  def __getattr__(self, name):
    if name == "network":  # not yet set (copy/pickle): no recursion
      raise AttributeError(name)
    return getattr(self.network, name)


def subtree(params, select: Predicate) -> dict:
  """The leaves of `params` that `select` picks, nested as in params."""
  out: dict = {}
  for nm, v in zip(*flat_leaves(params)[:2]):
    if select(nm):
      node = out
      for k in nm[:-1]:
        node = node.setdefault(k, {})
      node[nm[-1]] = v
  return out


def wrap(network, base_params, key: jax.Array, *, rank: int = 8, alpha: float = 16.0,
         targets: Predicate = qv_targets, train_also: Optional[Predicate] = None):
  """(LoRANetwork(network), {"base": base_params, "lora": init(key, base_params, rank)}): what a
  LoRA row trains with; bind the network as any other (`models.bind(net, params, train=..)`).

  train_also(path_names) picks base leaves trained in full besides the factors (e.g. a pooled
  head's fresh `classifier`): copied into params["full"].
  """
  params = {BASE: base_params, LORA: init(key, base_params, rank, targets)}
  if train_also is not None:
    full = subtree(base_params, train_also)
    if full:
      params[FULL] = jax.tree_util.tree_map(jnp.copy, full)
  return LoRANetwork(network, int(rank), float(alpha)), params
