"""Tests of the verbalised GLUE/SuperGLUE templates: exact prompt text, label-word order, cloze."""

import numpy as np
import pytest

from bdiff_jax.data import glue
from bdiff_jax.data import glue_prompts as gp
from bdiff_jax.errors import ConfigError


def _ex(task, *texts, label=0):
  return glue.Example(task, texts, label, glue.TASKS[task].segment_names)


def test_every_task_has_a_template_with_one_word_per_class():
  for name, spec in glue.TASKS.items():
    assert name in gp.TEMPLATES
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
    ("MRPC", ("He left.", "The man went."), "He left. Yes, the man went.",
     "He left. Yes , the man went."),
    ("QNLI", ("Who came?", "Bob came."), "Who came? Yes, bob came.",
     "Who came ? Yes , bob came."),
    ("RTE", ("A cat sat.", "A cat is here."), "A cat sat? Yes, a cat is here.",
     "A cat sat ? Yes , a cat is here."),
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
  # Each row renders the candidate "Yes"/"correct" (the class whose word is checked).
  ex = _ex(task, *texts)
  i = gp.verbalizer(task).index("correct" if task == "CoLA" else "Yes")
  assert gp.render(task, ex).text(i) == natural
  assert gp.render(task, ex, spacing="word").text(i) == word
  # The cloze keeps the same right context (empty when the word ends the prompt).
  parts = gp.render(task, ex)
  assert parts.cloze("[M]") == parts.prefix + "[M]" + parts.suffix
  assert natural == parts.prefix + parts.candidates[i] + parts.suffix


def test_label_words_follow_class_ids():
  # Class ids from the readers: RTE/QNLI 0 = entailment, WNLI 1 = entailment, MNLI 1 = neutral,
  # CB 1 = contradiction, MRPC/QQP 1 = paraphrase.
  word = lambda task, label: gp.render(task, _ex(task, *(["x"] * len(
      glue.TASKS[task].segment_names)), label=label)).candidates[label]
  assert word("RTE", 0) == "Yes" and word("QNLI", 1) == "No"
  assert word("WNLI", 1) == "Yes" and word("WNLI", 0) == "No"
  assert [word("MNLI", k) for k in range(3)] == ["Yes", "Maybe", "No"]
  assert [word("CB", k) for k in range(3)] == ["Yes", "No", "Maybe"]
  assert word("MRPC", 1) == "Yes" and word("QQP", 0) == "No"
  assert word("BoolQ", 1) == "Yes" and word("WiC", 0) == "No"


def test_copa_candidates_are_the_choices():
  ex = _ex("COPA", "The man fell.", "He tripped.", "I laughed.", "cause", label=0)
  p = gp.render("COPA", ex)
  assert p.candidates == ("he tripped.", "I laughed.")
  assert p.text(0) == "The man fell because he tripped."
  effect = gp.render("COPA", _ex("COPA", "It rained.", "A", "B", "effect"))
  assert effect.prefix == "It rained so "


def test_lowercase_option():
  p = gp.render("RTE", _ex("RTE", "A Cat sat.", "Tom is here."), lowercase=True)
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
  with pytest.raises(ConfigError, match="neither 'cause' nor 'effect'"):
    gp.render("COPA", _ex("COPA", "a", "b", "c", "why"))
