"""WikiText-2 as token arrays, training batches and evaluation blocks.

`load_wikitext2` validates the source files, prepares the TFDS dataset (once), reads it back with
`as_data_source`, builds the tokenizer from the train split and encodes every split into one
int32 stream: each line's tokens followed by `<eos>`, lines in file order. The encoded arrays are
cached beside the prepared dataset, so later calls (in any process, for any workdir) only re-check
the source files and load the arrays.

Where things go (`resolve_tfds_dir`): `config.data.tfds_dir` when set, else one cache shared by
every workdir: `$BDIFF_CACHE_DIR`, else `$XDG_CACHE_HOME/bdiff_jax`, else `~/.cache/bdiff_jax`.
Under it, each source gets its own root: `src-<content digest>` for a `data_dir` (so pointing
`data_dir` at different files never reuses a stale copy), `download-<variant>` for the official
archive. A root holds TFDS's `wikitext2/<variant>/1.0.0/` and our `encoded/<variant>/` cache.

Concurrency: a root is built complete in a private temporary directory beside it
(`.tmp-<root>-<pid>-<random>`) and published with one rename. Processes preparing the same data
at once all succeed: the first rename wins and the others use its result. Everything is created
with the process umask (typically 0755 directories, 0644 files), so a cache can be shared by a
team (use umask 002 and a group-writable --config.data.tfds_dir for shared writing).
"""

import dataclasses
import json
import logging
import errno
import os
import secrets
import shutil
import time
from typing import Any, Mapping

import numpy as np

from bdiff_jax.data import tokenizer as tokenizer_lib
from bdiff_jax.data import wikitext2
from bdiff_jax.errors import ConfigError, DataError, UserError
from bdiff_jax.runtime.workdir import find_os_error, os_error_to_user_error

# Our split names (Splits fields) -> TFDS split names.
SPLIT_NAMES = {"train": "train", "valid": "validation", "test": "test"}
VOCAB_FILE = "vocab.json"
_CACHE_VERSION = 1
CACHE_ENV = "BDIFF_CACHE_DIR"


@dataclasses.dataclass(frozen=True)
class SplitCounts:
  """Sizes of one split.

  Attributes:
    num_lines: lines of the file (each contributes one `<eos>`).
    num_words: whitespace-separated words, not counting line ends.
    num_tokens: length of the token array. For v1, `num_words + num_lines`: the denominator of
      WikiText's word-level perplexity. For raw, UTF-8 bytes plus one `<eos>` per line.
    num_unknown: words not in the train vocabulary, encoded as `<unk>` (v1 valid/test; 0 for
      WikiText-2, whose rare words are already `<unk>` in the files).
  """
  num_lines: int
  num_words: int
  num_tokens: int
  num_unknown: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
  """Encoded WikiText-2: read-only int32 token streams of the three splits and their sizes."""
  tokenizer: tokenizer_lib.Tokenizer
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray
  counts: Mapping[str, SplitCounts]  # keys "train", "valid", "test"
  variant: str
  prepared_dir: str  # the TFDS data_dir of this source

  def tokens(self, split: str) -> np.ndarray:
    """The token array of "train", "valid" or "test"."""
    if split not in SPLIT_NAMES:
      raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_NAMES)}")
    return getattr(self, split)


def default_cache_dir() -> str:
  """`$BDIFF_CACHE_DIR`, else `$XDG_CACHE_HOME/bdiff_jax`, else `~/.cache/bdiff_jax`."""
  if os.environ.get(CACHE_ENV):
    return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.abspath(os.path.join(base, "bdiff_jax"))


def resolve_tfds_dir(data_config: Any, workdir: str | os.PathLike | None = None) -> str:
  """`data_config.tfds_dir`, or the shared `default_cache_dir()` when that is empty.

  `workdir` is accepted for compatibility and not used: prepared data no longer lives in a
  workdir, so new workdirs reuse it.
  """
  del workdir
  tfds_dir = _get(data_config, "tfds_dir", "")
  if tfds_dir:
    return os.path.abspath(os.path.expanduser(os.fspath(tfds_dir)))
  return default_cache_dir()


