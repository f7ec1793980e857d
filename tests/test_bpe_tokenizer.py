"""Tests of the OPT BPE tokenizer's special tokens against transformers' own ids.

tests/fixtures/tokenizer_variants/ (written by scripts/make_opt_fixture.py --tokenizer-only) holds
tokenizer directories that differ only in how the BOS is configured, and the ids transformers'
AutoTokenizer gave for a few texts in each.
"""

import json
import os
import shutil

import pytest

from bdiff_jax.data.bpe_tokenizer import TokenizerFilesError, load_bpe_tokenizer
from bdiff_jax.glue import encoding as glue_encoding

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
VARIANTS = os.path.join(FIXTURES, "tokenizer_variants")

with open(os.path.join(VARIANTS, "tokenizer_reference.json"), encoding="utf-8") as _f:
  REFERENCE = json.load(_f)


@pytest.mark.parametrize("variant", sorted(REFERENCE["variants"]))
def test_ids_match_transformers(variant):
  tok = load_bpe_tokenizer(os.path.join(VARIANTS, variant))
  expected = REFERENCE["variants"][variant]["input_ids"]
  for text, ids in zip(REFERENCE["texts"], expected):
    assert tok.encode(text) == ids, (variant, text)
  with_bos = variant in ("bos_true", "json_template_bos_false")
  assert tok.add_bos_token == with_bos
  assert tok.start_ids == ([tok.bos_id] if with_bos else []) and tok.end_ids == []
  assert tok.encode_text("Hello world!") == expected[0][len(tok.start_ids):]


def test_reference_covers_each_rule():
  # absent means false for vocab.json + merges.txt; a tokenizer.json's post-processor wins.
  ids = {k: v["input_ids"][0] for k, v in REFERENCE["variants"].items()}
  assert ids["bos_true"][0] == 2 and ids["bos_true"][1:] == ids["bos_false"]
  assert ids["bos_absent"] == ids["bos_false"] == ids["json_bytelevel_bos_true"]
  assert ids["json_template_bos_false"] == ids["bos_true"]


def test_encoder_start_follows_add_bos_token():
  for variant, start in (("bos_true", [2]), ("bos_false", [])):
    enc = glue_encoding.BPEEncoder(load_bpe_tokenizer(os.path.join(VARIANTS, variant)))
    assert enc.start_ids == start
    # The text's ids never lose a token to a BOS that is not there.
    assert enc.ids("Hello world!") == REFERENCE["variants"]["bos_false"]["input_ids"][0]


def test_bad_add_bos_token(tmp_path):
  shutil.copytree(os.path.join(VARIANTS, "bos_true"), tmp_path, dirs_exist_ok=True)
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"add_bos_token": "yes"}, f)
  with pytest.raises(TokenizerFilesError, match="add_bos_token is 'yes'"):
    load_bpe_tokenizer(tmp_path)
