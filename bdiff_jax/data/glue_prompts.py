r"""Verbalised prompt templates for GLUE / SuperGLUE (LM-BFF / MeZO style), for two kinds of model.

`render(task, example)` returns `PromptParts(prefix, suffix, candidates)`: the full prompt for
candidate i is `prefix + candidates[i] + suffix` (the prefix carries the separator before the
label slot, a space or a newline). Use it with

- a causal LM: score each candidate by log p(`continuation(i)` | `context`): `context` is the
  prefix without its trailing spaces, `continuation(i)` those spaces plus the candidate (so BPE
  vocabularies see " great", as MeZO scores it). The suffix is not scored.
- a masked-diffusion LM: `cloze(mask_token, num_masks)` is the same text with the label slot
  replaced by mask tokens (one per token of the candidate), so the suffix gives right context;
  compare the candidates' log-probabilities at the masked positions.

Templates (label words in class-id order; `s1'` = s1 without a final . ? !, `s2l` = s2 with its
first letter lower-cased). GLUE tasks use LM-BFF's manual templates, which MeZO's RoBERTa
experiments use; SuperGLUE tasks use MeZO's OPT templates:

  task           template                                         label words (class-id order)
  SST-2          <s> It was [w].                                  terrible, great
  CoLA           <s> This is [w].                                 incorrect, correct
  MRPC, QQP      <s1> [w], <s2l>                                  No, Yes
  STS-B          <s1> [w], <s2l>                                  No, Yes (regression, below)
  QNLI, RTE      <s1'>? [w], <s2l>                                Yes, No
  WNLI           <s1'>? [w], <s2l>                                No, Yes (0 = not_entailment)
  MNLI           <s1'>? [w], <s2l>                                Yes, Maybe, No
  BoolQ          <passage> <Question>? [w]                        No, Yes
  CB             Suppose <premise> Can we infer that "<hypothesis>"? Yes, No, or Maybe?\n[w]
                                                                  Yes, No, Maybe
  COPA           <premise'> because [choice]  (effect: "so")      the two choices, first word
                                                                  lower-cased unless "I"
  WiC            Does the word "<word>" have the same meaning in these two sentences? Yes, No?
                 \n<s1>\n<s2>\n[w]                                 No, Yes
  SuperGLUE-RTE  <premise>\nDoes this mean that "<hypothesis>" is true? Yes or No?\n[w]
                                                                  Yes, No

STS-B is regression, which MeZO does not run. We follow LM-BFF: the MRPC-style template with
label words (No, Yes); the model's probabilities over the two words, renormalised, give the
prediction `5 * p(Yes)` (`regression_prediction`), and a gold score y is the two-word target
distribution (1 - y/5, y/5) (`regression_target`), trained with cross-entropy/KL against it.

Options:
- `spacing="natural"` (default) writes the template text as LM-BFF/MeZO do (punctuation attached:
  "It was great."). `spacing="word"` separates the template's own punctuation by spaces ("It was
  great ."), as WikiText-2's word-level tokenisation does, so a word-level vocabulary sees
  "great" and "." instead of an unknown "great.". The examples' own text is never altered (SST-2
  is already tokenised that way; other tasks are raw text).
- `lowercase=True` lower-cases the whole prompt and the candidates (SST-2's text is lower-case;
  a case-sensitive word vocabulary may know "yes" but not "Yes"; report OOV rates either way).
"""

import dataclasses
import re
from typing import Callable

import numpy as np

from bdiff_jax.data.glue import Example, task_spec
from bdiff_jax.errors import ConfigError

SPACINGS = ("natural", "word")
STSB_MAX = 5.0


@dataclasses.dataclass(frozen=True)
class PromptParts:
  """A prompt with one label slot: candidate i reads `prefix + candidates[i] + suffix`.

  Attributes:
    prefix: the text before the slot, ending with its separator (" " or "\\n").
    suffix: the text after the slot ("" when the label word ends the prompt).
    candidates: the label words (COPA: the two choices), index = class id.
    label: the gold class id (an index into candidates), or the gold score for STS-B.
  """
  prefix: str
  suffix: str
  candidates: tuple[str, ...]
  label: int | float

  def text(self, i: int) -> str:
    """The prompt filled with candidate i."""
    return self.prefix + self.candidates[i] + self.suffix

  def cloze(self, mask_token: str = "[MASK]", num_masks: int = 1) -> str:
    """The prompt with the slot as `num_masks` space-separated mask tokens."""
    if num_masks < 1:
      raise ConfigError(f"num_masks={num_masks} must be >= 1.", "pass one mask per token.")
    return self.prefix + " ".join([mask_token] * num_masks) + self.suffix

  @property
  def context(self) -> str:
    """For causal scoring: the prefix without trailing spaces (a trailing newline is kept)."""
    return self.prefix.rstrip(" ")

  def continuation(self, i: int) -> str:
    """For causal scoring: the prefix's trailing spaces plus candidate i."""
    return self.prefix[len(self.context):] + self.candidates[i]


class Lit(str):
  """Template-owned text (reformatted by `spacing`); plain `str` pieces are example text."""


_PUNCT = re.compile(r' *([?,.!"]) *')


def _word_spacing(literal: str) -> str:
  """Template text with each punctuation mark between single spaces (none next to a newline)."""
  out = _PUNCT.sub(r" \1 ", literal)
  return re.sub(r" *\n *", "\n", re.sub(r" {2,}", " ", out))


def _assemble(pieces: tuple[str, ...], spacing: str) -> str:
  """Joins template and example pieces; at a join, a doubled space collapses to one."""
  out = ""
  for piece in pieces:
    if isinstance(piece, Lit) and spacing == "word":
      piece = _word_spacing(piece)
    if out.endswith((" ", "\n")) and piece.startswith(" "):
      piece = piece[1:]
    out += piece
  return out


