"""GLUE examples -> fixed-shape arrays for the classification objectives (`glue/objectives.py`).

`encode_split(split, encoder, scoring=..., seq_len=L)` renders every example with its task's
prompt (`glue.prompts.render`) and returns a dict of numpy arrays with a leading example axis N,
padded to fixed shapes so that one compiled step serves every batch:

  scoring="causal"  the end-slot prompt (`render(..., slot="end")`: the label word comes after
                    every segment of the example, so the model reads all of them).
                    inputs/targets int32[N, C, L], score_mask float32[N, C, L],
                    padding bool[N, C, L]: row (n, c) is `start + context + continuation(c)`
                    shifted by one (logits at i predict targets[i]); score_mask marks the
                    continuation's tokens (the label tokens after the prompt). `start` is the
                    encoder's `start_ids` (OPT: its BOS, when the tokenizer adds one).
                    When every candidate is one token, the C rows of an example have the
                    same inputs (`start + context`), so one row each instead:
                    inputs int32[N, L], padding bool[N, L], label_pos int32[N] (the last
                    context position, whose logits predict the label), candidate_ids
                    int32[N, C].
  scoring="cloze"   the mid-slot prompt (`slot="mid"`, LM-BFF's for the GLUE pair tasks; right
                    context around the slot).
                    inputs int32[N, L] with `mask_id` at the label slot, mask_pos int32[N],
                    candidate_ids int32[N, C], padding bool[N, L], t float32[N] (the diffusion
                    time whose masking probability is the row's masked fraction). When a
                    candidate has several tokens (COPA's choices): one row per candidate, the
                    slot as one mask per token of it: inputs/targets int32[N, C, L] (targets:
                    the candidate's tokens), score_mask float32[N, C, L] (its span),
                    padding bool[N, C, L], t float32[N, C].
  scoring="head"    inputs int32[N, L] (the example's segments joined by spaces, no template),
                    padding bool[N, L], t float32[N] (0: nothing is masked).

plus `target` float32[N, C] (one-hot; STS-B with a prompt: (1 - y/5, y/5); a regression head:
[N, 1] = y). Padding: `encoder.pad_left` (OPT: left, its position ids come from the mask;
bdiff networks: right, with the padding mask). Too-long prompts lose their earliest context
tokens (the label slot and what follows it are kept).

Encoders: `BPEEncoder` (OPT's byte-level BPE, natural template spacing) and `WordEncoder` (a
bdiff word-level vocabulary, template punctuation space-separated). A word the vocabulary lacks
is looked up lower-cased, then capitalised (WikiText-2 is cased, SST-2 lower-cased), and only
then becomes `<unk>`; `WordEncoder.stats` counts words, case-mapped words and `<unk>`s.
"""

import dataclasses
import re
from typing import Callable, Optional

import numpy as np

from bdiff_jax.errors import ConfigError
from bdiff_jax.glue import prompts as glue_prompts
from bdiff_jax.glue.tasks import GlueSplit

SCORINGS = ("causal", "cloze", "head")


class BPEEncoder:
  """OPT's tokenizer: its start tokens (BOS when `add_bos_token`), pad id, left padding."""

  pad_left = True
  spacing = "natural"
  head_start = True  # the head baseline's input starts as HF tokenizes it (BOS for OPT)

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.start_ids = list(tokenizer.start_ids)  # [bos_id] for OPT; [] without add_bos_token
    self.pad_id = tokenizer.pad_id
    self.mask_id = None

  def ids(self, text: str) -> list[int]:
    return self.tokenizer.encode_text(text)  # the text alone, no special tokens


@dataclasses.dataclass
class WordStats:
  words: int = 0
  case_mapped: int = 0
  unknown: int = 0

  @property
  def oov_rate(self) -> float:
    return self.unknown / max(self.words, 1)


