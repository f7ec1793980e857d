"""Writes the tiny OPT fixtures of tests/test_opt.py, with PyTorch + transformers (dev-only).

    python -m venv /tmp/venv_dev && /tmp/venv_dev/bin/pip install -r requirements-dev.txt
    /tmp/venv_dev/bin/python scripts/make_opt_fixture.py [--out tests/fixtures]
    # only the tokenizer variants (no PyTorch needed: transformers, tokenizers, numpy):
    /tmp/venv_tf/bin/python scripts/make_opt_fixture.py --tokenizer-only

Makes two randomly initialised (seeded) `OPTForCausalLM`s sharing one tiny GPT-2-style byte-level
BPE vocabulary trained here on a few sentences:

  tiny_opt/              pre-LN like opt-125m: config.json, model.safetensors (transformers'
                         save, `model.` names) and pytorch_model.bin (torch.save of the state dict
                         with the original facebook/opt-* `decoder.` names, no lm_head), tokenizer
                         as facebook/opt-* ships it: vocab.json, merges.txt, tokenizer_config.json,
                         special_tokens_map.json.
  tiny_opt_350m_style/   post-LN with project_in/project_out (word_embed_proj_dim < hidden_size)
                         like opt-350m: config.json, SHARDED safetensors + index, tokenizer as
                         transformers re-saves it (tokenizer.json).

All parameters (incl. layer-norm scales and biases, which HF initialises to 1 and 0) are redrawn
with sizeable random values so that every tensor influences the logits. Each directory gets a
`reference.npz`: the test texts, their `input_ids` from transformers' tokenizer
(`AutoTokenizer(text)["input_ids"]`, ragged, stored as `token_ids` + `token_lengths`), a LEFT-padded
batch of them (`input_ids`, `attention_mask`), and transformers' float32 `logits` [N, V] and
final hidden states `hidden` [N, E] (eager attention) at the N non-pad positions of that batch,
in row-major order (`logits_full[attention_mask == 1]`). `dtypes.bin` (tiny_opt only) is a
torch.save of float16 / bfloat16 / non-contiguous tensors with their float32 values in
`reference.npz` (`dtype_<name>`), for the torch-free pickle reader.

`write_tokenizer_variants` (also run alone by `--tokenizer-only`, which leaves the models as they
are) writes `tokenizer_variants/`: directories with tiny_opt's vocabulary and the config variants
whose BOS handling differs (`add_bos_token` true / false / absent with vocab.json + merges.txt,
and a tokenizer.json whose post-processor adds the BOS or not, with a tokenizer_config.json that
says the opposite), plus `tokenizer_reference.json`: per directory, the ids transformers'
`AutoTokenizer` gives for `TOKENIZER_TEXTS`, and the transformers version that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import numpy as np
import tokenizers
import transformers

SEED = 20240531
TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A masked diffusion language model denoises tokens in parallel.",
    "Reversible transformers rebuild activations instead of storing them.",
    "Open pre-trained transformer language models range from 125M to 175B parameters.",
    "The movie was a delight from start to finish, warm and funny.",
    "It is a dull, lifeless film with nothing to say.",
    "Hello world! Hello again, world. 1234567890",
]
TEST_TEXT = [
    "Hello world!",
    " The lazy dog, a fox.",  # leading space: GPT-2 BPE adds none itself
    "na\u00efve caf\u00e9 \u2603 \U0001F600 </s> qq",  # unseen bytes, a special token inside
    "It was funny.",
]
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]
BPE_VOCAB = 320
MODEL_VOCAB = 324  # like facebook/opt-*, the embedding has a few rows more than the tokenizer
OPT_TOKENIZER_CONFIG = {  # what facebook/opt-125m's tokenizer_config.json says
    "add_bos_token": True, "add_prefix_space": False, "bos_token": "</s>", "eos_token": "</s>",
    "pad_token": "<pad>", "unk_token": "</s>", "errors": "replace",
    "tokenizer_class": "GPT2Tokenizer", "model_max_length": 64,
}
VARIANTS = {
    "tiny_opt": dict(hidden_size=16, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                     do_layer_norm_before=True, word_embed_proj_dim=16),
    "tiny_opt_350m_style": dict(hidden_size=24, num_hidden_layers=2, ffn_dim=64,
                                num_attention_heads=2, do_layer_norm_before=False,
                                word_embed_proj_dim=16),
}


def train_tokenizer(out_dir: str) -> None:
  """vocab.json + merges.txt of a byte-level BPE, plus OPT's tokenizer config files."""
  bpe = tokenizers.ByteLevelBPETokenizer(add_prefix_space=False)
  bpe.train_from_iterator(TRAIN_TEXT * 4, vocab_size=BPE_VOCAB, min_frequency=2,
                          special_tokens=SPECIAL, show_progress=False)
  bpe.save_model(out_dir)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(OPT_TOKENIZER_CONFIG, f, indent=2)
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump({k: OPT_TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "pad_token",
                                                     "unk_token")}, f, indent=2)


TOKENIZER_TEXTS = TEST_TEXT + [
    "",
    "Yes",
    'A cat sat.\nDoes this mean that "A cat." is true? Yes or No?\n',
]
BYTE_LEVEL_POST_PROCESSOR = {"type": "ByteLevel", "add_prefix_space": False,
                             "trim_offsets": False, "use_regex": True}