def _drop_final_punct(s: str) -> str:
  s = s.rstrip()
  return s[:-1].rstrip() if s.endswith((".", "?", "!")) else s


def _lower_first(s: str) -> str:
  return s[:1].lower() + s[1:]


def _copa_choice(c: str) -> str:
  words = c.split(" ")
  if words[0] != "I":
    words[0] = words[0].lower()
  return " ".join(words)


# Each template maps an example's texts to (prefix pieces, suffix pieces, candidates or None:
# the task's fixed label words). `Lit` pieces are template text, others the example's.
_Template = Callable[[tuple[str, ...]], tuple[tuple[str, ...], tuple[str, ...],
                                              tuple[str, ...] | None]]

WORDS: dict[str, tuple[str, ...]] = {
    "SST-2": ("terrible", "great"),
    "CoLA": ("incorrect", "correct"),
    "MRPC": ("No", "Yes"),
    "QQP": ("No", "Yes"),
    "STS-B": ("No", "Yes"),
    "QNLI": ("Yes", "No"),
    "RTE": ("Yes", "No"),
    "WNLI": ("No", "Yes"),
    "MNLI": ("Yes", "Maybe", "No"),
    "BoolQ": ("No", "Yes"),
    "CB": ("Yes", "No", "Maybe"),
    "WiC": ("No", "Yes"),
    "SuperGLUE-RTE": ("Yes", "No"),
}


def _sentiment(words):
  return lambda x: ((x[0], Lit(f" {words} ")), (Lit("."),), None)


def _pair(x):
  return (x[0], Lit(" ")), (Lit(", "), _lower_first(x[1])), None


def _nli(x):
  return (_drop_final_punct(x[0]), Lit("? ")), (Lit(", "), _lower_first(x[1])), None


def _boolq(x):
  passage, question = x
  question = question[:1].upper() + question[1:]
  mark = () if question.endswith("?") else (Lit("?"),)
  return (passage, Lit(" "), question, *mark, Lit(" ")), (), None


def _cb(x):
  return ((Lit("Suppose "), x[0], Lit(' Can we infer that "'), x[1],
           Lit('"? Yes, No, or Maybe?\n')), (), None)


def _copa(x):
  premise, choice1, choice2, question = x
  if question not in ("cause", "effect"):
    raise ConfigError(f"COPA question {question!r} is neither 'cause' nor 'effect'.",
                      "re-download COPA.")
  conj = Lit(" because ") if question == "cause" else Lit(" so ")
  return (_drop_final_punct(premise), conj), (), (_copa_choice(choice1), _copa_choice(choice2))


def _wic(x):
  word, s1, s2 = x
  return ((Lit('Does the word "'), word,
           Lit('" have the same meaning in these two sentences? Yes, No?\n'), s1, Lit("\n"),
           s2, Lit("\n")), (), None)


def _sg_rte(x):
  return ((x[0], Lit('\nDoes this mean that "'), x[1], Lit('" is true? Yes or No?\n')), (),
          None)


TEMPLATES: dict[str, _Template] = {
    "SST-2": _sentiment("It was"), "CoLA": _sentiment("This is"),
    "MRPC": _pair, "QQP": _pair, "STS-B": _pair,
    "QNLI": _nli, "RTE": _nli, "WNLI": _nli, "MNLI": _nli,
    "BoolQ": _boolq, "CB": _cb, "COPA": _copa, "WiC": _wic, "SuperGLUE-RTE": _sg_rte,
}


def verbalizer(task: str) -> tuple[str, ...]:
  """The label words of `task` by class id (natural case); () for COPA (candidates vary)."""
  return WORDS.get(task_spec(task).name, ())


def render(task: str, example: Example, *, spacing: str = "natural",
           lowercase: bool = False) -> PromptParts:
  """The prompt of one example with its label slot and candidates (see module docstring).

  Args:
    task: a GLUE/SuperGLUE task name.
    example: an `Example` of that task (`GlueSplit[i]`).
    spacing: "natural" (LM-BFF/MeZO text) or "word" (template punctuation space-separated).
    lowercase: lower-case prompt and candidates.
  """
  spec = task_spec(task)
  if example.task != spec.name:
    raise ConfigError(f"a {example.task} example cannot be rendered with the {spec.name} "
                      "template.", "render each task's examples with their own task.")
  if spacing not in SPACINGS:
    raise ConfigError(f"spacing={spacing!r} is not one of {SPACINGS}.",
                      "pass 'natural' or 'word'.")
  prefix_pieces, suffix_pieces, candidates = TEMPLATES[spec.name](example.texts)
  candidates = WORDS[spec.name] if candidates is None else candidates
  prefix = _assemble(prefix_pieces, spacing).lstrip(" ")
  suffix = _assemble(suffix_pieces, spacing).rstrip(" ")
  if lowercase:
    prefix, suffix = prefix.lower(), suffix.lower()
    candidates = tuple(c.lower() for c in candidates)
  return PromptParts(prefix=prefix, suffix=suffix, candidates=tuple(candidates),
                     label=example.label)


def regression_target(scores: np.ndarray | float) -> np.ndarray:
  """STS-B scores y in [0, 5] -> (..., 2) target distributions (1 - y/5, y/5) over (No, Yes)."""
  y = np.asarray(scores, dtype=np.float64) / STSB_MAX
  return np.stack([1.0 - y, y], axis=-1)


def regression_prediction(candidate_probs: np.ndarray) -> np.ndarray:
  """(..., 2) probabilities (or unnormalised weights) of (No, Yes) -> scores 5 * p(Yes)."""
  p = np.asarray(candidate_probs, dtype=np.float64)
  return STSB_MAX * p[..., 1] / p.sum(axis=-1)
