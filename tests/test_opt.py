"""OPT in Flax against transformers' reference logits on tiny fixtures (no torch needed).

The fixtures in tests/fixtures/tiny_opt*/ are written by scripts/make_opt_fixture.py.
"""

import dataclasses
import functools
import json
import os
import pickle
import shutil
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdiff_jax.data.bpe_tokenizer import TokenizerFilesError, load_bpe_tokenizer
from bdiff_jax.errors import UserError
from bdiff_jax.models.hf_checkpoint import (HFCheckpointError, hf_to_flax_params, load_opt,
                                            load_opt_config, read_pytorch_bin, read_safetensors,
                                            read_state_dict)
from bdiff_jax.models.opt import OPT, OPTConfig, OPTConfigError, pool_last_token

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PRE_LN = os.path.join(FIXTURES, "tiny_opt")
POST_LN = os.path.join(FIXTURES, "tiny_opt_350m_style")


@functools.lru_cache(maxsize=None)
def _loaded(directory):
  config, params = load_opt(directory)
  model = OPT(config, precision=jax.lax.Precision.HIGHEST)  # full float32 on GPUs/TPUs too
  apply = jax.jit(lambda p, ids, mask: (model.apply({"params": p}, ids, mask),
                                        model.apply({"params": p}, ids, mask, return_hidden=True)))
  return config, params, apply


def _reference(directory):
  return np.load(os.path.join(directory, "reference.npz"))


def _rel_err(ours, ref):
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("directory", [PRE_LN, POST_LN], ids=["pre_ln", "post_ln_350m_style"])
def test_logits_and_hidden_match_transformers(directory):
  config, params, apply = _loaded(directory)
  assert config.do_layer_norm_before == (directory == PRE_LN)
  assert config.has_projections == (directory == POST_LN)
  ref = _reference(directory)
  mask = ref["attention_mask"]
  assert (mask == 0).any(), "the fixture batch must contain left padding"
  logits, hidden = apply(params, ref["input_ids"], mask)
  assert logits.dtype == jnp.float32 and logits.shape == mask.shape + (config.vocab_size,)
  real = mask.astype(bool)                      # the reference holds only non-pad positions
  assert _rel_err(logits[real], ref["logits"]) <= 1e-5
  assert _rel_err(hidden[real], ref["hidden"]) <= 1e-5
  assert np.std(ref["logits"]) > 0.2            # the random weights make logits far from 0


def test_left_padded_row_equals_unpadded_sequence():
  _, params, apply = _loaded(PRE_LN)
  ref = _reference(PRE_LN)
  mask = ref["attention_mask"]
  row = int(np.argmin(mask.sum(1)))             # the most padded row
  n = int(mask[row].sum())
  alone = np.zeros_like(ref["input_ids"])       # same length (same compiled function), right pad
  alone[:, :n] = ref["input_ids"][row, -n:]
  alone_mask = np.zeros_like(mask)
  alone_mask[:, :n] = 1
  padded, _ = apply(params, ref["input_ids"], mask)
  unpadded, _ = apply(params, alone, alone_mask)
  np.testing.assert_allclose(padded[row, -n:], unpadded[0, :n], rtol=1e-5, atol=1e-5)
  # A different token at a pad position changes nothing at the real positions.
  noisy = ref["input_ids"].copy()
  noisy[row, 0] = 7
  changed, _ = apply(params, noisy, mask)
  np.testing.assert_allclose(changed[row, -n:], padded[row, -n:], rtol=0, atol=0)


def test_loaded_tree_matches_initialised_tree():
  for directory in (PRE_LN, POST_LN):
    config, params, _ = _loaded(directory)
    ids = jnp.zeros((1, 4), jnp.int32)
    init = jax.eval_shape(lambda: OPT(config).init(jax.random.key(0), ids, ids + 1)["params"])
    assert (jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(params))
    for a, b in zip(jax.tree_util.tree_leaves(init), jax.tree_util.tree_leaves(params)):
      assert a.shape == b.shape and b.dtype == jnp.float32


def test_pytorch_bin_and_safetensors_give_identical_params():
  config = load_opt_config(PRE_LN)
  from_st = read_safetensors(os.path.join(PRE_LN, "model.safetensors"))
  from_bin = read_pytorch_bin(os.path.join(PRE_LN, "pytorch_model.bin"))
  assert any(k.startswith("model.") for k in from_st)          # transformers' names
  assert all(k.startswith("decoder.") for k in from_bin)       # original facebook/opt names
  a, b = hf_to_flax_params(from_st, config), hf_to_flax_params(from_bin, config)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)
  # The stacked layer axis holds layer 1 at index 1, transposed from PyTorch's [out, in].
  np.testing.assert_array_equal(a["layers"]["fc1"]["kernel"][1],
                                from_bin["decoder.layers.1.fc1.weight"].T)


def test_pickle_reader_handles_half_bfloat16_strides_and_offsets():
  tensors = read_pytorch_bin(os.path.join(PRE_LN, "dtypes.bin"))
  ref = _reference(PRE_LN)
  assert tensors["float16"].dtype == np.float16
  assert tensors["bfloat16"].dtype.name == "bfloat16"
  for name in ("float16", "bfloat16", "transposed", "row", "scalar"):
    np.testing.assert_array_equal(tensors[name].astype(np.float32), ref[f"dtype_{name}"])