def load_wikitext2(data_config: Any, workdir: str | os.PathLike | None) -> Splits:
  """Loads WikiText-2 as token arrays, preparing and caching it on first use.

  Args:
    data_config: the fields variant, data_dir, tfds_dir and verify_counts of `config.data`, as
      a dict (`config.data.to_dict()`) or anything with those attributes.
    workdir: the run's directory. The tokenizer is saved there as `vocab.json`; an existing
      `vocab.json` must match the data's vocabulary. None: no vocab.json.

  Returns:
    The tokenizer, the three token arrays and their counts.

  Raises:
    DataError: missing/truncated/malformed data, a failed download, or a workdir vocab.json that
      does not match the data.
    StorageError / DiskFullError: the data must be prepared and the cache cannot be written.
  """
  start = time.perf_counter()
  variant = _get(data_config, "variant", "v1")
  wikitext2.check_variant(variant)
  verify_counts = bool(_get(data_config, "verify_counts", True))
  data_dir = os.fspath(_get(data_config, "data_dir", "") or "")
  tfds_dir = resolve_tfds_dir(data_config)

  if data_dir:
    # Fails fast, before any TFDS work, on a bad file; the digest keys the prepared copy.
    fingerprint = wikitext2.validate_source_dir(data_dir, variant, verify_counts).fingerprint
    root = os.path.join(tfds_dir, f"src-{fingerprint[:16]}")
  else:
    fingerprint = None
    root = os.path.join(tfds_dir, f"download-{variant}")

  cached = _read_cache(_cache_dir(root, variant), fingerprint)
  how = "loaded from cache"
  if cached is None:
    print(f"preparing WikiText-2 ({variant}) from {data_dir or 'the official archive'} (once; "
          f"cached in {root})", flush=True)
    cached = _prepare_root(variant, data_dir, root, verify_counts, fingerprint)
    how = "prepared"
  tok, arrays, counts, _ = cached
  if workdir:
    _reconcile_vocab(tok, os.path.join(os.fspath(workdir), VOCAB_FILE))
  for a in arrays.values():
    a.flags.writeable = False
  logging.info("WikiText-2 %s %s in %.2fs (%s): %s", variant, how, time.perf_counter() - start,
               root, {k: dataclasses.asdict(v) for k, v in counts.items()})
  return Splits(tokenizer=tok, train=arrays["train"], valid=arrays["valid"], test=arrays["test"],
                counts=counts, variant=variant, prepared_dir=root)


def _cache_dir(root: str, variant: str) -> str:
  return os.path.join(root, "encoded", variant)


def _make_private_dir(parent: str, prefix: str) -> str:
  """A new directory `<parent>/<prefix><pid>-<random>`, created with the umask's permissions
  (unlike `tempfile.mkdtemp`, which makes it 0700 and so unreadable to a team sharing a cache)."""
  os.makedirs(parent, exist_ok=True)
  while True:
    path = os.path.join(parent, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")
    try:
      os.mkdir(path)
      return path
    except FileExistsError:
      continue


def _prepare_root(variant: str, data_dir: str, root: str, verify_counts: bool,
                  fingerprint: str | None):
  """Builds a complete root in a private directory and publishes it with one rename.

  Returns the (tokenizer, arrays, counts, fingerprint) of the published root: ours, or that of a
  process that published the same data first.
  """
  parent, name = os.path.split(root)
  fix = (f"make {parent} writable, or point --config.data.tfds_dir (or ${CACHE_ENV}) at a "
         "writable directory.")
  try:
    tmp = _make_private_dir(parent, f".tmp-{name}-")
  except OSError as e:
    raise os_error_to_user_error(e, f"preparing WikiText-2 in {parent}", fix=fix) from None
  stale = None
  try:
    try:
      built = _prepare(variant, data_dir, tmp, verify_counts, fingerprint)
      _write_cache(_cache_dir(tmp, variant), *built)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      os_error = find_os_error(e)  # TFDS / array_record report a full disk in various types
      if os_error is None:
        raise
      raise os_error_to_user_error(os_error, f"preparing WikiText-2 in {parent}",
                                   fix=fix) from None
    if os.path.isdir(root):
      theirs = _read_cache(_cache_dir(root, variant), fingerprint)
      if theirs is not None:  # another process published the same data while we built it
        return theirs
      # A root whose cache is unusable (e.g. an older cache format): move it aside first.
      stale = _make_private_dir(parent, f".stale-{name}-")
      try:
        os.rename(root, os.path.join(stale, name))
      except OSError:
        pass  # another process moved or replaced it; the rename below settles who wins
    try:
      os.rename(tmp, root)
      return built
    except OSError as e:
      if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EACCES, errno.EPERM):
        raise os_error_to_user_error(e, f"publishing {root}", fix=fix) from None
    theirs = _read_cache(_cache_dir(root, variant), fingerprint)  # another process won
    if theirs is None:
      logging.warning("Could not publish the prepared data to %s; using it without caching.",
                      root)
      return built
    return theirs
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    if stale:
      shutil.rmtree(stale, ignore_errors=True)


def _get(config: Any, key: str, default: Any) -> Any:
  if isinstance(config, Mapping):
    return config.get(key, default)
  return getattr(config, key, default)


