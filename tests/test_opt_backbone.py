"""`config.model.backbone = "opt"`: OPT's architecture in the trainer (autoregressive only).

The adapter (`models.opt_network.OPTNetwork`) must compute exactly `models.opt.OPT` (so the
trainer and the GLUE benchmark, which loads such a workdir as its `opt` model, run one network),
train with the AR train step, decode through its caches exactly as the full forward computes
(so the AR sampler works), and be refused with the diffusion objective.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax import models
from bdiff_jax.config import compat as config_compat
from bdiff_jax.data.tokenizer import WordTokenizer
from bdiff_jax.errors import ConfigError
from bdiff_jax.glue import encoding as glue_encoding
from bdiff_jax.glue import readers as glue_readers
from bdiff_jax.glue import rows as glue_rows
from bdiff_jax.glue.settings import GlueSettings
from bdiff_jax.models.opt import OPT
from bdiff_jax.models.opt_network import OPTNetwork, opt_config
from bdiff_jax.objectives import ar_sampling
from bdiff_jax.train.builder import build_objective
from bdiff_jax.optim import zeroth_order
from bdiff_jax.runtime import checkpointing
from bdiff_jax.train import builder
from bdiff_jax.train import train_state
from bdiff_jax.train.train_step import make_train_step
from configs import glue as glue_config
from tests import helpers
from tests.test_glue_classification import write_sst2

VOCAB = 50


def opt_config_tiny(**over):
  """A validated tiny config of the OPT backbone (2 x 32, 2 heads, mlp 64, seq 16; `over`
  overrides config.model fields)."""
  return helpers.tiny_config(backbone="opt", objective="autoregressive",
                             time_conditioning="none", **over)


@functools.lru_cache(maxsize=None)
def _setup():
  """(config, objective, network, update rule, initial state on the host, batch); params from a
  jitted init (the op-by-op init of the scanned layers takes seconds)."""
  c = opt_config_tiny(num_layers=1)
  objective = build_objective(c, mask_id=VOCAB)
  net = builder.build_network(c.model, vocab_size=VOCAB, max_len=c.data.seq_len,
                              causal=objective.causal)
  rule = builder.build_update_rule(c.train)
  state = jax.jit(lambda: train_state.init_train_state(net, rule, seed=0,
                                                       seq_len=c.data.seq_len))()
  state = jax.device_get(state)  # host copies: the train step donates what it is given
  batch = jax.random.randint(jax.random.key(2), (c.train.batch_size, c.data.seq_len), 0, VOCAB)
  return c, objective, net, rule, state, batch


def test_opt_backbone_needs_the_autoregressive_objective():
  with pytest.raises(ConfigError) as info:
    helpers.tiny_config(backbone="opt")  # objective diffusion (the default)
  assert "autoregressive" in str(info.value) and info.value.fix
  with pytest.raises(ConfigError, match="num_heads"):
    opt_config_tiny(num_heads=3)


def test_adapter_is_opt_with_the_real_token_head():
  c, _, net, _, state, batch = _setup()
  assert isinstance(net, OPTNetwork) and net.spec.positional == "learned"
  p = state.params
  leaves = [zeroth_order.path_names(k) for k, _ in jax.tree_util.tree_leaves_with_path(p)]
  assert ("opt", "embed_tokens", "embedding") in leaves  # OPT's names: the GLUE rules' targets
  assert sum(map(zeroth_order.kv_targets, leaves)) == 2  # k_proj, v_proj kernels (stacked)
  assert p["opt"]["embed_tokens"]["embedding"].shape == (VOCAB + 1, c.model.emb_dim)
  tokens = jnp.asarray(batch[:3])
  padding = jnp.arange(c.data.seq_len)[None] < jnp.array([[16], [9], [1]])  # right padding

  @jax.jit
  def run(p):
    apply = models.bind(net, p, train=False)
    ref = OPT(opt_config(net.spec))
    hidden = apply(tokens, padding_mask=padding, return_hidden=True)
    return (apply(tokens, padding_mask=padding), apply(hidden, method="head"),
            ref.apply({"params": p["opt"]}, tokens, padding.astype(jnp.int32)),
            apply(tokens, padding_mask=padding, logit_positions=jnp.array([[0], [8], [0]])))

  logits, from_head, reference, at = jax.device_get(run(p))
  assert logits.shape == (3, c.data.seq_len, VOCAB) and reference.shape[-1] == VOCAB + 1
  real = np.asarray(padding)
  np.testing.assert_allclose(logits[real], reference[..., :VOCAB][real], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(from_head, logits)
  np.testing.assert_allclose(at[:, 0], logits[np.arange(3), [0, 8, 0]], rtol=1e-6, atol=1e-6)


def test_decoding_through_the_caches_is_the_full_forward():
  c, _, net, _, state, batch = _setup()
  tokens = jnp.asarray(batch[:2])
  length = c.data.seq_len

  @jax.jit
  def run(p, key):
    full = models.bind(net, p, train=False)(tokens)
    cache = ar_sampling.init_decode_cache(net, batch_size=2, length=length)

    def body(cache, x):
      logits, cache = ar_sampling.decode_step(net, p, cache, x[:, None])
      return cache, logits
    _, stepped = jax.lax.scan(body, cache, tokens.T)
    sample = ar_sampling.sample_autoregressive(net, p, key, length=length, num_samples=2,
                                               bos_id=VOCAB, prompt_ids=tokens[0, :3])
    return full, jnp.swapaxes(stepped, 0, 1), sample

  full, stepped, sample = jax.device_get(run(state.params, jax.random.key(0)))
  np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(full[:, 1:] - full[:, :1])) > 0.01  # positions matter: not vacuous
  assert sample.shape == (2, length) and sample.max() < VOCAB
  np.testing.assert_array_equal(sample[:, :3], np.broadcast_to(batch[0, :3], (2, 3)))


def test_opt_backbone_trains_with_the_ar_step():
  c, objective, net, rule, state, batch = _setup()
  step = make_train_step(objective, net, rule, ema_decay=c.train.ema_decay)
  losses = []
  for _ in range(6):  # the same batch: the loss must fall
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert abs(losses[0] - np.log(VOCAB)) < 0.3  # tied head at init: near uniform
  assert losses[-1] < losses[0] - 0.3, losses


def _opt_workdir(path, c, state, words):
  """A bdiff workdir as training leaves it: config.json, vocab.json, a best checkpoint."""
  os.makedirs(path)
  config_compat.write_config_atomically(c, path)
  tokenizer = WordTokenizer.from_corpus(words)
  assert tokenizer.vocab_size == VOCAB
  tokenizer.save(os.path.join(path, "vocab.json"))
  with checkpointing.Checkpointer(str(path)) as ckpt:
    ckpt.save(3, state, {"step": 3}, best_metrics={checkpointing.BEST_METRIC: 4.0}, force=True)


def _plain(g):
  return GlueSettings.from_dict(g.to_dict())


def test_glue_opt_row_loads_a_bdiff_opt_workdir(tmp_path):
  c, _, _, _, state, _ = _setup()
  # VOCAB ids: <eos>, these words, <unk> (the label words are in the vocabulary).
  words = [" ".join([f"w{i}" for i in range(VOCAB - 4)] + ["great", "terrible"])]
  _opt_workdir(tmp_path / "wd", c, state, words)
  g = glue_config.get_config("test").glue
  g.glue_dir = write_sst2(str(tmp_path / "glue"))
  g.opt_dir = str(tmp_path / "wd")
  g.seq_len = c.data.seq_len
  g.zo.freeze = "embeddings"  # the default, "none", trains every leaf (MeZO's setting)
  full = glue_readers.load_split("SST-2", "train", g.glue_dir)
  row = glue_rows.build_row(glue_rows.RowSpec("opt", "dizo", False), _plain(g), full, seed=0,
                              total_steps=3)  # DiZO: MeZO's rule (trainable) + its targets
  assert row.init.startswith(f"OPT architecture pretrained on WikiText-2 (autoregressive), "
                             f"{tmp_path / 'wd'} (")
  assert isinstance(row.network, OPTNetwork) and row.scoring == "causal"
  assert isinstance(row.encoder, glue_encoding.WordEncoder)
  restored = jax.tree_util.tree_leaves_with_path(row.params)
  for (path, got), want in zip(restored, jax.tree_util.tree_leaves(state.ema_params)):
    np.testing.assert_array_equal(got, want)
    names = zeroth_order.path_names(path)
    frozen = "embed_tokens" in names or "embed_positions" in names
    assert row.rule.trainable(names) == (not frozen)  # the frozen embeddings
  assert [zeroth_order.path_names(p)[-2] for p, _ in restored
          if row.rule.targets(zeroth_order.path_names(p))] == ["k_proj", "v_proj"]  # DiZO's
  enc = glue_encoding.encode_split(full.select([0, 1]), row.encoder, scoring="causal",
                                   seq_len=g.seq_len)
  batch = {k: jnp.asarray(v) for k, v in enc.items() if k != "labels"}
  scores = jax.jit(lambda p: row.objective.scores(models.bind(row.network, p, train=False),
                                                  batch))(row.params)
  assert scores.shape == (2, 2) and np.all(np.isfinite(np.asarray(scores)))
  # A bdiff workdir of another backbone is refused before anything is restored.
  c2 = helpers.tiny_config()
  (tmp_path / "std").mkdir()
  config_compat.write_config_atomically(c2, tmp_path / "std")
  g.opt_dir = str(tmp_path / "std")
  with pytest.raises(ConfigError, match="backbone 'standard'"):
    glue_rows.build_row(glue_rows.RowSpec("opt", "mezo", False), _plain(g), full, seed=0,
                          total_steps=3)
