r"""Verbalised prompt templates for GLUE / SuperGLUE (LM-BFF / MeZO style), for two kinds of model.

`render(task, example, slot=...)` returns `PromptParts(prefix, suffix, candidates)`: the full
prompt for candidate i is `prefix + candidates[i] + suffix` (the prefix carries the separator
before the label slot, a space or a newline). Two template forms, by where the label slot is:

- `slot="end"` (the default): the label word is the last thing in the prompt (suffix ""), so
  everything the example says comes before it. For a causal LM (OPT, an autoregressive bdiff):
  score each candidate by log p(`continuation(i)` | `context`): `context` is the prefix without
  its trailing spaces, `continuation(i)` those spaces plus the candidate (so BPE vocabularies see
  " great", as MeZO scores it). A causal model never sees text after the slot, which is why it
  must use this form: with a mid-sentence slot it would never read the second sentence.
- `slot="mid"`: LM-BFF's templates for the GLUE pair tasks, with the slot between the two
  sentences, for a masked-diffusion LM, which sees the right context: `cloze(mask_token,
  num_masks)` is the text with the slot replaced by mask tokens (one per token of the
  candidate); compare the candidates' log-probabilities at the masked positions. Tasks without
  an LM-BFF template (single sentences, SuperGLUE) render the same in both forms.

`glue.encoding.encode_split` uses "end" for causal scoring and "mid" for cloze scoring.

Templates (label words in class-id order; `s1'` = s1 without a final . ? !, `s2l` = s2 with its
first letter lower-cased). End-slot pair templates are written here in the style of MeZO's OPT
templates (MeZO's own for SuperGLUE-RTE, used for GLUE RTE too); mid-slot ones are LM-BFF's
manual templates, which MeZO's RoBERTa experiments use:

  task           slot="end" template                                            label words
  SST-2          <s> It was [w].   (one form; the "." after the slot is not scored)
                                                                                 terrible, great
  CoLA           <s> This is [w].  (one form)                                    incorrect, correct
  MRPC           <s1>\nDoes "<s2>" say the same thing as the sentence above? Yes or No?\n[w]
                                                                                 No, Yes
  QQP            <q1>\nIs "<q2>" the same question as the one above? Yes or No?\n[w]
                                                                                 No, Yes
  STS-B          <s1>\nDoes "<s2>" mean the same as the sentence above? Yes or No?\n[w]
                                                                      No, Yes (regression)
  QNLI           <question>\nDoes the sentence "<sentence>" answer the question above? Yes or
                 No?\n[w]                                                        Yes, No
  RTE            <s1>\nDoes this mean that "<s2>" is true? Yes or No?\n[w]      Yes, No
  WNLI           <s1>\nDoes this mean that "<s2>" is true? Yes or No?\n[w]      No, Yes
  MNLI           <premise>\nDoes this mean that "<hypothesis>" is true? Yes, Maybe, or No?\n[w]
                                                                                 Yes, Maybe, No
  BoolQ          <passage> <Question>? [w]                                       No, Yes
  CB             Suppose <premise> Can we infer that "<hypothesis>"? Yes, No, or Maybe?\n[w]
                                                                                 Yes, No, Maybe
  COPA           <premise'> because [choice]  (effect: "so")                     the two choices,
                                                                   first word lower-cased unless "I"
  WiC            Does the word "<word>" have the same meaning in these two sentences? Yes, No?
                 \n<s1>\n<s2>\n[w]                                                No, Yes
  SuperGLUE-RTE  <premise>\nDoes this mean that "<hypothesis>" is true? Yes or No?\n[w]
                                                                                 Yes, No
  WSC            <text>\nIn the passage above, does the pronoun "<span2>" refer to "<span1>"?
                 Yes or No?\n[w]                                                 No, Yes
  MultiRC        <paragraph>\nQuestion: <question>\nIs "<answer>" a correct answer to this
                 question? Yes or No?\n[w]                                       No, Yes

  task           slot="mid" template (LM-BFF)       label words: as above
  MRPC, QQP      <s1> [w], <s2l>
  STS-B          <s1> [w], <s2l>
  QNLI, RTE      <s1'>? [w], <s2l>
  WNLI, MNLI     <s1'>? [w], <s2l>

STS-B is regression, which MeZO does not run. We follow LM-BFF: label words (No, Yes); the
model's probabilities over the two words, renormalised, give the prediction `5 * p(Yes)`
(`regression_prediction`), and a gold score y is the two-word target distribution
(1 - y/5, y/5) (`regression_target`), trained with cross-entropy/KL against it.

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

from bdiff_jax.errors import ConfigError
from bdiff_jax.glue.tasks import Example, task_spec

SPACINGS = ("natural", "word")
SLOTS = ("end", "mid")
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
    "WSC": ("No", "Yes"),
    "MultiRC": ("No", "Yes"),
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


def _end(before: str, after: str):
  """The end-slot template `<a>\n{before}"<b>"{after}\n[w]` of a two-segment task."""
  return lambda x: ((x[0], Lit("\n" + before + '"'), x[1], Lit('"' + after + "\n")), (), None)


_MEANS_TRUE = _end("Does this mean that ", " is true? Yes or No?")


def _wsc(x):
  text, span1, span2 = x
  return ((text, Lit('\nIn the passage above, does the pronoun "'), span2,
           Lit('" refer to "'), span1, Lit('"? Yes or No?\n')), (), None)


def _multirc(x):
  paragraph, question, answer = x
  return ((paragraph, Lit("\nQuestion: "), question, Lit('\nIs "'), answer,
           Lit('" a correct answer to this question? Yes or No?\n')), (), None)


# Label slot last: every task; causal scoring needs this form (see the module docstring).
END_TEMPLATES: dict[str, _Template] = {
    "SST-2": _sentiment("It was"), "CoLA": _sentiment("This is"),
    "MRPC": _end("Does ", " say the same thing as the sentence above? Yes or No?"),
    "QQP": _end("Is ", " the same question as the one above? Yes or No?"),
    "STS-B": _end("Does ", " mean the same as the sentence above? Yes or No?"),
    "QNLI": _end("Does the sentence ", " answer the question above? Yes or No?"),
    "RTE": _MEANS_TRUE, "WNLI": _MEANS_TRUE,
    "MNLI": _end("Does this mean that ", " is true? Yes, Maybe, or No?"),
    "BoolQ": _boolq, "CB": _cb, "COPA": _copa, "WiC": _wic, "SuperGLUE-RTE": _MEANS_TRUE,
    "WSC": _wsc, "MultiRC": _multirc,
}

# LM-BFF's mid-slot templates for the GLUE pair tasks (right context for cloze scoring); the
# other tasks have one form.
MID_TEMPLATES: dict[str, _Template] = {
    **END_TEMPLATES,
    "MRPC": _pair, "QQP": _pair, "STS-B": _pair,
    "QNLI": _nli, "RTE": _nli, "WNLI": _nli, "MNLI": _nli,
}

TEMPLATES: dict[str, dict[str, _Template]] = {"end": END_TEMPLATES, "mid": MID_TEMPLATES}


def verbalizer(task: str) -> tuple[str, ...]:
  """The label words of `task` by class id (natural case); () for COPA (candidates vary)."""
  return WORDS.get(task_spec(task).name, ())


def render(task: str, example: Example, *, slot: str = "end", spacing: str = "natural",
           lowercase: bool = False) -> PromptParts:
  """The prompt of one example with its label slot and candidates (see module docstring).

  Args:
    task: a GLUE/SuperGLUE task name.
    example: an `Example` of that task (`GlueSplit[i]`).
    slot: "end" (label word last, every segment before it: causal scoring) or "mid" (LM-BFF's
      slot between the sentences of a pair task: cloze scoring).
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
  if slot not in SLOTS:
    raise ConfigError(f"slot={slot!r} is not one of {SLOTS}.", "pass 'end' or 'mid'.")
  prefix_pieces, suffix_pieces, candidates = TEMPLATES[slot][spec.name](example.texts)
  if slot == "end" and not all(isinstance(piece, Lit) for piece in suffix_pieces):
    raise AssertionError(f"the end-slot {spec.name} template puts example text after the slot.")
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
