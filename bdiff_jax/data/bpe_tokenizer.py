"""The GPT-2 byte-level BPE tokenizer of OPT checkpoints, run by the `tokenizers` library.

`load_bpe_tokenizer(directory)` reads a Hugging Face checkpoint directory (e.g. one made by
`huggingface-cli download facebook/opt-125m --local-dir DIR`):

  * `tokenizer.json` if present (the full `tokenizers` pipeline), else
  * `vocab.json` + `merges.txt` (what the facebook/opt-* repositories ship), assembled exactly as
    HF's `GPT2Tokenizer` does: byte-level pre-tokenizer with the GPT-2 split regex and
    `add_prefix_space=False`, BPE without dropout, byte-level decoder;
  * `tokenizer_config.json` / `special_tokens_map.json` if present, for the BOS and pad tokens
    (default `</s>` and `<pad>`, OPT's).

`encode(text)` is what HF's OPT tokenizer returns for `tokenizer(text)["input_ids"]`: the BOS
token (`</s>`, id 2 in OPT) followed by the BPE ids of the text; no EOS is appended, and no space
is added in front of the text ("Hello" and " Hello" get different ids, as in GPT-2). The BOS is
always prepended here, whatever post-processor a `tokenizer.json` carries (the text is encoded
with `add_special_tokens=False`), so the result does not depend on which files are present.
Special-token strings such as "</s>" inside the text are matched as single tokens, as in HF.
"""

import json
import os
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from bdiff_jax.errors import DataError

DEFAULT_BOS = "</s>"
DEFAULT_PAD = "<pad>"
_SPECIAL = ("<s>", "<pad>", "</s>", "<unk>")


class TokenizerFilesError(DataError):
  """A checkpoint directory without usable tokenizer files."""


class BPETokenizer:
  """GPT-2 byte-level BPE with OPT's conventions (BOS prepended, pad id for batches)."""

  def __init__(self, tokenizer: Tokenizer, *, bos_token: str = DEFAULT_BOS,
               pad_token: str = DEFAULT_PAD):
    self._tok = tokenizer
    self.bos_id = self._id(bos_token, "bos_token")
    self.pad_id = self._id(pad_token, "pad_token")

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
    """`[bos_id] + BPE(text)`, as HF's OPT tokenizer's `input_ids` for one text."""
    return [self.bos_id] + self._tok.encode(text, add_special_tokens=False).ids

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


def _special_tokens(directory: str) -> dict[str, str]:
  """BOS / pad strings from tokenizer_config.json or special_tokens_map.json, if given."""
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
  try:
    if os.path.isfile(tokenizer_json):
      tok = Tokenizer.from_file(tokenizer_json)
    elif os.path.isfile(vocab) and os.path.isfile(merges):
      tok = Tokenizer(models.BPE.from_file(vocab, merges, dropout=None, continuing_subword_prefix="",
                                           end_of_word_suffix="", fuse_unk=False))
      tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
      tok.decoder = decoders.ByteLevel()
      tok.add_special_tokens([t for t in _SPECIAL if tok.token_to_id(t) is not None])
    else:
      raise TokenizerFilesError(
          f"{directory} has no tokenizer.json and no vocab.json + merges.txt.",
          "download the full checkpoint, e.g. `huggingface-cli download facebook/opt-125m "
          f"--local-dir {directory}`.")
  except TokenizerFilesError:
    raise
  except Exception as e:  # the tokenizers library raises plain Exceptions on malformed files
    raise TokenizerFilesError(f"cannot read the tokenizer files in {directory}: {e}",
                              "re-download the tokenizer files of the checkpoint.") from e
  special = _special_tokens(directory)
  return BPETokenizer(tok, bos_token=special.get("bos_token", DEFAULT_BOS),
                      pad_token=special.get("pad_token", DEFAULT_PAD))