def test_pickle_reader_refuses_code(tmp_path):
  path = str(tmp_path / "evil.bin")
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"w": os.getcwd}))   # a GLOBAL to posix.getcwd
  with pytest.raises(HFCheckpointError, match="getcwd"):
    read_pytorch_bin(path)


@pytest.mark.parametrize("directory", [PRE_LN, POST_LN], ids=["vocab_merges", "tokenizer_json"])
def test_tokenizer_matches_transformers(directory):
  ref = _reference(directory)
  tok = load_bpe_tokenizer(directory)
  assert (tok.bos_id, tok.pad_id) == (2, 1)
  expected = np.split(ref["token_ids"], np.cumsum(ref["token_lengths"])[:-1])
  for text, ids in zip(ref["texts"], expected):
    assert tok.encode(str(text)) == ids.tolist()
  ids, mask = tok.encode_batch([str(t) for t in ref["texts"]],
                               max_length=ref["input_ids"].shape[1])
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])
  assert tok.decode(tok.encode("Hello world!")) == "Hello world!"


def test_missing_unexpected_and_misshaped_tensors_are_named():
  config = load_opt_config(PRE_LN)
  state = read_state_dict(PRE_LN)
  name = "model.decoder.layers.1.self_attn.k_proj.bias"
  with pytest.raises(HFCheckpointError, match=r"lacks tensor decoder\.layers\.1\.self_attn\.k_proj"):
    hf_to_flax_params({k: v for k, v in state.items() if k != name}, config)
  with pytest.raises(HFCheckpointError, match=r"unexpected tensor decoder\.layers\.2\.fc1\.weight"):
    hf_to_flax_params({**state, "model.decoder.layers.2.fc1.weight": state[name]}, config)
  bad = {**state, "model.decoder.layers.0.fc2.weight": state["model.decoder.layers.0.fc1.weight"]}
  with pytest.raises(HFCheckpointError, match=r"decoder\.layers\.0\.fc2\.weight has shape \(64, 16\)"):
    hf_to_flax_params(bad, config)
  emb = state["model.decoder.embed_tokens.weight"]
  with pytest.raises(HFCheckpointError, match="lm_head.weight"):
    hf_to_flax_params({**state, "lm_head.weight": emb + 1}, config)
  # A config.json that does not belong to the weights (post-LN weights have project_in/out).
  with pytest.raises(HFCheckpointError, match="unexpected tensor decoder.project_in.weight"):
    hf_to_flax_params(read_state_dict(POST_LN),
                      dataclasses.replace(load_opt_config(POST_LN), word_embed_proj_dim=24))


def test_bad_config_and_directories_raise_user_errors(tmp_path):
  with open(os.path.join(PRE_LN, "config.json")) as f:
    good = json.load(f)
  for change, match in (({"activation_function": "tanh"}, "activation_function"),
                        ({"num_attention_heads": 3}, "not divisible"),
                        ({"model_type": "gpt2"}, "model_type"),
                        ({"hidden_size": "16"}, "hidden_size"),
                        ({"do_layer_norm_before": 1}, "do_layer_norm_before"),
                        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
                        ({"pad_token_id": 999}, "pad_token_id")):
    with pytest.raises(OPTConfigError, match=match):
      OPTConfig.from_hf_dict({**good, **change})
  assert not OPTConfig.from_hf_dict({**good, "_remove_final_layer_norm": True}).has_final_layer_norm
  with pytest.raises(UserError, match="config.json"):
    OPTConfig.from_hf_dict({k: v for k, v in good.items() if k != "ffn_dim"})
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(OPTConfigError, match="not valid JSON"):
    load_opt_config(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(good))
  with pytest.raises(HFCheckpointError, match="no model.safetensors or pytorch_model.bin"):
    load_opt(tmp_path)
  with pytest.raises(TokenizerFilesError, match="no tokenizer.json"):
    load_bpe_tokenizer(tmp_path)
  shutil.copy(os.path.join(POST_LN, "model.safetensors.index.json"), tmp_path)
  with pytest.raises(HFCheckpointError, match="model-00001-of-00002.safetensors"):
    load_opt(tmp_path)
  config, _, _ = _loaded(PRE_LN)
  too_long = jnp.ones((1, config.max_position_embeddings + 1), jnp.int32)
  with pytest.raises(OPTConfigError, match="max_position_embeddings"):
    jax.eval_shape(lambda: OPT(config).init(jax.random.key(0), too_long, too_long))


def test_pool_last_token_left_and_right_padding():
  hidden = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  left = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]])
  right = jnp.array([[1, 1, 0, 0], [1, 1, 1, 0]])
  np.testing.assert_array_equal(pool_last_token(hidden, left), hidden[:, 3])
  np.testing.assert_array_equal(pool_last_token(hidden, right),
                                jnp.stack([hidden[0, 1], hidden[1, 2]]))
