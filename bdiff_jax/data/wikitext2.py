"""WikiText-2 as a TFDS dataset (array_record files, read back with `as_data_source`).

One example per line of `wiki.{train,valid,test}.tokens` (config `v1`, the default) or
`wiki.{train,valid,test}.raw` (config `raw`): `{"text": the line without its newline,
"line": its 0-based index}`, in file order (`disable_shuffling=True`). Neither building nor reading
imports TensorFlow.

The source is either a directory holding the three files (passed as the TFDS manual dir; the
network is then never touched) or the official archive, downloaded from the first reachable
mirror. Either way the files are checked by `validate_source_dir` first: present, non-empty, UTF-8,
newline-terminated and (v1, `verify_counts`) of WikiText-2's published sizes, so a truncated or
foreign file fails with one line that says which file and how to fix it.
"""

import dataclasses
import hashlib
import inspect
import logging
import os
import random
import re
import socket
import urllib.parse
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from bdiff_jax.errors import ConfigError, DataError

VARIANTS = ("v1", "raw")
# TFDS split name -> the split's name in WikiText-2's file names.
SPLIT_FILE_STEMS = {"train": "train", "validation": "valid", "test": "test"}
SPLITS = tuple(SPLIT_FILE_STEMS)
_EXTENSIONS = {"v1": "tokens", "raw": "raw"}

# Whitespace-separated words per split of the word-level files (Merity et al. 2016). The number of
# lines is only fixed for validation and test: copies of the train split differ in blank lines.
PUBLISHED_WORDS = {"train": 2_051_910, "validation": 213_886, "test": 241_211}
PUBLISHED_LINES = {"validation": 3_760, "test": 4_358}

# Official archives, tried in order: the original S3 location, then its successor.
DOWNLOAD_URLS = {
    "v1": (
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
        "https://wikitext.smerity.com/wikitext-2-v1.zip",
    ),
    "raw": (
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip",
        "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
    ),
}


# Some copies of the word-level files spell WikiText's quote word `"` as `""` (the escaping of a
# CSV export). Where a file has `""` words and no `"` word, its `""` words are read as `"`: the
# vocabulary then has the canonical `"`, which the other splits use.
QUOTE = '"'
DOUBLED_QUOTE = '""'
_DOUBLED_QUOTE_WORD = re.compile(r'(?<!\S)""(?!\S)')

# validate_file results by (path, size, mtime_ns, split, variant, verify_counts).
_checked: dict[tuple[Any, ...], "SourceFile"] = {}


def file_name(split: str, variant: str = "v1") -> str:
  """The WikiText file of a TFDS split name ('train', 'validation', 'test')."""
  return f"wiki.{SPLIT_FILE_STEMS[split]}.{_EXTENSIONS[variant]}"


def _file_list(variant: str) -> str:
  names = [file_name(s, variant) for s in SPLITS]
  return f"{', '.join(names[:-1])} and {names[-1]}"


def _location_fix(variant: str) -> str:
  archive = os.path.basename(DOWNLOAD_URLS[variant][0])
  return (f"re-download WikiText-2 ({archive}) and point --config.data.data_dir (or "
          f"BDIFF_DATA_DIR) at a complete copy holding {_file_list(variant)}.")


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One checked WikiText file."""
  split: str
  path: str
  num_lines: int
  num_words: int
  sha256: str
  # The quote word is spelled `""` throughout (CSV-style escaping) and `"` never occurs.
  doubled_quotes: bool = False


@dataclasses.dataclass(frozen=True)
class SourceFiles:
  """The three checked files of one variant."""
  directory: str
  variant: str
  files: Mapping[str, SourceFile]

  @property
  def fingerprint(self) -> str:
    """A digest of the variant and the files' contents (not their paths or times)."""
    h = hashlib.sha256(f"wikitext2/{self.variant}".encode())
    for split in SPLITS:
      h.update(f"/{split}:{self.files[split].sha256}".encode())
    return h.hexdigest()


def check_variant(variant: str) -> None:
  """Raises ConfigError unless `variant` is 'v1' or 'raw'."""
  if variant not in VARIANTS:
    raise ConfigError(f"config.data.variant={variant!r} is not one of {VARIANTS}.",
                      "pass --config.data.variant=v1 or raw.")


