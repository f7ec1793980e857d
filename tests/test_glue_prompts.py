"""Tests of the verbalised GLUE/SuperGLUE templates: exact prompt text, label-word order, cloze,
and that causal scoring feeds the model every segment of every task's examples."""

import os

import numpy as np
import pytest

from bdiff_jax.data import tokenizer as tokenizer_lib
from bdiff_jax.data.bpe_tokenizer import load_bpe_tokenizer
from bdiff_jax.errors import ConfigError
from bdiff_jax.glue import encoding as glue_encoding
from bdiff_jax.glue import prompts as gp
from bdiff_jax.glue import tasks as glue_tasks

TINY_OPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tiny_opt")


def _ex(task, *texts, label=0):
  return glue_tasks.Example(task, texts, label, glue_tasks.TASKS[task].segment_names)


def test_every_task_has_a_template_with_one_word_per_class():
  for name, spec in glue_tasks.TASKS.items():
    assert name in gp.TEMPLATES["end"] and name in gp.TEMPLATES["mid"]
    if name == "COPA":
      assert gp.verbalizer(name) == ()
    elif spec.is_regression:
      assert gp.verbalizer(name) == ("No", "Yes")
    else:
      assert len(gp.verbalizer(name)) == spec.num_labels


def test_sst2_exact_text_cloze_and_causal_split():
  p = gp.render("SST-2", _ex("SST-2", "a charming journey .", label=1))
  assert p.candidates == ("terrible", "great") and p.candidates[p.label] == "great"
  assert p.text(1) == "a charming journey . It was great."
  assert p.cloze() == "a charming journey . It was [MASK]."
  assert p.cloze("<m>", num_masks=2) == "a charming journey . It was <m> <m>."
  assert p.context == "a charming journey . It was" and p.continuation(0) == " terrible"
  w = gp.render("sst2", _ex("SST-2", "a charming journey .", label=1), spacing="word")
  assert w.text(1) == "a charming journey . It was great ."