# WikiText-2's tokenisation of the pieces of a word: clitics ('s, n't, ...), a hyphen or a
# number's comma or point between word characters (@-@, @,@, @.@), other punctuation alone.
_WIKITEXT_PIECES = re.compile(r"n't\b|'(?:s|re|ve|ll|d|m)\b|\w+?(?=n't\b)|\w+|"
                              r"(?P<joiner>(?<=\w)[-,.](?=\w))|[^\w\s]")
_JOINERS = {"-": "@-@", ",": "@,@", ".": "@.@"}


def wikitext_pieces(word: str) -> list[str]:
  """A whitespace-free `word` as WikiText-2 writes it: "tripped." -> ["tripped", "."],
  "don't" -> ["do", "n't"], "well-known" -> ["well", "@-@", "known"], "3,000" -> ["3", "@,@",
  "000"], "(IBM)" -> ["(", "IBM", ")"]."""
  return [_JOINERS[m.group(0)] if m.group("joiner") else m.group(0)
          for m in _WIKITEXT_PIECES.finditer(word)]


class WordEncoder:
  """A `WordTokenizer` vocabulary with case mapping; `start_id` (the AR BOS) is `[MASK]`.

  A word the vocabulary lacks in every case form is split as WikiText-2 writes text
  (`wikitext_pieces`: punctuation, clitics and joiners apart) and its pieces are looked up;
  only a piece that is still unknown becomes `<unk>`. SuperGLUE's raw sentences ("He
  tripped.") then read like the pretraining text; already tokenised text (SST-2) is unchanged
  wherever its words are known."""

  pad_left = False
  spacing = "word"
  head_start = False

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.mask_id = tokenizer.mask_id
    self.start_id = tokenizer.mask_id  # the autoregressive objective's BOS (objectives/__init__.py)
    self.start_ids = [self.start_id]
    self.pad_id = tokenizer.eos_id  # any real id; padding positions are masked out
    self.stats = WordStats()

  def _known(self, word: str) -> Optional[int]:
    for i, form in enumerate((word, word.lower(), word[:1].upper() + word[1:].lower())):
      found = self.tokenizer.id_of(form)
      if found is not None:
        self.stats.case_mapped += int(i > 0)
        return found
    return None

  def word_id(self, word: str) -> int:
    """The id of one vocabulary word (case-mapped), or `<unk>`; counted in `stats`."""
    self.stats.words += 1
    found = self._known(word)
    if found is None:
      self.stats.unknown += 1
      return self.tokenizer.unk_id
    return found

  def word_ids(self, word: str) -> list[int]:
    """The ids of a whitespace-free word: itself when known, else its WikiText-2 pieces."""
    found = self._known(word)
    if found is not None:
      self.stats.words += 1
      return [found]
    pieces = wikitext_pieces(word)
    if pieces == [word] or not pieces:
      return [self.word_id(word)]
    return [self.word_id(piece) for piece in pieces]

  def ids(self, text: str) -> list[int]:
    return [i for w in text.split() for i in self.word_ids(w)]


def _place(rows: list[list[int]], seq_len: int, pad_id: int, pad_left: bool):
  """Pads int rows (each <= seq_len) to [N, seq_len]; returns (ids, padding, offsets)."""
  ids = np.full((len(rows), seq_len), pad_id, np.int32)
  padding = np.zeros((len(rows), seq_len), bool)
  offsets = np.zeros(len(rows), np.int64)
  for r, row in enumerate(rows):
    start = seq_len - len(row) if pad_left else 0
    ids[r, start:start + len(row)] = row
    padding[r, start:start + len(row)] = True
    offsets[r] = start
  return ids, padding, offsets


def _trim_front(ctx: list[int], rest_len: int, seq_len: int, what: str) -> list[int]:
  keep = seq_len - rest_len
  if keep < 0:
    raise ConfigError(f"the label slot and what follows it ({rest_len} tokens, {what}) do not "
                      f"fit in glue.seq_len={seq_len}.", "raise glue.seq_len.")
  return ctx[len(ctx) - keep:] if keep < len(ctx) else ctx