def validate_file(path: str, split: str, variant: str = "v1",
                  verify_counts: bool = True) -> SourceFile:
  """Checks one WikiText file and returns its statistics.

  Results are remembered per (path, size, modification time) within the process, so checking the
  same unchanged file again is free.

  Raises:
    DataError: naming the file, what is wrong with it, and the fix.
  """
  fix = _location_fix(variant)
  if not os.path.isfile(path):
    what = "is not a file" if os.path.exists(path) else "is missing"
    raise DataError(f"WikiText-2 file {path} {what} (a data directory holds "
                    f"{_file_list(variant)}).", fix)
  st = os.stat(path)
  key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, split, variant, verify_counts)
  if key in _checked:
    return _checked[key]
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataError(f"WikiText-2 file {path} cannot be read: {e.strerror}.", fix) from None
  if not data:
    raise DataError(f"WikiText-2 file {path} is empty.", fix)
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"WikiText-2 file {path} is not valid UTF-8 (byte {e.start}, line {line}: "
                    f"{e.reason}).", fix) from None
  if not text.endswith("\n"):
    tail = text[text.rfind("\n") + 1:][-40:]
    raise DataError(f"WikiText-2 file {path} does not end with a newline: it is truncated (cut "
                    f"mid-line, last line ends with {tail!r}).", fix)
  num_lines = text.count("\n")
  words = text.split()
  if verify_counts and variant == "v1":
    expected = PUBLISHED_WORDS[split]
    count_fix = fix + " For a corpus other than WikiText-2 pass --config.data.verify_counts=false."
    if len(words) != expected:
      raise DataError(f"WikiText-2 file {path} has {len(words):,} words, expected {expected:,} "
                      f"for the {split} split: the file is incomplete or not WikiText-2.",
                      count_fix)
    expected = PUBLISHED_LINES.get(split)
    if expected is not None and num_lines != expected:
      raise DataError(f"WikiText-2 file {path} has {num_lines:,} lines, expected {expected:,} for "
                      f"the {split} split: lines were added or removed.", count_fix)
  doubled = (variant == "v1" and DOUBLED_QUOTE in text and DOUBLED_QUOTE in words
             and QUOTE not in words)
  stats = SourceFile(split=split, path=path, num_lines=num_lines, num_words=len(words),
                     sha256=hashlib.sha256(data).hexdigest(), doubled_quotes=doubled)
  _checked[key] = stats
  return stats


def validate_source_dir(directory: str | os.PathLike, variant: str = "v1",
                        verify_counts: bool = True) -> SourceFiles:
  """Checks a directory holding WikiText-2's three files, before any TFDS work.

  Args:
    directory: holds `wiki.{train,valid,test}.tokens` (v1) or `.raw` (raw).
    variant: "v1" or "raw".
    verify_counts: for v1, require WikiText-2's published word counts (and line counts of
      validation/test); turn off for other corpora.

  Returns:
    The files' statistics and content fingerprint.

  Raises:
    DataError: for a missing directory or a missing, empty, non-UTF-8, truncated or (with
      verify_counts) incomplete file.
  """
  check_variant(variant)
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    what = "is not a directory" if os.path.exists(directory) else "does not exist"
    raise DataError(f"WikiText-2 data directory {directory!r} {what}.", _location_fix(variant))
  files = {}
  for split in SPLITS:
    files[split] = validate_file(os.path.join(directory, file_name(split, variant)), split,
                                    variant, verify_counts)
  return SourceFiles(directory=directory, variant=variant, files=files)


def locate_source_dir(root: str | os.PathLike, variant: str = "v1") -> str:
  """The directory under `root` (itself or one level down) holding the train file.

  The official archives extract to `wikitext-2/` or `wikitext-2-raw/`.
  """
  root = os.fspath(root)
  name = file_name("train", variant)
  if os.path.isfile(os.path.join(root, name)):
    return root
  if os.path.isdir(root):
    for entry in sorted(os.listdir(root)):
      if os.path.isfile(os.path.join(root, entry, name)):
        return os.path.join(root, entry)
  raise DataError(f"The downloaded WikiText-2 archive at {root} holds no {name}.",
                  _location_fix(variant))