@pytest.mark.parametrize("task, texts, natural, word", [
    ("CoLA", ("They drank the pub.",), "They drank the pub. This is correct.",
     "They drank the pub. This is correct ."),
    ("MRPC", ("He left.", "The man went."),
     'He left.\nDoes "The man went." say the same thing as the sentence above? Yes or No?\nYes',
     'He left.\nDoes " The man went. " say the same thing as the sentence above ? Yes or No ?\n'
     "Yes"),
    ("QQP", ("Why?", "How?"),
     'Why?\nIs "How?" the same question as the one above? Yes or No?\nYes',
     'Why?\nIs " How? " the same question as the one above ? Yes or No ?\nYes'),
    ("STS-B", ("A plane.", "A jet."),
     'A plane.\nDoes "A jet." mean the same as the sentence above? Yes or No?\nYes',
     'A plane.\nDoes " A jet. " mean the same as the sentence above ? Yes or No ?\nYes'),
    ("QNLI", ("Who came?", "Bob came."),
     'Who came?\nDoes the sentence "Bob came." answer the question above? Yes or No?\nYes',
     'Who came?\nDoes the sentence " Bob came. " answer the question above ? Yes or No ?\nYes'),
    ("RTE", ("A cat sat.", "A cat is here."),
     'A cat sat.\nDoes this mean that "A cat is here." is true? Yes or No?\nYes',
     'A cat sat.\nDoes this mean that " A cat is here. " is true ? Yes or No ?\nYes'),
    ("WNLI", ("I hid it.", "It hid."),
     'I hid it.\nDoes this mean that "It hid." is true? Yes or No?\nYes',
     'I hid it.\nDoes this mean that " It hid. " is true ? Yes or No ?\nYes'),
    ("MNLI", ("P.", "H."),
     'P.\nDoes this mean that "H." is true? Yes, Maybe, or No?\nYes',
     'P.\nDoes this mean that " H. " is true ? Yes , Maybe , or No ?\nYes'),
    ("WSC", ("Mark lied to Pete. He was wrong.", "Mark", "He"),
     'Mark lied to Pete. He was wrong.\nIn the passage above, does the pronoun "He" refer to '
     '"Mark"? Yes or No?\nYes',
     'Mark lied to Pete. He was wrong.\nIn the passage above , does the pronoun " He " refer to '
     '" Mark " ? Yes or No ?\nYes'),
    ("MultiRC", ("Force moves things.", "What moves things?", "Force"),
     'Force moves things.\nQuestion: What moves things?\nIs "Force" a correct answer to this '
     "question? Yes or No?\nYes",
     'Force moves things.\nQuestion: What moves things?\nIs " Force " a correct answer to this '
     "question ? Yes or No ?\nYes"),
    ("BoolQ", ("Iran speaks Persian.", "is persian spoken in iran"),
     "Iran speaks Persian. Is persian spoken in iran? Yes",
     "Iran speaks Persian. Is persian spoken in iran ? Yes"),
    ("CB", ("It rained.", "it was wet"),
     'Suppose It rained. Can we infer that "it was wet"? Yes, No, or Maybe?\nYes',
     'Suppose It rained. Can we infer that " it was wet " ? Yes , No , or Maybe ?\nYes'),
    ("WiC", ("bank", "A river bank.", "A bank loan."),
     'Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
     "A river bank.\nA bank loan.\nYes",
     'Does the word " bank " have the same meaning in these two sentences ? Yes , No ?\n'
     "A river bank.\nA bank loan.\nYes"),
    ("SuperGLUE-RTE", ("No guns.", "Guns."),
     'No guns.\nDoes this mean that "Guns." is true? Yes or No?\nYes',
     'No guns.\nDoes this mean that " Guns. " is true ? Yes or No ?\nYes'),
])
def test_template_text(task, texts, natural, word):
  # Each row renders the candidate "Yes"/"correct" (the class whose word is checked), in the
  # default end-slot form.
  ex = _ex(task, *texts)
  i = gp.verbalizer(task).index("correct" if task == "CoLA" else "Yes")
  assert gp.render(task, ex).text(i) == natural
  assert gp.render(task, ex, slot="end").text(i) == natural
  assert gp.render(task, ex, spacing="word").text(i) == word
  # The cloze keeps the same right context (empty when the word ends the prompt).
  parts = gp.render(task, ex)
  assert parts.cloze("[M]") == parts.prefix + "[M]" + parts.suffix
  assert natural == parts.prefix + parts.candidates[i] + parts.suffix
  if task != "CoLA":  # the label word ends the prompt
    assert parts.suffix == "" and parts.context + parts.continuation(i) == natural


@pytest.mark.parametrize("task, texts, natural, word", [
    ("MRPC", ("He left.", "The man went."), "He left. Yes, the man went.",
     "He left. Yes , the man went."),
    ("QQP", ("Why?", "How?"), "Why? Yes, how?", "Why? Yes , how?"),
    ("STS-B", ("A plane.", "A jet."), "A plane. Yes, a jet.", "A plane. Yes , a jet."),
    ("QNLI", ("Who came?", "Bob came."), "Who came? Yes, bob came.",
     "Who came ? Yes , bob came."),
    ("RTE", ("A cat sat.", "A cat is here."), "A cat sat? Yes, a cat is here.",
     "A cat sat ? Yes , a cat is here."),
    ("WNLI", ("I hid it.", "It hid."), "I hid it? Yes, it hid.", "I hid it ? Yes , it hid."),
    ("MNLI", ("P.", "H."), "P? Yes, h.", "P ? Yes , h."),
])
def test_mid_slot_lm_bff_text(task, texts, natural, word):
  ex = _ex(task, *texts)
  i = gp.verbalizer(task).index("Yes")
  parts = gp.render(task, ex, slot="mid")
  assert parts.text(i) == natural
  assert gp.render(task, ex, slot="mid", spacing="word").text(i) == word
  assert parts.cloze("[M]") == natural.replace("Yes", "[M]", 1)


def test_one_form_tasks_render_the_same_in_both_slots():
  ex = {"SST-2": ("a film .",), "BoolQ": ("P.", "is it"), "COPA": ("P.", "A.", "B.", "cause"),
        "WiC": ("w", "a", "b"), "SuperGLUE-RTE": ("p", "h"), "WSC": ("t", "a", "b"),
        "MultiRC": ("p", "q", "a")}
  for task, texts in ex.items():
    assert gp.render(task, _ex(task, *texts), slot="mid") == gp.render(task, _ex(task, *texts))


