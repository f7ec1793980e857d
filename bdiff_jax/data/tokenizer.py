"""Tokenizers for WikiText-2: word-level for the `v1` files, byte-level for the `raw` files.

Both tokenizers share one id layout:

  * ids `0 .. vocab_size - 1` are real tokens (what the model's output layer predicts),
    `eos_id` among them;
  * `mask_id == vocab_size` is the dedicated [MASK] id of masked diffusion. It is no word, never
    occurs in the data and is never a prediction target. Embedding tables need
    `num_input_ids == vocab_size + 1` rows.

There is no padding id: training blocks are cut from one token stream and evaluation never pads.

A tokenizer is saved as JSON (`{"format": ..., "kind": ..., "words": [...]}`) so that another
process maps every word to the same id; `load_tokenizer` checks the file and raises `DataError`
when it is malformed.
"""

import abc
import collections
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from bdiff_jax.errors import DataError, VocabularyError

EOS = "<eos>"
UNK = "<unk>"
MASK = "[MASK]"
FILE_FORMAT = "bdiff_jax.tokenizer"
FILE_VERSION = 1
# How many unknown words a VocabularyError lists before summarising the rest.
_MAX_LISTED_UNKNOWN = 5


class Tokenizer(abc.ABC):
  """The interface shared by `WordTokenizer` and `ByteTokenizer`."""

  kind: str = ""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of real token ids (0 .. vocab_size - 1); the size of the output layer."""

  @property
  def mask_id(self) -> int:
    """The [MASK] id, `vocab_size`: outside the real tokens, never in the data."""
    return self.vocab_size

  @property
  def num_input_ids(self) -> int:
    """Ids a model may receive as input (real tokens plus [MASK]): rows of an embedding table."""
    return self.vocab_size + 1

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    """The end-of-line token appended to every line of the corpus."""

  @property
  @abc.abstractmethod
  def unk_id(self) -> int | None:
    """The id of `<unk>`, or None when every input can be encoded (bytes)."""

  @abc.abstractmethod
  def encode_corpus_line(self, line: str) -> list[int]:
    """Encodes one line of the corpus (without its newline) and appends `eos_id`."""

  def encode_corpus_lines(self, lines: Iterable[str]) -> np.ndarray:
    """Encodes lines one after the other (each followed by `eos_id`) as one int32 array."""
    ids: list[int] = []
    for line in lines:
      ids.extend(self.encode_corpus_line(line))
    return np.asarray(ids, dtype=np.int32)

  @abc.abstractmethod
  def encode_prompt(self, text: str) -> np.ndarray:
    """Encodes user text; the literal `[MASK]` becomes `mask_id`. Unknown words raise."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Renders ids as text: `<eos>` as a newline, `mask_id` as `[MASK]`."""

  def count_words(self, ids: Sequence[int] | np.ndarray) -> int:
    """WikiText words in `ids`: whitespace-separated words plus one per `<eos>`.

    The denominator of word-level perplexity (a [MASK] counts as one word).
    """
    ids = np.asarray(ids).reshape(-1)
    return len(self.decode(ids).split()) + int((ids == self.eos_id).sum())

  @abc.abstractmethod
  def to_json(self) -> dict[str, Any]:
    """The JSON-serialisable description written by `save`."""

  def save(self, path: str | os.PathLike) -> None:
    """Writes the tokenizer as JSON (atomically: a reader never sees a half-written file)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.to_json(), f, ensure_ascii=False)
      f.write("\n")
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    """Loads a tokenizer written by `save`; on a subclass, also checks that the kind matches."""
    tokenizer = load_tokenizer(path)
    if not isinstance(tokenizer, cls):
      raise DataError(f"{os.fspath(path)} holds a {tokenizer.kind!r} tokenizer, not {cls.kind!r}.",
                      "load it with load_tokenizer() or delete the file so it is rebuilt.")
    return tokenizer

  def _check_ids(self, ids: Sequence[int] | np.ndarray) -> list[int]:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    bad = [i for i in ids if not 0 <= i <= self.mask_id]
    if bad:
      raise ValueError(f"ids {bad[:_MAX_LISTED_UNKNOWN]} are outside 0..{self.mask_id} "
                       f"(vocab_size {self.vocab_size} plus [MASK]).")
    return ids


class WordTokenizer(Tokenizer):
  """Whitespace-separated words of the WikiText-2 `.tokens` files.

  The vocabulary is the set of words of the train split plus `<eos>` (and `<unk>`, which is a word
  of WikiText-2's corpus; it is only added when a corpus lacks it). Order: `<eos>` first, then by
  descending train frequency, ties alphabetically, so the ids do not depend on article order.
  """

  kind = "word"

  def __init__(self, words: Sequence[str]):
    """Creates a tokenizer whose id `i` is `words[i]`.

    Args:
      words: distinct words without whitespace, containing `<eos>` and `<unk>` and not `[MASK]`.

    Raises:
      ValueError: if `words` violates those rules (`load_tokenizer` reports them as DataError).
    """
    words = list(words)
    problem = _word_list_problem(words)
    if problem:
      raise ValueError(problem)
    self._words = words
    self._ids = {w: i for i, w in enumerate(words)}
    self._eos_id = self._ids[EOS]
    self._unk_id = self._ids[UNK]

  @classmethod
  def from_corpus(cls, lines: Iterable[str]) -> "WordTokenizer":
    """Builds the vocabulary from the lines of a training corpus."""
    counts = collections.Counter(" ".join(lines).split())
    counts.pop(EOS, None)  # <eos> gets the first id whether or not the text spells it out.
    if MASK in counts:
      raise DataError(f"The training corpus contains the word {MASK!r}, which is reserved for "
                      "infill holes.", f"replace {MASK!r} in the corpus, e.g. with {UNK!r}.")
    if UNK not in counts:
      counts[UNK] = 0
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return cls([EOS] + [w for w, _ in ordered])

  @property
  def words(self) -> list[str]:
    """The vocabulary: `words[i]` is the word of id `i`."""
    return list(self._words)

  @property
  def vocab_size(self) -> int:
    return len(self._words)

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def unk_id(self) -> int:
    return self._unk_id

  def id_of(self, word: str) -> int | None:
    """The id of `word`, or None when it is not in the vocabulary."""
    return self._ids.get(word)

  def encode_corpus_line(self, line: str) -> list[int]:
    get, unk = self._ids.get, self._unk_id
    ids = [get(w, unk) for w in line.split()]
    ids.append(self._eos_id)
    return ids

  def encode_corpus_lines(self, lines: Iterable[str]) -> np.ndarray:
    # One split of the joined text, with <eos> words between lines (faster than line by line).
    lines = list(lines)
    if not lines:
      return np.zeros(0, dtype=np.int32)
    words = f" {EOS} ".join(lines).split()
    words.append(EOS)
    get, unk = self._ids.get, self._unk_id
    return np.fromiter((get(w, unk) for w in words), dtype=np.int32, count=len(words))

  def count_words(self, ids: Sequence[int] | np.ndarray) -> int:
    # Every id is a word, <eos> or [MASK].
    return int(np.asarray(ids).size)

  def count_unknown(self, lines: Iterable[str]) -> int:
    """How many words of `lines` are not in the vocabulary (and would become `<unk>`)."""
    ids = self._ids
    return sum(1 for w in " ".join(lines).split() if w not in ids)

  def encode_prompt(self, text: str) -> np.ndarray:
    ids, unknown = [], []
    for word in text.split():
      if word == MASK:
        ids.append(self.mask_id)
      elif word in self._ids:
        ids.append(self._ids[word])
      else:
        unknown.append(word)
    if unknown:
      distinct = list(dict.fromkeys(unknown))
      listed = ", ".join(repr(w) for w in distinct[:_MAX_LISTED_UNKNOWN])
      more = len(distinct) - _MAX_LISTED_UNKNOWN
      if more > 0:
        listed += f" and {more} more"
      raise VocabularyError(
          f"The prompt has {len(distinct)} word(s) not in the {self.vocab_size}-word vocabulary: "
          f"{listed}.",
          f"use words from the vocabulary (WikiText-2 splits punctuation off as separate words); "
          f"replace the others with {UNK!r}, or use {MASK!r} for a hole to fill.")
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    out, line = [], []
    for i in self._check_ids(ids):
      if i == self._eos_id:
        out.append(" ".join(line) + "\n")
        line = []
      else:
        line.append(MASK if i == self.mask_id else self._words[i])
    out.append(" ".join(line))
    return "".join(out)

  def to_json(self) -> dict[str, Any]:
    return {"format": FILE_FORMAT, "version": FILE_VERSION, "kind": self.kind,
            "words": list(self._words)}

  def __eq__(self, other: object) -> bool:
    return isinstance(other, WordTokenizer) and self._words == other._words

  def __hash__(self) -> int:
    return hash(tuple(self._words))

  def __repr__(self) -> str:
    return f"WordTokenizer(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes of the raw files: ids 0..255 are bytes, 256 is `<eos>`, 257 is [MASK]."""

  kind = "bytes"

  @property
  def vocab_size(self) -> int:
    return 257

  @property
  def eos_id(self) -> int:
    return 256

  @property
  def unk_id(self) -> None:
    return None

  def encode_corpus_line(self, line: str) -> list[int]:
    ids = list(_utf8(line))
    ids.append(self.eos_id)
    return ids

  def encode_corpus_lines(self, lines: Iterable[str]) -> np.ndarray:
    # One pass over a joined byte string: each line's bytes followed by its newline -> <eos>.
    data = np.frombuffer(_utf8("".join(f"{line}\n" for line in lines)), dtype=np.uint8)
    ids = data.astype(np.int32)
    ids[data == ord("\n")] = self.eos_id
    return ids

  def encode_prompt(self, text: str) -> np.ndarray:
    ids: list[int] = []
    for k, part in enumerate(text.split(MASK)):
      if k:
        ids.append(self.mask_id)
      ids.extend(_utf8(part))
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    out, run = [], bytearray()
    for i in self._check_ids(ids):
      if i < 256:
        run.append(i)
        continue
      out.append(run.decode("utf-8", errors="replace"))
      run = bytearray()
      out.append("\n" if i == self.eos_id else MASK)
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)

  def to_json(self) -> dict[str, Any]:
    return {"format": FILE_FORMAT, "version": FILE_VERSION, "kind": self.kind}

  def __eq__(self, other: object) -> bool:
    return isinstance(other, ByteTokenizer)

  def __hash__(self) -> int:
    return hash(self.kind)

  def __repr__(self) -> str:
    return "ByteTokenizer()"