def read_lines(source: SourceFile) -> list[str]:
  """The lines of a checked file without their newlines (only '\\n' ends a line).

  With `source.doubled_quotes`, `""` words are read as `"`.
  """
  with open(source.path, "rb") as f:
    lines = f.read().decode("utf-8").split("\n")
  if lines.pop():
    raise DataError(f"WikiText-2 file {source.path} changed while it was read.",
                    "run again once nothing writes to it.")
  if source.doubled_quotes:
    lines = [_DOUBLED_QUOTE_WORD.sub(QUOTE, line) if DOUBLED_QUOTE in line else line
             for line in lines]
  return lines


class Wikitext2(tfds.core.GeneratorBasedBuilder):
  """WikiText-2 (Merity et al. 2016), one example per line, in file order."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One example per line: text and line index."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="v1", description="Word-level wiki.*.tokens files."),
      tfds.core.BuilderConfig(name="raw", description="Raw-character wiki.*.raw files."),
  ]
  DEFAULT_CONFIG_NAME = "v1"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass a directory holding wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens "
      "(config v1) or the wiki.*.raw files (config raw) as download_config.manual_dir; without "
      "one the official archive is downloaded.")

  def __init__(self, *, verify_counts: bool = True, **kwargs: Any):
    """Creates the builder.

    Args:
      verify_counts: check WikiText-2's published word counts (v1) when preparing.
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder` (data_dir, config, file_format...).
    """
    self._verify_counts = verify_counts
    self._source_dir: str | None = None
    self.source_files: SourceFiles | None = None
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> tfds.core.Path:
    """This file. (TFDS's own lookup needs the `importlib_resources` backport, not installed.)"""
    return tfds.core.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Wikipedia articles (Good and Featured) tokenised into words, one line per "
                     "example, in the order of the files."),
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "line": np.int64,
        }),
        homepage=("https://www.salesforce.com/blog/"
                  "the-wikitext-long-term-dependency-language-modeling-dataset/"),
        citation=("@article{merity2016pointer, title={Pointer Sentinel Mixture Models}, "
                  "author={Merity, Stephen and Xiong, Caiming and Bradbury, James and Socher, "
                  "Richard}, journal={arXiv preprint arXiv:1609.07843}, year={2016}}"),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _log_download_bytes(self) -> None:
    """Silenced: TFDS would print "Downloading and preparing dataset Unknown size ..." even for
    local files; `pipeline.load_wikitext2` prints its own line."""

  def _log_download_done(self) -> None:
    """Silenced (TFDS's "Dataset wikitext2 downloaded and prepared to ...")."""

  def download_and_prepare(self, *, download_dir=None, download_config=None,
                           file_format=None) -> None:
    """Like TFDS's, remembering whether a manual dir was given (then nothing is downloaded)."""
    manual = getattr(download_config, "manual_dir", None)
    self._source_dir = os.fspath(manual) if manual else None
    super().download_and_prepare(download_dir=download_dir, download_config=download_config,
                                 file_format=file_format)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    variant = self.builder_config.name
    if self._source_dir is not None:
      source = validate_source_dir(self._source_dir, variant, self._verify_counts)
    else:
      source = validate_source_dir(locate_source_dir(self._download(dl_manager), variant),
                                   variant, self._verify_counts)
    self.source_files = source
    self.info.metadata["source_fingerprint"] = source.fingerprint
    undoubled = [s for s in SPLITS if source.files[s].doubled_quotes]
    self.info.metadata["undoubled_quotes"] = undoubled
    if undoubled:
      logging.warning("WikiText-2 %s: reading the quote word spelled '\"\"' as '\"' in %s.",
                      variant, ", ".join(source.files[s].path for s in undoubled))
    return {split: self._generate_examples(source.files[split]) for split in SPLITS}

  def _download(self, dl_manager: tfds.download.DownloadManager) -> str:
    """Downloads and extracts the archive from the first mirror that answers."""
    failures = []
    for url in DOWNLOAD_URLS[self.builder_config.name]:
      # TFDS retries a failing download for minutes; an unreachable host is skipped at once.
      problem = reachability_problem(url)
      if problem:
        failures.append(f"{url}: {problem}")
        continue
      try:
        return os.fspath(dl_manager.download_and_extract(url))
      except Exception as e:  # pylint: disable=broad-except  # Any failure: try the next mirror.
        failures.append(f"{url}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise DataError(f"Could not download WikiText-2 ({'; '.join(failures)}).",
                    "when offline, set BDIFF_DATA_DIR or --config.data.data_dir to a directory "
                    f"holding {_file_list(self.builder_config.name)}.")

  def _generate_examples(self, source: SourceFile) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, line in enumerate(read_lines(source)):
      yield i, {"text": line, "line": i}


def reachability_problem(url: str, timeout: float = 10.0) -> str | None:
  """Why `url`'s host cannot be reached (DNS or TCP), or None when it can or a proxy is set."""
  if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
    return None  # The proxy resolves and connects; let the download itself try.
  parts = urllib.parse.urlsplit(url)
  host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
  try:
    socket.create_connection((host, port), timeout=timeout).close()
  except socket.gaierror as e:
    return f"cannot resolve host {host} ({e.strerror})"
  except OSError as e:
    return f"cannot connect to {host}:{port} ({e.strerror or type(e).__name__})"
  return None


def read_split_lines(data_source: Any) -> list[str]:
  """All lines of a split from `builder.as_data_source()[split]`, checked to be in order."""
  n = len(data_source)
  lines = []
  chunk = 8192
  for start in range(0, n, chunk):
    for offset, example in enumerate(data_source.__getitems__(range(start, min(n, start + chunk)))):
      if int(example["line"]) != start + offset:
        raise DataError(f"The prepared dataset is out of order (record {start + offset} holds line "
                        f"{int(example['line'])}).",
                        "delete the prepared dataset directory (config.data.tfds_dir) to rebuild.")
      text = example["text"]
      lines.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
  return lines


def write_synthetic_corpus(directory: str | os.PathLike, variant: str = "v1",
                           num_train_lines: int = 240, seed: int = 0) -> str:
  """Writes a tiny WikiText-like corpus (three files) for tests; returns the directory.

  Articles have ` = Title = ` headings, blank lines, `<unk>`, `@-@` and non-ASCII words; the
  validation file contains one word (`zebra`) that is not in the train file. The content is a pure
  function of the arguments. Use it with `verify_counts=False`.
  """
  check_variant(variant)
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  rng = random.Random(seed)
  nouns = ["river", "castle", "song", "album", "ship", "bridge", "town", "army", "king",
           "season", "film", "road", "café", "1 @,@ 000", "<unk>"]
  verbs = ["was", "became", "is", "had", "won", "built", "played", "joined", "left", "saw"]
  small = ["the", "a", "of", "in", "and", "to", "its", "first", "new", "old", "north @-@ east"]

  def sentence(extra: str = "") -> str:
    words = [rng.choice(small), rng.choice(nouns), rng.choice(verbs), rng.choice(small),
             rng.choice(nouns)]
    if extra:
      words.insert(2, extra)
    if rng.random() < 0.5:
      words += [",", rng.choice(small), rng.choice(nouns)]
    return " ".join(words) + " ."

  def article(num_lines: int, extra: str = "") -> list[str]:
    lines = [f" = The {rng.choice(nouns)} = ", " "]
    for k in range(num_lines):
      lines.append(" " + " ".join(sentence(extra if k == 0 else "")
                                  for _ in range(rng.randint(1, 3))) + " ")
      if rng.random() < 0.3:
        lines.append(" = = History = = ")
      lines.append(" ")
    return lines

  def corpus(num_lines: int, extra: str = "") -> list[str]:
    lines = []
    while len(lines) < num_lines:
      lines += article(rng.randint(3, 8), extra)
      extra = ""
    return lines[:num_lines]

  contents = {"train": corpus(num_train_lines), "validation": corpus(40, extra="zebra"),
              "test": corpus(40)}
  for split, lines in contents.items():
    with open(os.path.join(directory, file_name(split, variant)), "w", encoding="utf-8",
              newline="\n") as f:
      f.write("".join(line + "\n" for line in lines))
  return directory
