"""Tests of the data layer: TFDS builder, validation, tokenizers, token streams and batches."""

import json
import os
import sys
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bdiff_jax.data import pipeline
from bdiff_jax.data import tokenizer as tokenizer_lib
from bdiff_jax.data import wikitext2
from bdiff_jax.errors import DataError, VocabularyError
from tests import helpers

REPO = helpers.REPO


def _real_dir() -> str:
  return os.environ.get("BDIFF_DATA_DIR") or os.path.join(REPO, "..", "shared", "data",
                                                          "wikitext-2")


def _data_config(data_dir, *, variant="v1", verify_counts=True, tfds_dir=""):
  c = ml_collections.ConfigDict()
  c.name = "wikitext2"
  c.variant = variant
  c.data_dir = str(data_dir)
  c.tfds_dir = str(tfds_dir)
  c.seq_len = 16
  c.verify_counts = verify_counts
  return c


def _file_lines(path):
  with open(path, encoding="utf-8", newline="") as f:
    return f.read().split("\n")[:-1]


@pytest.fixture(scope="module", autouse=True)
def isolated_cache(tmp_path_factory):
  """The default prepared-data cache ($BDIFF_CACHE_DIR) of this module: a fresh directory."""
  cache = tmp_path_factory.mktemp("bdiff_cache")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(pipeline.CACHE_ENV, str(cache))
    yield str(cache)


@pytest.fixture(scope="module")
def real_dir():
  path = os.path.abspath(_real_dir())
  if not all(os.path.exists(os.path.join(path, f"wiki.{s}.tokens"))
             for s in ("train", "valid", "test")):
    pytest.skip(f"WikiText-2 not found at {path}: set BDIFF_DATA_DIR to a directory holding "
                "wiki.{train,valid,test}.tokens")
  return path


@pytest.fixture(scope="module")
def real(real_dir, tmp_path_factory):
  """Real WikiText-2, prepared once for this module: (splits, workdir, first load seconds)."""
  workdir = tmp_path_factory.mktemp("real_workdir")
  start = time.perf_counter()
  splits = pipeline.load_wikitext2(_data_config(real_dir), workdir)
  return splits, workdir, time.perf_counter() - start


@pytest.fixture
def tiny(tmp_path):
  return wikitext2.write_synthetic_corpus(tmp_path / "tiny")


# ---------------------------------------------------------------------------------------------
# Real WikiText-2.


def test_real_counts_and_vocabulary(real):
  splits, workdir, _ = real
  tok = splits.tokenizer
  assert isinstance(tok, tokenizer_lib.WordTokenizer)
  assert tok.vocab_size == 33_278
  assert tok.mask_id == 33_278 and tok.num_input_ids == 33_279
  assert tok.words[tok.eos_id] == "<eos>" and tok.words[tok.unk_id] == "<unk>"
  c = splits.counts
  assert (c["train"].num_words, c["valid"].num_words, c["test"].num_words) == (
      2_051_910, 213_886, 241_211)
  assert (c["valid"].num_lines, c["test"].num_lines) == (3_760, 4_358)
  assert c["train"].num_lines == len(_file_lines(os.path.join(_real_dir(), "wiki.train.tokens")))
  assert (c["valid"].num_tokens, c["test"].num_tokens) == (217_646, 245_569)
  for name in ("train", "valid", "test"):
    a = splits.tokens(name)
    assert a.dtype == np.int32 and a.ndim == 1 and a.size == c[name].num_tokens
    assert c[name].num_tokens == c[name].num_words + c[name].num_lines
    assert tok.count_words(a) == c[name].num_tokens
    assert int((a == tok.eos_id).sum()) == c[name].num_lines
    assert a.min() >= 0 and a.max() < tok.vocab_size  # never the mask id
    assert a[-1] == tok.eos_id
    assert not a.flags.writeable
    # Every valid/test word is in the train vocabulary, as in canonical WikiText-2.
    assert c[name].num_unknown == 0
  assert tok.id_of('"') is not None and tok.id_of('""') is None
  assert tokenizer_lib.load_tokenizer(os.path.join(workdir, "vocab.json")) == tok