def _prepare(variant: str, data_dir: str, root: str, verify_counts: bool,
             fingerprint: str | None):
  """Builds (or reuses) the TFDS dataset, reads it back and encodes it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = wikitext2.Wikitext2(config=variant, data_dir=root, file_format="array_record",
                                verify_counts=verify_counts)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=data_dir or None))
  prepared_from = builder.info.metadata.get("source_fingerprint")
  if fingerprint is not None and prepared_from != fingerprint:
    raise DataError(f"The prepared dataset in {builder.data_dir} was built from other files than "
                    f"those in {data_dir}.", f"delete {builder.data_dir} so that it is rebuilt.")
  sources = builder.as_data_source()
  lines = {ours: wikitext2.read_split_lines(sources[theirs])
           for ours, theirs in SPLIT_NAMES.items()}
  tok = tokenizer_lib.tokenizer_for_variant(variant, lines["train"])
  arrays, counts = {}, {}
  for split, split_lines in lines.items():
    arrays[split] = tok.encode_corpus_lines(split_lines)
    unknown = 0
    if isinstance(tok, tokenizer_lib.WordTokenizer):
      # Every line contributes its words and one <eos>.
      num_words = arrays[split].size - len(split_lines)
      if split != "train":
        unknown = tok.count_unknown(split_lines)
    else:
      num_words = len(" ".join(split_lines).split())
    counts[split] = SplitCounts(num_lines=len(split_lines), num_words=num_words,
                                num_tokens=int(arrays[split].size), num_unknown=unknown)
  return tok, arrays, counts, prepared_from


def _write_cache(cache_dir: str, tok, arrays, counts, fingerprint) -> None:
  """Writes the encoded splits into `cache_dir` (inside a private root, published later)."""
  os.makedirs(cache_dir, exist_ok=True)
  tok.save(os.path.join(cache_dir, "tokenizer.json"))
  for split, a in arrays.items():
    np.save(os.path.join(cache_dir, f"{split}.npy"), a)
  meta = {"cache_version": _CACHE_VERSION, "fingerprint": fingerprint,
          "counts": {k: dataclasses.asdict(v) for k, v in counts.items()}}
  with open(os.path.join(cache_dir, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f)


def _read_cache(cache_dir: str, fingerprint: str | None):
  """The cached (tokenizer, arrays, counts, fingerprint), or None when absent or unusable."""
  try:
    with open(os.path.join(cache_dir, "meta.json"), encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("cache_version") != _CACHE_VERSION:
      return None
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
      return None
    counts = {k: SplitCounts(**meta["counts"][k]) for k in SPLIT_NAMES}
    tok = tokenizer_lib.load_tokenizer(os.path.join(cache_dir, "tokenizer.json"))
    arrays = {}
    for split in SPLIT_NAMES:
      a = np.load(os.path.join(cache_dir, f"{split}.npy"), allow_pickle=False)
      if a.dtype != np.int32 or a.ndim != 1 or a.size != counts[split].num_tokens:
        return None
      arrays[split] = a
  except (OSError, ValueError, KeyError, TypeError, DataError) as e:
    if os.path.exists(cache_dir):
      logging.warning("Ignoring unreadable cache %s (%s); re-encoding.", cache_dir, e)
    return None
  return tok, arrays, counts, meta.get("fingerprint")


def _reconcile_vocab(tok: tokenizer_lib.Tokenizer, path: str) -> None:
  """Saves the tokenizer to `path`, or checks that the one already there is the same."""
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tok.save(path)
    return
  saved = tokenizer_lib.load_tokenizer(path)
  if saved == tok:
    return
  fix = ("use a fresh --workdir for this data, or point config.data.data_dir / BDIFF_DATA_DIR "
         "(and config.data.variant) back at the data this workdir was trained on.")
  if saved.kind != tok.kind:
    raise DataError(f"{path} holds a {saved.kind!r} tokenizer but the data needs a {tok.kind!r} "
                    "tokenizer.", fix)
  old, new = saved.words, tok.words
  if len(old) != len(new):
    detail = f"{len(old):,} words vs {len(new):,} in the data"
  else:
    i = next(k for k, (a, b) in enumerate(zip(old, new)) if a != b)
    detail = f"id {i} is {old[i]!r} there but {new[i]!r} in the data"
  raise DataError(f"{path} does not match the vocabulary of the data ({detail}).", fix)


class TrainBatches:
  """Shuffled blocks of the training stream, as a pure function of the step.

  The stream is cut into `num_blocks` non-overlapping blocks of `seq_len` tokens (the remainder
  is dropped; nothing is padded). Epoch `e` visits the blocks in the order
  `np.random.default_rng((seed, e)).permutation(num_blocks)`, `batch_size` at a time, dropping the
  last partial batch. `batch(step)` depends only on (tokens, seq_len, batch_size, seed, step), so a
  run resumed at step s sees exactly the batches of an uninterrupted run.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
      raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if seq_len <= 0 or batch_size <= 0:
      raise ConfigError(f"seq_len={seq_len} and batch_size={batch_size} must both be > 0.",
                        "pass positive --config.data.seq_len and --config.train.batch_size.")
    if int(seed) < 0:
      raise ConfigError(f"seed={seed} must be >= 0.", "pass --config.seed=<a value >= 0>.")
    self.seq_len = int(seq_len)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.num_blocks = tokens.size // self.seq_len
    if self.num_blocks < self.batch_size:
      raise DataError(
          f"The training split has {tokens.size:,} tokens: {self.num_blocks:,} blocks of "
          f"seq_len={self.seq_len}, fewer than one batch of batch_size={self.batch_size}.",
          "lower --config.train.batch_size or --config.data.seq_len, or use a larger corpus.")
    self._blocks = np.asarray(tokens[:self.num_blocks * self.seq_len], dtype=np.int32).reshape(
        self.num_blocks, self.seq_len)
    self.batches_per_epoch = self.num_blocks // self.batch_size
    self._epoch = -1
    self._order = np.empty(0, dtype=np.int64)

  def _check_step(self, step: int) -> int:
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    return step

  def permutation(self, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the blocks."""
    if epoch != self._epoch:
      self._order = np.random.default_rng((self.seed, int(epoch))).permutation(self.num_blocks)
      self._epoch = int(epoch)
    return self._order

  def position(self, step: int) -> dict[str, int]:
    """Where `step` lies: {"epoch": ..., "batch_in_epoch": ...} (for checkpoints)."""
    epoch, index = divmod(self._check_step(step), self.batches_per_epoch)
    return {"epoch": epoch, "batch_in_epoch": index}

  def batch(self, step: int) -> np.ndarray:
    """The int32[batch_size, seq_len] batch of training step `step` (0-based)."""
    epoch, index = divmod(self._check_step(step), self.batches_per_epoch)
    rows = self.permutation(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
    return self._blocks[rows]

  def rows(self, step: int, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of `batch(step)`, reading only those blocks (a process's slice)."""
    epoch, index = divmod(self._check_step(step), self.batches_per_epoch)
    first = index * self.batch_size
    return self._blocks[self.permutation(epoch)[first + start:first + min(stop, self.batch_size)]]

  def __call__(self, step: int) -> np.ndarray:
    return self.batch(step)


def eval_blocks(tokens: np.ndarray, seq_len: int,
                max_tokens: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
  """Splits a token stream for evaluation so that every token is scored exactly once.

  Args:
    tokens: a 1-D token array (e.g. `Splits.valid`).
    seq_len: block length.
    max_tokens: use only the first `max_tokens` tokens; 0 means all.

  Returns:
    `(blocks, tail)`: int32[N, seq_len] full blocks in stream order, and the final partial block
    int32[r] (0 < r < seq_len), or None when the length is a multiple of seq_len. Nothing is padded.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
  if seq_len <= 0:
    raise ConfigError(f"seq_len={seq_len} must be > 0.", "pass --config.data.seq_len=<n > 0>.")
  if max_tokens < 0:
    raise ConfigError(f"max_tokens={max_tokens} must be >= 0 (0 = the whole split).",
                      "pass --config.eval.max_tokens=<n >= 0>.")
  if max_tokens:
    tokens = tokens[:max_tokens]
  tokens = tokens.astype(np.int32, copy=False)
  n = tokens.size // seq_len
  blocks = tokens[:n * seq_len].reshape(n, seq_len)
  tail = tokens[n * seq_len:] if tokens.size % seq_len else None
  return blocks, tail


def spread_blocks(tokens: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
  """About `max_tokens` tokens of a split for a quick evaluation, spread over the whole split.

  K = max(1, max_tokens // seq_len) of the split's full blocks (the blocks `eval_blocks` cuts)
  at evenly spaced block indices floor(i * N / K), i < K, concatenated in stream order: the same
  blocks the full evaluation scores, so a block-aligned 1-D stream. A prefix of the split would
  be cheaper to pick but is not representative: on WikiText-2's validation split the first
  8,192 tokens gave a bound of 296 where the whole split gave 422 (the same parameters). With
  `max_tokens` 0, or at least as many blocks as the split has, the whole split is returned.
  """
  blocks, _ = eval_blocks(tokens, seq_len)
  k = max(1, int(max_tokens) // seq_len)
  if not max_tokens or k >= blocks.shape[0]:
    return np.asarray(tokens).astype(np.int32, copy=False)
  index = (np.arange(k) * blocks.shape[0]) // k
  return blocks[index].reshape(-1)
