"""The GPT-2 byte-level BPE tokenizer of OPT checkpoints, run by the `tokenizers` library.

`load_bpe_tokenizer(directory)` reads a Hugging Face checkpoint directory (e.g. one made by
`hf download facebook/opt-125m --local-dir DIR`):

  * `tokenizer.json` if present (the full `tokenizers` pipeline), else
  * `vocab.json` + `merges.txt` (what the facebook/opt-* repositories ship), assembled exactly as
    HF's `GPT2Tokenizer` does: byte-level pre-tokenizer with the GPT-2 split regex and
    `add_prefix_space=False`, BPE without dropout, byte-level decoder;
  * `tokenizer_config.json` / `special_tokens_map.json` if present, for the BOS and pad tokens
    (default `</s>` and `<pad>`, OPT's) and `add_bos_token`.

`encode(text)` is what Hugging Face transformers' `AutoTokenizer.from_pretrained(directory)(text)
["input_ids"]` returns (checked against transformers 5.23 by tests/test_opt.py with the fixtures
of scripts/make_opt_fixture.py): the special tokens its loader puts around the text, then the BPE
ids of the text; no space is added in front of the text ("Hello" and " Hello" get different ids,
as in GPT-2). Which special tokens, as transformers decides:

  * vocab.json + merges.txt (GPT2Tokenizer): the BOS token iff `add_bos_token` is true in
    tokenizer_config.json; absent means false (GPT2Tokenizer's default). facebook/opt-* set it
    true with BOS `</s>` (id 2), so OPT text starts with `</s>`; no EOS is appended.
  * tokenizer.json: its own post-processor (OPT's adds the BOS); transformers ignores
    `add_bos_token` in tokenizer_config.json when a tokenizer.json is there, and so do we.

`start_ids` are the ids put before the text (`[bos_id]` for OPT, `[]` without `add_bos_token`);
`encode_text(text)` gives the text's ids alone. Special-token strings such as "</s>" inside the
text are matched as single tokens, as in HF.
"""

import json
import os
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from bdiff_jax.errors import DataError

DEFAULT_BOS = "</s>"
DEFAULT_PAD = "<pad>"
_SPECIAL = ("<s>", "<pad>", "</s>", "<unk>")


class TokenizerFilesError(DataError):
  """A checkpoint directory without usable tokenizer files."""