def write_tokenizer_variants(out: str) -> None:
  """tokenizer_variants/ (see the module docstring), from tiny_opt's and tiny_opt_350m_style's
  tokenizer files in `out`, with transformers' ids for `TOKENIZER_TEXTS`."""
  root = os.path.join(out, "tokenizer_variants")
  shutil.rmtree(root, ignore_errors=True)
  vocab_dir = os.path.join(out, "tiny_opt")
  json_dir = os.path.join(out, "tiny_opt_350m_style")
  with open(os.path.join(json_dir, "tokenizer.json"), encoding="utf-8") as f:
    template_json = json.load(f)  # its post-processor puts </s> first
  bytelevel_json = dict(template_json, post_processor=BYTE_LEVEL_POST_PROCESSOR)
  config = {k: v for k, v in OPT_TOKENIZER_CONFIG.items() if k != "add_bos_token"}
  variants = {  # name -> (tokenizer.json content or None: vocab + merges, add_bos_token)
      "bos_true": (None, True), "bos_false": (None, False), "bos_absent": (None, None),
      "json_template_bos_false": (template_json, False),
      "json_bytelevel_bos_true": (bytelevel_json, True),
  }
  reference = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
               "texts": TOKENIZER_TEXTS, "variants": {}}
  for name, (tokenizer_json, add_bos) in variants.items():
    d = os.path.join(root, name)
    os.makedirs(d)
    if tokenizer_json is None:
      for f in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(vocab_dir, f), d)
    else:
      with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_json, f, ensure_ascii=False)
    cfg = dict(config) if add_bos is None else {"add_bos_token": add_bos, **config}
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
      json.dump(cfg, f, indent=2)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    reference["variants"][name] = {
        "class": type(tok).__name__,
        "input_ids": [tok(t)["input_ids"] for t in TOKENIZER_TEXTS]}
  with open(os.path.join(root, "tokenizer_reference.json"), "w") as f:
    json.dump(reference, f, indent=1)
  print(f"{root}: {sorted(os.listdir(root))}")


def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
  """Redraws every parameter so that biases and layer-norm affines are far from 0 / 1."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if name.endswith("layer_norm.weight"):
        p.copy_(1.0 + 0.3 * noise)
      elif name.endswith("bias"):
        p.copy_(0.3 * noise)
      elif "embed" in name:  # small, so that the layer norms' eps = 1e-5 matters
        p.copy_(0.1 * noise)
      else:  # Linear [out, in]
        p.copy_(noise / np.sqrt(p.shape[1]))


def reference(model, tokenizer, out_dir: str, extra: dict[str, np.ndarray]) -> None:
  ids = [tokenizer(t)["input_ids"] for t in TEST_TEXT]
  tokenizer.padding_side = "left"
  batch = tokenizer(TEST_TEXT, padding=True, return_tensors="pt")
  with torch.no_grad():
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    hidden = model.model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).last_hidden_state
  real = batch["attention_mask"].numpy().astype(bool)  # only non-pad positions are stored
  np.savez_compressed(
      os.path.join(out_dir, "reference.npz"), texts=np.array(TEST_TEXT),
      token_ids=np.concatenate([np.array(i, np.int32) for i in ids]),
      token_lengths=np.array([len(i) for i in ids], np.int32),
      input_ids=batch["input_ids"].numpy().astype(np.int32),
      attention_mask=batch["attention_mask"].numpy().astype(np.int32),
      logits=logits.float().numpy()[real], hidden=hidden.float().numpy()[real], **extra)


def dtype_fixture(out_dir: str, generator: torch.Generator) -> dict[str, np.ndarray]:
  base = torch.randn(3, 5, generator=generator)
  tensors = {"float16": base.half(), "bfloat16": base.bfloat16(),
             "transposed": base.t(),                 # non-contiguous strides
             "row": base[1],                         # non-zero storage offset
             "scalar": base[2, 3].clone()}
  torch.save(tensors, os.path.join(out_dir, "dtypes.bin"))
  return {f"dtype_{k}": v.float().numpy() for k, v in tensors.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join("tests", "fixtures"))
  parser.add_argument("--tokenizer-only", action="store_true",
                      help="only rewrite tokenizer_variants/ (from the existing tiny_opt*/)")
  args = parser.parse_args()
  if args.tokenizer_only:
    write_tokenizer_variants(args.out)
    return
  import torch  # pylint: disable=import-outside-toplevel
  globals()["torch"] = torch  # the model helpers above use it
  torch.manual_seed(SEED)
  generator = torch.Generator().manual_seed(SEED)
  with tempfile.TemporaryDirectory() as tok_dir:
    train_tokenizer(tok_dir)
    for name, arch in VARIANTS.items():
      out_dir = os.path.join(args.out, name)
      shutil.rmtree(out_dir, ignore_errors=True)
      os.makedirs(out_dir)
      config = transformers.OPTConfig(
          vocab_size=MODEL_VOCAB, max_position_embeddings=64, pad_token_id=1, bos_token_id=2,
          eos_token_id=2, activation_function="relu", dropout=0.0, **arch)
      model = transformers.OPTForCausalLM(config).eval()
      model.config._attn_implementation = "eager"
      randomize(model, generator)
      extra = {}
      if name == "tiny_opt":
        for f in os.listdir(tok_dir):
          shutil.copy(os.path.join(tok_dir, f), out_dir)
        model.save_pretrained(out_dir)
        # The original facebook/opt-* uploads: pytorch_model.bin, names without "model.".
        state = {k[len("model."):]: v.clone() for k, v in model.state_dict().items()
                 if k.startswith("model.")}
        torch.save(state, os.path.join(out_dir, "pytorch_model.bin"))
        extra = dtype_fixture(out_dir, generator)
        tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
      else:
        model.save_pretrained(out_dir, max_shard_size="40KB")
        tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
        tokenizer.save_pretrained(out_dir)
        tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
      reference(model, tokenizer, out_dir, extra)
      print(f"{out_dir}: {sorted(os.listdir(out_dir))}")
  write_tokenizer_variants(args.out)


if __name__ == "__main__":
  main()