def _targets(split: GlueSplit, num_candidates: int, head: bool) -> np.ndarray:
  if split.is_regression:
    if head:
      return split.labels.astype(np.float32)[:, None]
    return glue_prompts.regression_target(split.labels).astype(np.float32)
  return np.eye(num_candidates, dtype=np.float32)[split.labels.astype(np.int64)]


def _candidate_ids(parts, encoder, text_of) -> list[list[list[int]]]:
  """ids[n][c]: candidate c of example n, `text_of(part, c)` encoded once; a candidate that
  encodes to no tokens is refused."""
  ids = [[encoder.ids(text_of(p, c)) for c in range(len(p.candidates))] for p in parts]
  for p, per_part in zip(parts, ids):
    for c, cid in enumerate(per_part):
      if not cid:
        raise ConfigError(f"candidate {p.candidates[c]!r} encodes to no tokens.",
                          "use label words the tokenizer can encode.")
  return ids


def _one_token_each(cand_ids) -> Optional[np.ndarray]:
  """int32[N, C] when every candidate is one token, else None."""
  if any(len(cid) != 1 for per_part in cand_ids for cid in per_part):
    return None
  return np.asarray([[only for (only,) in per_part] for per_part in cand_ids], np.int32)


def _encode_causal(parts, encoder, seq_len):
  num_c = len(parts[0].candidates)
  ctxs = [encoder.ids(p.context) for p in parts]
  conts = _candidate_ids(parts, encoder, lambda p, c: p.continuation(c))
  single = _one_token_each(conts)
  if single is not None:
    # Every candidate is one token: the rows of an example differ only in their last target,
    # so one row per example and the C candidates read at its last position.
    rows = [encoder.start_ids + _trim_front(ctx, 1, seq_len, "the candidate") for ctx in ctxs]
    inputs, padding, offsets = _place(rows, seq_len, encoder.pad_id, encoder.pad_left)
    last = np.asarray([len(r) - 1 for r in rows]) + offsets
    return {"inputs": inputs, "padding": padding, "label_pos": last.astype(np.int32),
            "candidate_ids": single}
  rows, spans = [], []
  for ctx, per_part in zip(ctxs, conts):
    for cont in per_part:
      # seq = start + ctx + cont; inputs = seq[:-1], targets = seq[1:] (both seq_len long).
      ctx_c = _trim_front(ctx, len(cont), seq_len, "the candidate")
      seq = encoder.start_ids + ctx_c + cont
      rows.append(seq)
      spans.append((len(ctx_c), len(cont)))
  return _scored_rows([s[:-1] for s in rows], [s[1:] for s in rows], spans,
                      (len(parts), num_c, seq_len), encoder)


def _scored_rows(inputs, targets, spans, shape, encoder) -> dict:
  """One row per (example, candidate), placed to `shape` [N, C, L]: inputs, targets, padding
  and score_mask (1 on each row's span (start, length), counted in its unpadded row)."""
  inputs, padding, offsets = _place(inputs, shape[-1], encoder.pad_id, encoder.pad_left)
  targets, _, _ = _place(targets, shape[-1], encoder.pad_id, encoder.pad_left)
  score_mask = np.zeros(inputs.shape, np.float32)
  for r, (start, length) in enumerate(spans):
    score_mask[r, offsets[r] + start:offsets[r] + start + length] = 1.0
  return {"inputs": inputs.reshape(shape), "targets": targets.reshape(shape),
          "score_mask": score_mask.reshape(shape), "padding": padding.reshape(shape)}