def test_label_words_follow_class_ids():
  # Class ids from the readers: RTE/QNLI 0 = entailment, WNLI 1 = entailment, MNLI 1 = neutral,
  # CB 1 = contradiction, MRPC/QQP 1 = paraphrase.
  word = lambda task, label: gp.render(task, _ex(task, *(["x"] * len(
      glue_tasks.TASKS[task].segment_names)), label=label)).candidates[label]
  assert word("RTE", 0) == "Yes" and word("QNLI", 1) == "No"
  assert word("WNLI", 1) == "Yes" and word("WNLI", 0) == "No"
  assert [word("MNLI", k) for k in range(3)] == ["Yes", "Maybe", "No"]
  assert [word("CB", k) for k in range(3)] == ["Yes", "No", "Maybe"]
  assert word("MRPC", 1) == "Yes" and word("QQP", 0) == "No"
  assert word("BoolQ", 1) == "Yes" and word("WiC", 0) == "No"
  assert word("WSC", 1) == "Yes" and word("MultiRC", 1) == "Yes" and word("MultiRC", 0) == "No"


def test_copa_candidates_are_the_choices():
  ex = _ex("COPA", "The man fell.", "He tripped.", "I laughed.", "cause", label=0)
  p = gp.render("COPA", ex)
  assert p.candidates == ("he tripped.", "I laughed.")
  assert p.text(0) == "The man fell because he tripped."
  effect = gp.render("COPA", _ex("COPA", "It rained.", "A", "B", "effect"))
  assert effect.prefix == "It rained so "


def test_lowercase_option():
  p = gp.render("RTE", _ex("RTE", "A Cat sat.", "Tom is here."), slot="mid", lowercase=True)
  assert p.candidates == ("yes", "no") and p.text(0) == "a cat sat? yes, tom is here."


def test_stsb_regression_mapping():
  p = gp.render("STS-B", _ex("STS-B", "A plane.", "A jet.", label=3.8))
  assert p.candidates == ("No", "Yes") and p.label == 3.8
  np.testing.assert_allclose(gp.regression_target([0.0, 3.8, 5.0]),
                             [[1.0, 0.0], [0.24, 0.76], [0.0, 1.0]])
  # p(Yes) = 0.3 / (0.1 + 0.3) = 0.75 -> 3.75; a normalised pair works the same.
  np.testing.assert_allclose(gp.regression_prediction([[0.1, 0.3], [0.5, 0.5]]), [3.75, 2.5])


def test_render_rejects_mismatches():
  with pytest.raises(ConfigError, match="a RTE example cannot be rendered with the MNLI"):
    gp.render("MNLI", _ex("RTE", "a", "b"))
  with pytest.raises(ConfigError, match="spacing='bpe'"):
    gp.render("RTE", _ex("RTE", "a", "b"), spacing="bpe")
  with pytest.raises(ConfigError, match="slot='start'"):
    gp.render("RTE", _ex("RTE", "a", "b"), slot="start")
  with pytest.raises(ConfigError, match="neither 'cause' nor 'effect'"):
    gp.render("COPA", _ex("COPA", "a", "b", "c", "why"))


# --- every segment reaches a causal model ---------------------------------------------------

def _marked_split(task):
  """A one-example split of `task` whose segment s holds the word `mark<s>q` (not first, so that
  templates that capitalise or lower-case a segment's first letter leave it alone)."""
  spec = glue_tasks.TASKS[task]
  texts = [f"the mark{s}q here." for s in range(len(spec.segment_names))]
  if task == "WiC":
    texts[0] = "mark0q"
  if task == "COPA":
    texts[3] = "effect"  # not free text: it picks the conjunction
  label = 2.5 if spec.is_regression else 1
  return glue_tasks.GlueSplit(
      task=task, split="dev", texts=tuple((t,) for t in texts),
      labels=np.asarray([label], np.float32 if spec.is_regression else np.int64),
      label_names=spec.label_names, segment_names=spec.segment_names,
      source_rows=np.zeros(1, np.int64), path="synthetic")


