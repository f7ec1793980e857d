"""Networks: `build_network(spec)` (a `ModelSpec`; `train.builder` makes it from `config.model`)
and helpers."""

import jax
import jax.numpy as jnp

from bdiff_jax.errors import ConfigError
from bdiff_jax.models import adaptive_head
from bdiff_jax.models.network import Network, output_bias_params
from bdiff_jax.models.opt_network import OPTNetwork, opt_spec
from bdiff_jax.models.spec import ModelSpec


def build_network(spec: ModelSpec):
  """The network of `spec` (a `Network`, or an `OPTNetwork` for backbone "opt")."""
  if spec.head == "adaptive":
    problem = adaptive_head.layout_problem(spec.vocab_size, spec.adaptive_cutoffs,
                                           spec.emb_dim, spec.adaptive_shrink)
    if problem:
      raise ConfigError(f"config.{problem}.",
                        "choose cutoffs below the vocabulary size, or --config.model.head=full.")
  if spec.backbone == "opt":
    return OPTNetwork(opt_spec(spec))
  return Network(spec)


def init_params(network: Network, key, *, seq_len: int):
  """Initial parameters (a pytree) for inputs of shape [1, seq_len]."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  t = jnp.ones((1,), jnp.float32)
  return network.init({"params": key}, tokens, t, train=False)["params"]


class BoundNetwork:
  """`bind`'s callable: `apply(tokens, t=None, **kw) -> logits` (or, with method="head",
  hidden -> logits) is `network.apply` with the parameters and dropout key bound.

  `hidden` and `token_nll` let a loss run the output head only at the positions it reads (the
  network must take `logit_positions`/`return_hidden` and have a `token_nll` method: `Network`,
  `OPTNetwork`, `classifier.OPTLM`):

    h = apply.hidden(tokens, t, padding_mask=m, positions=idx)  # [B, K, D] at idx int[B, K]
    nll = apply.token_nll(h, targets)                            # -log p(targets | h) [B, K]
  """

  def __init__(self, network, params, *, train: bool, dropout_key=None):
    self.network, self.params, self.train = network, params, train
    self.rngs = {"dropout": dropout_key} if dropout_key is not None else {}

  def __call__(self, *a, **kw):
    return self.network.apply({"params": self.params}, *a, train=self.train, rngs=self.rngs, **kw)

  def hidden(self, tokens, t=None, *, padding_mask=None, positions=None):
    """Final hidden states [B, L, D] (at `positions` int[B, K] only: [B, K, D])."""
    return self(tokens, t, padding_mask=padding_mask, logit_positions=positions,
                return_hidden=True)

  def token_nll(self, h, targets):
    """-log p(targets | h): h [..., D], targets int[...] -> float [...] (the network's head)."""
    return self(h, targets, method="token_nll")


def bind(network: Network, params, *, train: bool, dropout_key=None) -> BoundNetwork:
  """`apply(tokens, t=None, **kw) -> logits` (or, with method="head", hidden -> logits): the
  network with its parameters and dropout key bound (a `BoundNetwork`)."""
  return BoundNetwork(network, params, train=train, dropout_key=dropout_key)


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


__all__ = ["BoundNetwork", "Network", "ModelSpec", "OPTNetwork", "bind", "build_network",
           "init_params", "count_params", "output_bias_params"]