def _encode_cloze(parts, encoder, seq_len, time_of_fraction):
  if encoder.mask_id is None:
    raise ConfigError("cloze scoring needs a tokenizer with a [MASK] token (a bdiff model).",
                      "score OPT causally.")
  cand_ids = _candidate_ids(parts, encoder, lambda p, c: p.candidates[c])  # each counted once
  single = _one_token_each(cand_ids)
  if single is None:
    return _encode_cloze_spans(parts, cand_ids, encoder, seq_len, time_of_fraction)
  rows, positions = [], []
  for p in parts:
    suffix = encoder.ids(p.suffix)
    prefix = _trim_front(encoder.ids(p.prefix), 1 + len(suffix), seq_len, "the suffix")
    rows.append(prefix + [encoder.mask_id] + suffix)
    positions.append(len(prefix))
  inputs, padding, offsets = _place(rows, seq_len, encoder.pad_id, encoder.pad_left)
  frac = 1.0 / padding.sum(axis=1)
  t = np.asarray([time_of_fraction(f) for f in frac], np.float32)
  return {"inputs": inputs, "padding": padding,
          "mask_pos": (np.asarray(positions) + offsets).astype(np.int32),
          "candidate_ids": single, "t": t}


def _encode_cloze_spans(parts, cand_ids, encoder, seq_len, time_of_fraction):
  """Cloze rows for candidates of several tokens: one row per candidate, the slot replaced by
  one mask per token of it (ClozePrompt's span batch); `cand_ids[n][c]`: candidate c's ids
  (`_candidate_ids`: none empty)."""
  num_c = len(parts[0].candidates)
  rows, spans = [], []
  for p, per_part in zip(parts, cand_ids):
    prefix_ids, suffix = encoder.ids(p.prefix), encoder.ids(p.suffix)
    for c in range(num_c):
      cid = per_part[c]
      prefix = _trim_front(prefix_ids, len(cid) + len(suffix), seq_len,
                           "the candidate and the suffix")
      rows.append((prefix + [encoder.mask_id] * len(cid) + suffix, prefix + cid + suffix))
      spans.append((len(prefix), len(cid)))
  out = _scored_rows([r[0] for r in rows], [r[1] for r in rows], spans,
                     (len(parts), num_c, seq_len), encoder)
  out["t"] = np.asarray([time_of_fraction(length / len(row[0]))
                         for row, (_, length) in zip(rows, spans)],
                        np.float32).reshape(len(parts), num_c)
  return out


def _encode_head(split, encoder, seq_len):
  rows = []
  for i in range(len(split)):
    ids = encoder.ids(" ".join(seg[i] for seg in split.texts))
    start = encoder.start_ids if encoder.head_start else []
    rows.append((start + ids)[:seq_len])
  inputs, padding, _ = _place(rows, seq_len, encoder.pad_id, encoder.pad_left)
  return {"inputs": inputs, "padding": padding, "t": np.zeros(len(rows), np.float32)}


def encode_split(split: GlueSplit, encoder, *, scoring: str, seq_len: int,
                 time_of_fraction: Optional[Callable[[float], float]] = None) -> dict:
  """The arrays of `split` for `scoring` (see the module docstring); also "labels" [N].

  `time_of_fraction(f)` maps a masked fraction to a diffusion time (cloze scoring; default: t = f, the linear
  schedule).
  """
  if scoring not in SCORINGS:
    raise ConfigError(f"scoring={scoring!r} is not one of {SCORINGS}.", "use one of those.")
  if scoring == "head":
    out = _encode_head(split, encoder, seq_len)
    out["target"] = _targets(split, split.num_labels, head=True)
  else:
    slot = "end" if scoring == "causal" else "mid"
    parts = [glue_prompts.render(split.task, split[i], slot=slot, spacing=encoder.spacing)
             for i in range(len(split))]
    if scoring == "causal":
      out = _encode_causal(parts, encoder, seq_len)
    else:
      out = _encode_cloze(parts, encoder, seq_len, time_of_fraction or float)
    out["target"] = _targets(split, len(parts[0].candidates), head=False)
  out["labels"] = np.asarray(split.labels)
  return out