def test_real_valid_tokens_match_the_file(real, real_dir):
  splits, _, _ = real
  tok = splits.tokenizer
  lines = _file_lines(os.path.join(real_dir, "wiki.valid.tokens"))
  ends = np.flatnonzero(splits.valid == tok.eos_id)
  assert ends.size == len(lines)
  for k in (0, 1, 2, 500, len(lines) - 1):
    start = ends[k - 1] + 1 if k else 0
    assert tok.decode(splits.valid[start:ends[k] + 1]) == " ".join(lines[k].split()) + "\n"
  assert tok.decode(splits.valid[:ends[2] + 1]) == "".join(
      " ".join(line.split()) + "\n" for line in lines[:3])


@pytest.mark.parametrize("seq_len,max_tokens", [(128, 0), (100, 0), (64, 10_000), (7, 1)])
def test_real_eval_blocks_cover_every_token_once(real, seq_len, max_tokens):
  splits, _, _ = real
  for name in ("valid", "test"):
    tokens = splits.tokens(name)
    blocks, tail = pipeline.eval_blocks(tokens, seq_len, max_tokens)
    expected = tokens[:max_tokens] if max_tokens else tokens
    assert blocks.dtype == np.int32 and blocks.shape == (expected.size // seq_len, seq_len)
    joined = np.concatenate([blocks.reshape(-1)] + ([tail] if tail is not None else []))
    np.testing.assert_array_equal(joined, expected)
    assert (tail is None) == (expected.size % seq_len == 0)
    if tail is not None:
      assert 0 < tail.size < seq_len


def test_real_second_load_uses_cache(real, real_dir, monkeypatch):
  splits, workdir, first_seconds = real

  def no_build(*args, **kwargs):
    raise AssertionError("the prepared dataset should have been reused from the cache")

  monkeypatch.setattr(wikitext2, "Wikitext2", no_build)
  start = time.perf_counter()
  again = pipeline.load_wikitext2(_data_config(real_dir), workdir)
  seconds = time.perf_counter() - start
  print(f"WikiText-2 first load {first_seconds:.2f}s, cached load {seconds:.2f}s")
  assert seconds < 10  # ~0.5 s on an idle machine
  assert again.tokenizer == splits.tokenizer and again.counts == splits.counts
  for name in ("train", "valid", "test"):
    np.testing.assert_array_equal(again.tokens(name), splits.tokens(name))


def test_real_train_batches(real):
  splits, _, _ = real
  batches = pipeline.TrainBatches(splits.train, seq_len=128, batch_size=32, seed=0)
  assert batches.num_blocks == splits.counts["train"].num_tokens // 128
  assert batches.batches_per_epoch == batches.num_blocks // 32
  b = batches.batch(0)
  assert b.shape == (32, 128) and b.dtype == np.int32
  starts = [np.flatnonzero((splits.train[:batches.num_blocks * 128].reshape(-1, 128) == row)
                           .all(axis=1)) for row in b[:2]]
  assert all(s.size >= 1 for s in starts)


def _copy_real(real_dir, dst, valid_bytes):
  """A data dir with links to the real train/test files and the given valid file content."""
  os.makedirs(dst)
  for split in ("train", "test"):
    name = f"wiki.{split}.tokens"
    os.symlink(os.path.join(real_dir, name), os.path.join(dst, name))
  with open(os.path.join(dst, "wiki.valid.tokens"), "wb") as f:
    f.write(valid_bytes)
  return dst


def _real_valid(real_dir):
  with open(os.path.join(real_dir, "wiki.valid.tokens"), "rb") as f:
    return f.read()


def test_truncated_valid_file(real_dir, tmp_path):
  content = _real_valid(real_dir)
  cut = content.rfind(b" ", 0, len(content) // 2)  # mid-line, between two words
  data = _copy_real(real_dir, tmp_path / "data", content[:cut])
  with pytest.raises(DataError, match=r"wiki\.valid\.tokens does not end with a newline: it is "
                                      r"truncated.*Fix: re-download"):
    pipeline.load_wikitext2(_data_config(data), tmp_path / "work")
  assert not os.path.exists(tmp_path / "work")  # fails before anything is prepared


def test_valid_file_with_lines_removed(real_dir, tmp_path):
  lines = _real_valid(real_dir).split(b"\n")
  del lines[100:140]  # whole lines: the file still ends with a newline
  data = _copy_real(real_dir, tmp_path / "data", b"\n".join(lines))
  with pytest.raises(DataError) as e:
    pipeline.load_wikitext2(_data_config(data), tmp_path / "work")
  msg = str(e.value)
  assert "wiki.valid.tokens" in msg and "expected 213,886" in msg
  assert "BDIFF_DATA_DIR" in msg and "verify_counts=false" in msg
  assert "\n" not in msg


def test_valid_file_with_blank_lines_removed(real_dir, tmp_path):
  content = _real_valid(real_dir).replace(b"\n \n", b"\n", 5)  # same words, fewer lines
  data = _copy_real(real_dir, tmp_path / "data", content)
  with pytest.raises(DataError, match=r"3,755 lines, expected 3,760"):
    wikitext2.validate_source_dir(data)
  # The check is what verify_counts turns off.
  assert wikitext2.validate_source_dir(data, verify_counts=False).files[
      "validation"].num_lines == 3_755


# ---------------------------------------------------------------------------------------------
# Validation errors on small files.


def test_missing_directory(tmp_path):
  with pytest.raises(DataError, match=r"directory .*nowhere.* does not exist.*BDIFF_DATA_DIR"):
    pipeline.load_wikitext2(_data_config(tmp_path / "nowhere"), tmp_path / "work")


def test_missing_file(tiny, tmp_path):
  os.remove(os.path.join(tiny, "wiki.test.tokens"))
  with pytest.raises(DataError, match=r"wiki\.test\.tokens is missing"):
    pipeline.load_wikitext2(_data_config(tiny, verify_counts=False), tmp_path / "work")


def test_empty_file(tiny):
  open(os.path.join(tiny, "wiki.valid.tokens"), "w").close()
  with pytest.raises(DataError, match=r"wiki\.valid\.tokens is empty"):
    wikitext2.validate_source_dir(tiny, verify_counts=False)


def test_non_utf8_file(tiny):
  path = os.path.join(tiny, "wiki.train.tokens")
  with open(path, "ab") as f:
    f.write(b" caf\xe9 latin-1 \n")
  with pytest.raises(DataError, match=r"wiki\.train\.tokens is not valid UTF-8 \(byte \d+, line "):
    wikitext2.validate_source_dir(tiny, verify_counts=False)


def test_counts_checked_by_default(tiny, tmp_path):
  with pytest.raises(DataError, match=r"wiki\.train\.tokens has [\d,]+ words, expected 2,051,910"):
    pipeline.load_wikitext2(_data_config(tiny), tmp_path / "work")


def test_no_data_dir_offline(tmp_path, monkeypatch):
  monkeypatch.setattr(wikitext2, "reachability_problem", lambda url: "cannot resolve host")
  with pytest.raises(DataError, match=r"Could not download WikiText-2.*s3\.amazonaws\.com.*Fix: "
                                      r"when offline, set BDIFF_DATA_DIR or "
                                      r"--config\.data\.data_dir"):
    pipeline.load_wikitext2(_data_config(""), tmp_path / "work")


class _FakeDownloadManager:
  """Stands in for TFDS's download manager: fails for some urls, 'extracts' to a directory."""

  def __init__(self, extracted, failing):
    self.extracted, self.failing, self.urls = extracted, failing, []

  def download_and_extract(self, url):
    self.urls.append(url)
    if url in self.failing:
      raise ConnectionError("unreachable")
    return self.extracted


def test_download_falls_back_to_the_next_mirror(tmp_path, monkeypatch):
  monkeypatch.setattr(wikitext2, "reachability_problem", lambda url: None)
  archive = tmp_path / "extracted"
  wikitext2.write_synthetic_corpus(archive / "wikitext-2")  # the archive's layout
  first, second = wikitext2.DOWNLOAD_URLS["v1"]
  builder = wikitext2.Wikitext2(data_dir=tmp_path / "tfds", file_format="array_record",
                                verify_counts=False)
  dl = _FakeDownloadManager(str(archive), failing={first})
  generators = builder._split_generators(dl)  # pylint: disable=protected-access
  assert dl.urls == [first, second]
  assert builder.source_files.directory == str(archive / "wikitext-2")
  examples = list(generators["validation"])
  assert [ex["text"] for _, ex in examples] == _file_lines(archive / "wikitext-2" /
                                                           "wiki.valid.tokens")
  dl = _FakeDownloadManager(str(archive), failing={first, second})
  with pytest.raises(DataError, match=r"Could not download.*ConnectionError: unreachable.*"
                                      r"BDIFF_DATA_DIR"):
    builder._split_generators(dl)  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------
# TFDS builder and the pipeline on a tiny synthetic corpus.


@pytest.mark.parametrize("variant", ["v1", "raw"])
def test_tfds_build_and_read_in_order(tmp_path, variant):
  src = wikitext2.write_synthetic_corpus(tmp_path / "src", variant=variant)
  builder = wikitext2.Wikitext2(config=variant, data_dir=tmp_path / "tfds",
                                file_format="array_record", verify_counts=False)
  builder.download_and_prepare(file_format="array_record",
                               download_config=tfds.download.DownloadConfig(manual_dir=src))
  sources = builder.as_data_source()
  assert set(sources) == {"train", "validation", "test"}
  for split in wikitext2.SPLITS:
    expected = _file_lines(os.path.join(src, wikitext2.file_name(split, variant)))
    ds = sources[split]
    assert len(ds) == len(expected)
    assert [int(ds[i]["line"]) for i in range(len(ds))] == list(range(len(expected)))
    assert wikitext2.read_split_lines(ds) == expected
  assert builder.info.metadata["source_fingerprint"] == wikitext2.validate_source_dir(
      src, variant, verify_counts=False).fingerprint
  assert "tensorflow" not in sys.modules


def test_doubled_quotes_are_read_as_quotes(tmp_path):
  src = wikitext2.write_synthetic_corpus(tmp_path / "src")
  train = os.path.join(src, "wiki.train.tokens")
  with open(train, "a", encoding="utf-8") as f:
    f.write(' He said "" hello "" . \n')
  with open(os.path.join(src, "wiki.valid.tokens"), "a", encoding="utf-8") as f:
    f.write(' He said " hello " . \n')
  info = wikitext2.validate_source_dir(src, verify_counts=False)
  assert info.files["train"].doubled_quotes and not info.files["validation"].doubled_quotes
  splits = pipeline.load_wikitext2(_data_config(src, verify_counts=False), tmp_path / "work")
  tok = splits.tokenizer
  assert tok.id_of('"') is not None and tok.id_of('""') is None
  assert tok.decode(splits.train[-7:]) == 'He said " hello " .\n'
  assert splits.counts["valid"].num_unknown == 1  # only "zebra", not the quotes


def test_pipeline_on_tiny_corpus(tiny, tmp_path, isolated_cache):
  work = tmp_path / "work"
  config = _data_config(tiny, verify_counts=False)
  splits = pipeline.load_wikitext2(config, work)
  tok = splits.tokenizer
  assert splits.variant == "v1"
  # Prepared once in the shared cache, not in the workdir.
  assert splits.prepared_dir.startswith(os.path.join(isolated_cache, "src-"))
  assert sorted(os.listdir(work)) == ["vocab.json"]
  for name, split in pipeline.SPLIT_NAMES.items():
    lines = _file_lines(os.path.join(tiny, wikitext2.file_name(split)))
    c = splits.counts[name]
    assert c.num_lines == len(lines)
    assert c.num_words == sum(len(line.split()) for line in lines)
    assert c.num_tokens == c.num_words + c.num_lines == splits.tokens(name).size
    known = lambda w: w if tok.id_of(w) is not None else "<unk>"
    assert tok.decode(splits.tokens(name)) == "".join(
        " ".join(map(known, line.split())) + "\n" for line in lines)
  assert splits.counts["train"].num_unknown == 0
  assert splits.counts["valid"].num_unknown == 1  # "zebra" is not in the train split
  assert tok.id_of("zebra") is None and tok.unk_id in splits.valid
  assert tokenizer_lib.load_tokenizer(work / "vocab.json") == tok
  # Same data, same workdir: loaded from the cache, identical.
  again = pipeline.load_wikitext2(config, work)
  np.testing.assert_array_equal(again.train, splits.train)
  assert again.counts == splits.counts


def test_tfds_dir_setting(tiny, tmp_path):
  splits = pipeline.load_wikitext2(
      _data_config(tiny, verify_counts=False, tfds_dir=tmp_path / "elsewhere"), tmp_path / "work")
  assert splits.prepared_dir.startswith(str(tmp_path / "elsewhere"))
  assert os.path.isdir(os.path.join(splits.prepared_dir, "wikitext2", "v1", "1.0.0"))
  assert not os.path.exists(tmp_path / "work" / "tfds")
  assert os.path.exists(tmp_path / "work" / "vocab.json")


def test_changed_files_are_not_served_from_a_stale_copy(tmp_path):
  data = wikitext2.write_synthetic_corpus(tmp_path / "data")
  tfds_dir = tmp_path / "tfds"
  config = _data_config(data, verify_counts=False, tfds_dir=tfds_dir)
  first = pipeline.load_wikitext2(config, tmp_path / "work1")
  # Same directory, new content (one extra line of known words).
  with open(os.path.join(data, "wiki.valid.tokens"), "a", encoding="utf-8") as f:
    f.write(" the river . \n")
  second = pipeline.load_wikitext2(config, tmp_path / "work1")
  assert second.prepared_dir != first.prepared_dir
  assert second.counts["valid"].num_lines == first.counts["valid"].num_lines + 1
  assert second.valid.size == first.valid.size + 4
  np.testing.assert_array_equal(second.train, first.train)


def test_workdir_vocab_must_match_the_data(tmp_path):
  a = wikitext2.write_synthetic_corpus(tmp_path / "a", seed=0)
  b = wikitext2.write_synthetic_corpus(tmp_path / "b", seed=1, num_train_lines=60)
  work = tmp_path / "work"
  pipeline.load_wikitext2(_data_config(a, verify_counts=False), work)
  with pytest.raises(DataError, match=r"vocab\.json does not match the vocabulary of the data.*"
                                      r"Fix: use a fresh --workdir"):
    pipeline.load_wikitext2(_data_config(b, verify_counts=False), work)
  wikitext2.write_synthetic_corpus(a, variant="raw")  # adds wiki.*.raw beside wiki.*.tokens
  with pytest.raises(DataError, match=r"holds a 'word' tokenizer but the data needs a 'bytes'"):
    pipeline.load_wikitext2(_data_config(a, variant="raw", verify_counts=False), work)


def test_malformed_workdir_vocab(tiny, tmp_path):
  work = tmp_path / "work"
  os.makedirs(work)
  (work / "vocab.json").write_text('{"format": "bdiff_jax.tokenizer", "kind": "wo', "utf-8")
  with pytest.raises(DataError, match=r"vocab\.json is not valid JSON.*Fix: delete"):
    pipeline.load_wikitext2(_data_config(tiny, verify_counts=False), work)


def test_raw_variant_bytes(tmp_path):
  src = wikitext2.write_synthetic_corpus(tmp_path / "src", variant="raw")
  splits = pipeline.load_wikitext2(_data_config(src, variant="raw", verify_counts=False),
                                   tmp_path / "work")
  tok = splits.tokenizer
  assert isinstance(tok, tokenizer_lib.ByteTokenizer)
  with open(os.path.join(src, "wiki.valid.raw"), encoding="utf-8") as f:
    text = f.read()
  assert tok.decode(splits.valid) == text  # bytes are exact: nothing is normalised
  assert splits.valid.size == len(text.encode("utf-8"))
  assert splits.counts["valid"].num_words == len(text.split())
  c = splits.counts["valid"]
  assert tok.count_words(splits.valid) == c.num_words + c.num_lines
  assert tok.count_words(tok.encode_corpus_line(" a  b ") + [65, 257, 66]) == 2 + 1 + 1
  assert splits.valid.max() == tok.eos_id == 256


# ---------------------------------------------------------------------------------------------
# Tokenizers.


def test_word_vocabulary_order_is_deterministic():
  lines = [" b a b c ", " = T = ", "", " c b <unk> "]
  tok = tokenizer_lib.WordTokenizer.from_corpus(lines)
  # <eos> first, then by count (b:3, c:2), ties alphabetically ("<unk>" < "=" < "T" < "a").
  assert tok.words == ["<eos>", "b", "=", "c", "<unk>", "T", "a"]
  assert tokenizer_lib.WordTokenizer.from_corpus(lines[::-1]) == tok
  # A corpus without <unk> still gets one.
  assert "<unk>" in tokenizer_lib.WordTokenizer.from_corpus([" x y "]).words


def test_word_encode_decode_round_trip():
  tok = tokenizer_lib.WordTokenizer.from_corpus([" the cat sat on the mat . ", " = Cats = "])
  ids = tok.encode_corpus_line(" the dog sat . ")
  assert ids == [tok.id_of("the"), tok.unk_id, tok.id_of("sat"), tok.id_of("."), tok.eos_id]
  assert tok.decode(ids) == "the <unk> sat .\n"
  line = " = Cats = "
  assert tok.decode(tok.encode_corpus_line(line)) == "= Cats =\n"
  stream = tok.encode_corpus_lines([" the cat ", "", " mat . "])
  assert stream.dtype == np.int32
  assert stream.tolist() == (tok.encode_corpus_line(" the cat ") + tok.encode_corpus_line("")
                             + tok.encode_corpus_line(" mat . "))
  assert tok.decode(stream) == "the cat\n\nmat .\n"
  prompt = tok.encode_prompt("the cat [MASK] [MASK] the mat")
  assert prompt.dtype == np.int32
  assert prompt.tolist()[2:4] == [tok.mask_id, tok.mask_id] and tok.mask_id == tok.vocab_size
  assert tok.decode(prompt) == "the cat [MASK] [MASK] the mat"
  np.testing.assert_array_equal(tok.encode_prompt(tok.decode(prompt)), prompt)
  with pytest.raises(ValueError):
    tok.decode([tok.mask_id + 1])


def test_unknown_prompt_words_raise():
  tok = tokenizer_lib.WordTokenizer.from_corpus([" the cat sat . "])
  with pytest.raises(VocabularyError) as e:
    tok.encode_prompt("the zqxj cat Cat zqxj [MASK]")
  msg = str(e.value)
  assert "2 word(s)" in msg and "'zqxj'" in msg and "'Cat'" in msg
  assert "Fix:" in msg and "<unk>" in msg
  many = " ".join(f"w{i}" for i in range(9))
  with pytest.raises(VocabularyError, match=r"'w4' and 4 more"):
    tok.encode_prompt(many)


def test_tokenizer_save_load(tmp_path):
  tok = tokenizer_lib.WordTokenizer.from_corpus([" b a b c d é ", " x "])
  path = tmp_path / "vocab.json"
  tok.save(path)
  loaded = tokenizer_lib.load_tokenizer(path)
  assert loaded == tok and loaded.words == tok.words
  assert loaded.encode_corpus_line(" é b q ") == tok.encode_corpus_line(" é b q ")
  assert tokenizer_lib.WordTokenizer.load(path) == tok
  with pytest.raises(DataError, match="not 'bytes'"):
    tokenizer_lib.ByteTokenizer.load(path)
  tokenizer_lib.ByteTokenizer().save(tmp_path / "bytes.json")
  assert tokenizer_lib.load_tokenizer(tmp_path / "bytes.json") == tokenizer_lib.ByteTokenizer()


@pytest.mark.parametrize("content,message", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "not a bdiff_jax tokenizer"),
    ('{"format": "bdiff_jax.tokenizer", "version": 1, "kind": "word"}', "no \"words\" list"),
    ('{"format": "bdiff_jax.tokenizer", "version": 1, "kind": "word", '
     '"words": ["<eos>", "<unk>", "a", "a"]}', "duplicate words"),
    ('{"format": "bdiff_jax.tokenizer", "version": 1, "kind": "word", '
     '"words": ["<eos>", "<unk>", "a b"]}', "not a single word"),
    ('{"format": "bdiff_jax.tokenizer", "version": 1, "kind": "word", '
     '"words": ["<unk>", "a"]}', "lacks '<eos>'"),
    ('{"format": "bdiff_jax.tokenizer", "version": 1, "kind": "bpe"}', "unknown kind"),
    ('{"format": "bdiff_jax.tokenizer", "version": 7, "kind": "bytes"}', "version 7"),
])
def test_malformed_tokenizer_file(tmp_path, content, message):
  path = tmp_path / "vocab.json"
  path.write_text(content, "utf-8")
  with pytest.raises(DataError, match=message):
    tokenizer_lib.load_tokenizer(path)