def tokenizer_for_variant(variant: str, train_lines: Iterable[str]) -> Tokenizer:
  """The tokenizer of a WikiText variant: words for `v1`, bytes for `raw`."""
  if variant == "v1":
    return WordTokenizer.from_corpus(train_lines)
  if variant == "raw":
    return ByteTokenizer()
  raise ValueError(f"unknown WikiText variant {variant!r}")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Reads a tokenizer written by `Tokenizer.save`.

  Raises:
    DataError: the file is missing, is not JSON, or does not describe a valid tokenizer.
  """
  path = os.fspath(path)
  fix = f"delete {path} so that it is rebuilt from the data (or restore the original file)."
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    raise DataError(f"Tokenizer file {path} does not exist.",
                    "pass the path of a vocab.json written by training.") from None
  except OSError as e:
    raise DataError(f"Tokenizer file {path} cannot be read: {e}.", fix) from None
  try:
    spec = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"Tokenizer file {path} is not valid JSON ({e}).", fix) from None
  if not isinstance(spec, dict) or spec.get("format") != FILE_FORMAT:
    raise DataError(f"Tokenizer file {path} is not a bdiff_jax tokenizer "
                    f"(expected a JSON object with \"format\": \"{FILE_FORMAT}\").", fix)
  if spec.get("version") != FILE_VERSION:
    raise DataError(f"Tokenizer file {path} has version {spec.get('version')!r}; this code reads "
                    f"version {FILE_VERSION}.", fix)
  kind = spec.get("kind")
  if kind == ByteTokenizer.kind:
    return ByteTokenizer()
  if kind == WordTokenizer.kind:
    words = spec.get("words")
    if not isinstance(words, list):
      raise DataError(f"Tokenizer file {path} has no \"words\" list.", fix)
    problem = _word_list_problem(words)
    if problem:
      raise DataError(f"Tokenizer file {path} is malformed: {problem}", fix)
    return WordTokenizer(words)
  raise DataError(f"Tokenizer file {path} has unknown kind {kind!r} (expected 'word' or 'bytes').",
                  fix)


def _word_list_problem(words: list[Any]) -> str | None:
  """Why `words` cannot be a vocabulary, or None when it can."""
  for i, w in enumerate(words):
    if not isinstance(w, str) or not w or w != w.strip() or len(w.split()) != 1:
      return f"entry {i} ({w!r}) is not a single word without whitespace."
  if len(set(words)) != len(words):
    dup = [w for w, n in collections.Counter(words).items() if n > 1]
    return f"duplicate words {dup[:_MAX_LISTED_UNKNOWN]}."
  for required in (EOS, UNK):
    if required not in words:
      return f"the vocabulary lacks {required!r}."
  if MASK in words:
    return f"the vocabulary contains {MASK!r}, which is reserved for the mask id."
  return None


def _utf8(text: str) -> bytes:
  try:
    return text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise VocabularyError(f"The text has a character that is not valid Unicode at position "
                          f"{e.start} ({text[e.start:e.end]!r}).",
                          "remove it or replace it with a valid character.") from None