class BPETokenizer:
  """GPT-2 byte-level BPE with OPT's conventions (pad id for batches).

  `tokenizer`'s post-processor decides the special tokens `encode` adds around a text (see the
  module docstring); `start_ids` / `end_ids` are those before / after the text.
  """

  def __init__(self, tokenizer: Tokenizer, *, bos_token: str = DEFAULT_BOS,
               pad_token: str = DEFAULT_PAD):
    self._tok = tokenizer
    self.bos_id = self._id(bos_token, "bos_token")
    self.pad_id = self._id(pad_token, "pad_token")
    self.start_ids, self.end_ids = self._special_around()

  def _special_around(self) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a text (found on a probe text)."""
    probe = "a"
    plain = self._tok.encode(probe, add_special_tokens=False).ids
    full = self._tok.encode(probe).ids
    for i in range(len(full) - len(plain) + 1):
      if full[i:i + len(plain)] == plain:
        return full[:i], full[i + len(plain):]
    raise TokenizerFilesError("the tokenizer's post-processor changes the text's own tokens.",
                              "use the tokenizer files that came with the checkpoint.")

  @property
  def add_bos_token(self) -> bool:
    """Whether `encode` starts with the BOS token."""
    return self.start_ids[:1] == [self.bos_id]

  def _id(self, token: str, role: str) -> int:
    token_id = self._tok.token_to_id(token)
    if token_id is None:
      raise TokenizerFilesError(f"the tokenizer vocabulary has no {role} {token!r}.",
                                "use the tokenizer files that came with the checkpoint.")
    return token_id

  @property
  def vocab_size(self) -> int:
    """Number of token ids the tokenizer knows (may be below the model's padded vocab_size)."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """`start_ids + BPE(text) + end_ids`, as HF's tokenizer's `input_ids` for one text
    (OPT: `[bos_id] + BPE(text)`)."""
    return self.start_ids + self.encode_text(text) + self.end_ids

  def encode_text(self, text: str) -> list[int]:
    """The BPE ids of `text` alone, without special tokens around it."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str], *, max_length: int,
                   padding_side: str = "left") -> tuple[np.ndarray, np.ndarray]:
    """Encodes, truncates to `max_length` (keeping the start) and pads with `pad_id`.

    Returns:
      (input_ids int32 [N, max_length], attention_mask int32 [N, max_length]), mask 1 at tokens.
      Left padding (the default) is what a causal LM needs to read each row's last token at L-1.
    """
    if padding_side not in ("left", "right"):
      raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    ids = np.full((len(texts), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for row, text in enumerate(texts):
      tokens = self.encode(text)[:max_length]
      start = max_length - len(tokens) if padding_side == "left" else 0
      ids[row, start:start + len(tokens)] = tokens
      mask[row, start:start + len(tokens)] = 1
    return ids, mask

  def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _special_tokens(directory: str) -> dict[str, str | bool]:
  """BOS / pad strings (and tokenizer_config.json's `add_bos_token`), where given."""
  found = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except (OSError, ValueError) as e:
      raise TokenizerFilesError(f"{path} is not valid JSON ({e}).",
                                "re-download the tokenizer files of the checkpoint.") from e
    for key in ("bos_token", "pad_token"):
      value = data.get(key)
      if isinstance(value, dict):  # serialised AddedToken
        value = value.get("content")
      if isinstance(value, str):
        found[key] = value
    if name == "tokenizer_config.json" and "add_bos_token" in data:
      if not isinstance(data["add_bos_token"], bool):
        raise TokenizerFilesError(f"{path}: add_bos_token is {data['add_bos_token']!r}, not "
                                  "true or false.", "re-download the tokenizer files of the "
                                  "checkpoint.")
      found["add_bos_token"] = data["add_bos_token"]
  return found


def load_bpe_tokenizer(directory: str | os.PathLike) -> BPETokenizer:
  """The tokenizer of a HF OPT checkpoint directory (see the module docstring for the files).

  Raises:
    TokenizerFilesError: neither tokenizer.json nor vocab.json + merges.txt is there, a file is
      malformed, or the BOS / pad token is not in the vocabulary.
  """
  directory = os.fspath(directory)
  tokenizer_json = os.path.join(directory, "tokenizer.json")
  vocab = os.path.join(directory, "vocab.json")
  merges = os.path.join(directory, "merges.txt")
  special = _special_tokens(directory)
  bos = special.get("bos_token", DEFAULT_BOS)
  try:
    if os.path.isfile(tokenizer_json):
      tok = Tokenizer.from_file(tokenizer_json)  # its post-processor decides the BOS
    elif os.path.isfile(vocab) and os.path.isfile(merges):
      tok = Tokenizer(models.BPE.from_file(vocab, merges, dropout=None, continuing_subword_prefix="",
                                           end_of_word_suffix="", fuse_unk=False))
      tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
      tok.decoder = decoders.ByteLevel()
      tok.add_special_tokens([t for t in _SPECIAL if tok.token_to_id(t) is not None])
      if special.get("add_bos_token", False) and tok.token_to_id(bos) is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tok.token_to_id(bos))])
    else:
      raise TokenizerFilesError(
          f"{directory} has no tokenizer.json and no vocab.json + merges.txt.",
          "download the full checkpoint, e.g. `hf download facebook/opt-125m "
          f"--local-dir {directory}`.")
  except TokenizerFilesError:
    raise
  except Exception as e:  # the tokenizers library raises plain Exceptions on malformed files
    raise TokenizerFilesError(f"cannot read the tokenizer files in {directory}: {e}",
                              "re-download the tokenizer files of the checkpoint.") from e
  return BPETokenizer(tok, bos_token=bos, pad_token=special.get("pad_token", DEFAULT_PAD))