def _word_encoder():
  lines = []
  for task in glue_tasks.TASKS:
    split = _marked_split(task)
    for slot in gp.SLOTS:
      p = gp.render(task, split[0], slot=slot, spacing="word")
      lines += [p.text(c) for c in range(len(p.candidates))]
  return glue_encoding.WordEncoder(tokenizer_lib.WordTokenizer.from_corpus(lines))


def _bpe_encoder():
  return glue_encoding.BPEEncoder(load_bpe_tokenizer(TINY_OPT))


def _decode(encoder, ids):
  if isinstance(encoder, glue_encoding.BPEEncoder):
    return encoder.tokenizer.decode(ids, skip_special_tokens=True)
  return encoder.tokenizer.decode(ids)


@pytest.mark.parametrize("make_encoder", [_word_encoder, _bpe_encoder], ids=["word", "bpe"])
def test_causal_context_holds_every_segment(make_encoder):
  encoder = make_encoder()
  for task, spec in glue_tasks.TASKS.items():
    split = _marked_split(task)
    enc = glue_encoding.encode_split(split, encoder, scoring="causal", seq_len=256)
    markers = [f"mark{s}q" for s in range(len(spec.segment_names))]
    candidates = gp.render(task, split[0]).candidates
    if "candidate_ids" in enc:  # one-token candidates: one row, the labels read at its end
      real = enc["padding"][0]
      inputs = enc["inputs"][0]
      assert enc["label_pos"][0] == np.flatnonzero(real)[-1]  # the last real position
      context = _decode(encoder, inputs[real])
      for marker in markers:
        assert marker in context, (task, marker, context)
      assert [_decode(encoder, [i]).strip() for i in enc["candidate_ids"][0]] == list(candidates)
      continue
    for c in range(enc["inputs"].shape[1]):
      real = enc["padding"][0, c]
      inputs, targets = enc["inputs"][0, c][real], enc["targets"][0, c][real]
      assert np.all(inputs[1:] == targets[:-1])  # targets are the inputs shifted by one
      seq = np.concatenate([inputs[:1], targets])
      scored = np.flatnonzero(enc["score_mask"][0, c][real]) + 1  # positions in seq
      assert scored.size and scored[-1] == seq.size - 1  # the label tokens end the row
      context = _decode(encoder, seq[:scored[0]])
      label_text = _decode(encoder, seq[scored[0]:])
      if task == "COPA":  # the choices are the candidates; the question picks "so"
        assert "mark0q" in context and context.rstrip().endswith("so"), context
        assert markers[1 + c] in label_text and markers[2 - c] not in context + label_text
        continue
      for marker in markers:
        assert marker in context, (task, marker, context)
      assert label_text.strip() == candidates[c], (task, label_text)


def test_cloze_keeps_every_segment_around_the_mask():
  encoder = _word_encoder()
  for task, spec in glue_tasks.TASKS.items():
    if task == "COPA":
      continue  # its candidates are multi-word choices, not cloze label words
    split = _marked_split(task)
    enc = glue_encoding.encode_split(split, encoder, scoring="cloze", seq_len=256)
    text = encoder.tokenizer.decode(enc["inputs"][0][enc["padding"][0]])
    assert enc["inputs"][0, enc["mask_pos"][0]] == encoder.mask_id
    for s in range(len(spec.segment_names)):
      assert f"mark{s}q" in text, (task, text)
  # The pair tasks keep LM-BFF's slot between the sentences.
  enc = glue_encoding.encode_split(_marked_split("RTE"), encoder, scoring="cloze", seq_len=64)
  text = encoder.tokenizer.decode(enc["inputs"][0][enc["padding"][0]])
  assert text.index("mark0q") < text.index("[MASK]") < text.index("mark1q")


def test_end_slot_templates_end_with_the_label():
  # Only SST-2 and CoLA keep a template "." after the slot (not scored); COPA, WiC, CB, BoolQ,
  # SuperGLUE-RTE, WSC, MultiRC and the pair tasks end with the label word.
  for task, spec in glue_tasks.TASKS.items():
    ex = _ex(task, *(["cause" if n == "question" and task == "COPA" else "x y."
                      for n in spec.segment_names]))
    for spacing in gp.SPACINGS:
      parts = gp.render(task, ex, slot="end", spacing=spacing)
      assert parts.suffix.strip() == ("." if task in ("SST-2", "CoLA") else ""), task