def test_missing_tokenizer_file(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    tokenizer_lib.load_tokenizer(tmp_path / "nope.json")


def test_byte_tokenizer_round_trip():
  tok = tokenizer_lib.ByteTokenizer()
  assert (tok.vocab_size, tok.eos_id, tok.mask_id, tok.unk_id) == (257, 256, 257, None)
  line = " Café – naïve = 1 @,@ 000 "
  ids = tok.encode_corpus_line(line)
  assert ids[-1] == 256 and len(ids) == len(line.encode("utf-8")) + 1
  assert tok.decode(ids) == line + "\n"
  stream = tok.encode_corpus_lines([line, "", "x"])
  assert stream.tolist() == ids + [256] + [ord("x"), 256]
  prompt = tok.encode_prompt("ab[MASK]é")
  assert prompt.tolist() == [97, 98, 257, 0xC3, 0xA9]
  assert tok.decode(prompt) == "ab[MASK]é"
  with pytest.raises(VocabularyError):
    tok.encode_prompt("bad \ud800 surrogate")


# ---------------------------------------------------------------------------------------------
# Batches and evaluation blocks.


def _stream(n=1000):
  return np.arange(n, dtype=np.int32)


def test_train_batches_shapes_and_epochs():
  tb = pipeline.TrainBatches(_stream(1000), seq_len=10, batch_size=8, seed=3)
  assert tb.num_blocks == 100 and tb.batches_per_epoch == 12
  epoch0 = np.concatenate([tb.batch(s) for s in range(12)])
  assert epoch0.shape == (96, 10) and epoch0.dtype == np.int32
  starts = epoch0[:, 0]
  assert len(set(starts.tolist())) == 96  # no block twice within an epoch
  assert np.all(starts % 10 == 0)
  np.testing.assert_array_equal(epoch0 - starts[:, None], np.tile(np.arange(10), (96, 1)))
  # The next epoch uses another permutation.
  assert not np.array_equal(tb.batch(12), tb.batch(0))
  assert tb.position(0) == {"epoch": 0, "batch_in_epoch": 0}
  assert tb.position(25) == {"epoch": 2, "batch_in_epoch": 1}
  np.testing.assert_array_equal(
      tb.batch(12)[:, 0] // 10,
      np.random.default_rng((3, 1)).permutation(100)[:8])


def test_train_batches_resume_equivalence():
  straight = pipeline.TrainBatches(_stream(997), seq_len=7, batch_size=5, seed=11)
  seen = [straight.batch(s) for s in range(70)]  # crosses several epochs (28 per epoch)
  resumed = pipeline.TrainBatches(_stream(997), seq_len=7, batch_size=5, seed=11)
  for s in (45, 46, 69, 3):
    np.testing.assert_array_equal(resumed.batch(s), seen[s])
  other_seed = pipeline.TrainBatches(_stream(997), seq_len=7, batch_size=5, seed=12)
  assert not np.array_equal(other_seed.batch(0), seen[0])


def test_train_batches_too_small():
  with pytest.raises(DataError, match=r"3 blocks of seq_len=10, fewer than one batch of "
                                      r"batch_size=4.*Fix: lower"):
    pipeline.TrainBatches(_stream(39), seq_len=10, batch_size=4, seed=0)


def test_eval_blocks_small():
  blocks, tail = pipeline.eval_blocks(_stream(23), 5)
  assert blocks.shape == (4, 5) and tail.tolist() == [20, 21, 22]
  blocks, tail = pipeline.eval_blocks(_stream(20), 5)
  assert blocks.shape == (4, 5) and tail is None
  blocks, tail = pipeline.eval_blocks(_stream(23), 5, max_tokens=12)
  assert blocks.reshape(-1).tolist() == list(range(10)) and tail.tolist() == [10, 11]
  blocks, tail = pipeline.eval_blocks(_stream(3), 5)
  assert blocks.shape == (0, 5) and tail.tolist() == [0, 1, 2]


def test_spread_blocks_are_evenly_spaced_whole_blocks():
  # 23 tokens in blocks of 5: 4 full blocks (0-4, 5-9, 10-14, 15-19) and a tail.
  assert pipeline.spread_blocks(_stream(23), 5, 10).tolist() == [*range(0, 5), *range(10, 15)]
  assert pipeline.spread_blocks(_stream(23), 5, 7).tolist() == list(range(5))  # 1 block
  assert pipeline.spread_blocks(_stream(23), 5, 15).tolist() == [  # floor(i * 4 / 3)
      *range(0, 5), *range(5, 10), *range(10, 15)]
  for max_tokens in (0, 20, 1000):  # the whole split, tail included
    assert pipeline.spread_blocks(_stream(23), 5, max_tokens).tolist() == list(range(23))
  # The blocks reach the end of a long split (a prefix would not).
  picked = pipeline.spread_blocks(_stream(10_000), 100, 1_000).reshape(10, 100)
  assert picked[:, 0].tolist() == list(range(0, 10_000, 1_000))
  assert (np.diff(picked, axis=1) == 1).all()


def test_synthetic_corpus_is_deterministic(tmp_path):
  a = wikitext2.write_synthetic_corpus(tmp_path / "a", seed=5)
  b = wikitext2.write_synthetic_corpus(tmp_path / "b", seed=5)
  for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
    with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
      assert fa.read() == fb.read()
  assert json.dumps(wikitext2.validate_source_dir(a, verify_counts=False).fingerprint) == \
      json.dumps(wikitext2.validate_source_dir(b, verify_counts=False).fingerprint)
