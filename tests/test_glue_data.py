"""Tests of the GLUE/SuperGLUE readers, few-shot sampling and the offline parts of downloading.

The real SST-2 (../shared/data/glue, or $BDIFF_GLUE_DIR) is read once per module; every other task
is exercised on tiny files in the official layouts, written here.
"""

import json
import os
import zipfile

import numpy as np
import pytest

from bdiff_jax.errors import ConfigError, DataError
from bdiff_jax.glue import download as glue_download
from bdiff_jax.glue import metrics as glue_metrics
from bdiff_jax.glue import readers as glue_readers
from bdiff_jax.glue import sampling as glue_sampling
from bdiff_jax.glue import tasks as glue_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, lines, newline="\n", bom=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="") as f:
    f.write(("\ufeff" if bom else "") + "".join(line + newline for line in lines))


def _tsv(*rows):
  return ["\t".join(r) for r in rows]


# Per task: (file name -> lines), expected segments of the first example, expected labels.
MNLI_TRAIN_HEADER = ("index", "promptID", "pairID", "genre", "sentence1_binary_parse",
                     "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
                     "sentence2", "label1", "gold_label")
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ("label2", "label3", "label4", "label5", "gold_label")
STSB_HEADER = ("index", "genre", "filename", "year", "old_index", "source1", "source2",
               "sentence1", "sentence2", "score")


def _mnli_row(i, s1, s2, label, dev):
  extra = ("x",) * 4 if dev else ()
  return (str(i), "p", "q", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)", s1, s2, label,
          *extra, label)


SYNTHETIC = {
    "CoLA": ({"train.tsv": _tsv(("gj04", "1", "", 'He said "hi" .'),
                                ("gj04", "0", "*", "Him go .")),
              "dev.tsv": _tsv(("cj99", "1", "", "Fine ."))},
             ('He said "hi" .',), [1, 0]),
    "SST-2": ({"train.tsv": _tsv(("sentence", "label"), ("a fine film ", "1"), ("dull", "0")),
               "dev.tsv": _tsv(("sentence", "label"), ("ok", "1"))},
              ("a fine film",), [1, 0]),
    "MRPC": ({"train.tsv": _tsv(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
                                ("1", "11", "12", "He left .", "He went away ."),
                                ("0", "13", "14", "A b", "C d")),
              "dev.tsv": _tsv(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
                              ("0", "1", "2", "x", "y"))},
             ("He left .", "He went away ."), [1, 0]),
    "QQP": ({"train.tsv": _tsv(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
                               ("0", "1", "2", "Why?", "How?", "0"),
                               ("1", "3", "4", "What is x?", "What's x?", "1")),
             "dev.tsv": _tsv(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
                             ("5", "6", "7", "a", "b", "1"))},
            ("Why?", "How?"), [0, 1]),
    "STS-B": ({"train.tsv": _tsv(STSB_HEADER,
                                 ("0", "main-captions", "MSRvid", "2012test", "0001", "none",
                                  "none", "A plane takes off.", "An airplane takes off.", "5.000"),
                                 ("1", "main-news", "f", "2014", "0002", "none", "none", "a", "b",
                                  "0.25")),
               "dev.tsv": _tsv(STSB_HEADER, ("0", "g", "f", "y", "o", "s", "s", "c", "d", "2.5"))},
              ("A plane takes off.", "An airplane takes off."), [5.0, 0.25]),
    "MNLI": ({"train.tsv": _tsv(MNLI_TRAIN_HEADER, _mnli_row(0, "P0.", "H0.", "neutral", False),
                                _mnli_row(1, "P1.", "H1.", "contradiction", False),
                                _mnli_row(2, "P2.", "H2.", "entailment", False)),
              "dev_matched.tsv": _tsv(MNLI_DEV_HEADER, _mnli_row(0, "a", "b", "entailment", True)),
              "dev_mismatched.tsv": _tsv(MNLI_DEV_HEADER, _mnli_row(0, "c", "d", "neutral", True))},
             ("P0.", "H0."), [1, 2, 0]),
    "QNLI": ({"train.tsv": _tsv(("index", "question", "sentence", "label"),
                                ("0", "Who?", "Him.", "not_entailment"),
                                ("1", "What?", "That.", "entailment")),
              "dev.tsv": _tsv(("index", "question", "sentence", "label"), ("0", "a", "b",
                                                                           "entailment"))},
             ("Who?", "Him."), [1, 0]),
    "RTE": ({"train.tsv": _tsv(("index", "sentence1", "sentence2", "label"),
                               ("0", "A cat sat.", "A cat.", "entailment"),
                               ("1", "x", "y", "not_entailment")),
             "dev.tsv": _tsv(("index", "sentence1", "sentence2", "label"), ("0", "a", "b",
                                                                            "entailment"))},
            ("A cat sat.", "A cat."), [0, 1]),
    "WNLI": ({"train.tsv": _tsv(("index", "sentence1", "sentence2", "label"),
                                ("0", "I hid it.", "It hid.", "0"), ("1", "a", "b", "1")),
              "dev.tsv": _tsv(("index", "sentence1", "sentence2", "label"), ("0", "a", "b", "1"))},
             ("I hid it.", "It hid."), [0, 1]),
}

SUPERGLUE = {
    "BoolQ": ([{"question": "is it", "passage": "It is.", "idx": 0, "label": True},
               {"question": "is not", "passage": "No.", "idx": 1, "label": False}],
              ("It is.", "is it"), [1, 0]),
    "CB": ([{"premise": "P", "hypothesis": "H", "label": "neutral", "idx": 0},
            {"premise": "Q", "hypothesis": "G", "label": "contradiction", "idx": 1}],
           ("P", "H"), [2, 1]),
    "COPA": ([{"premise": "It rained.", "choice1": "A", "choice2": "B", "question": "effect",
               "label": 1, "idx": 0}], ("It rained.", "A", "B", "effect"), [1]),
    "WiC": ([{"word": "bank", "sentence1": "s1", "sentence2": "s2", "start1": 0, "end1": 1,
              "start2": 0, "end2": 1, "label": False, "idx": 0}], ("bank", "s1", "s2"), [0]),
    "SuperGLUE-RTE": ([{"premise": "p", "hypothesis": "h", "label": "not_entailment", "idx": 0}],
                      ("p", "h"), [1]),
    "WSC": ([{"text": "Mark lied to Pete. He was wrong.", "idx": 0, "label": True,
              "target": {"span1_text": "Mark", "span1_index": 0, "span2_text": "He",
                         "span2_index": 4}},
             {"text": "T", "idx": 1, "label": False,
              "target": {"span1_text": "a", "span1_index": 0, "span2_text": "b",
                         "span2_index": 0}}],
            ("Mark lied to Pete. He was wrong.", "Mark", "He"), [1, 0]),
    "MultiRC": ([{"idx": 0, "version": 1.1, "passage": {
                     "text": " Force moves things. ", "questions": [
                     {"question": "What moves things?", "idx": 0, "answers": [
                         {"text": "Force", "idx": 0, "label": 1},
                         {"text": "Nothing", "idx": 1, "label": 0}]},
                     {"question": "Is it fast?", "idx": 1, "answers": [
                         {"text": "Yes", "idx": 2, "label": 0}]}]}},
                 {"idx": 1, "version": 1.1, "passage": {"text": "P2", "questions": [
                     {"question": "Q3", "idx": 2, "answers": [
                         {"text": "A", "idx": 3, "label": 1},
                         {"text": "B", "idx": 4, "label": 1}]}]}}],
                ("Force moves things.", "What moves things?", "Force"), [1, 0, 0, 1, 1]),
}


def _make_glue(root, task, files=None):
  for name, lines in (files or SYNTHETIC[task][0]).items():
    _write(os.path.join(root, glue_tasks.TASKS[task].directory, name), lines)
  return root


def _make_superglue(root, task, rows=None):
  rows = rows or SUPERGLUE[task][0]
  for name in ("train.jsonl", "val.jsonl"):
    _write(os.path.join(root, glue_tasks.TASKS[task].directory, name),
           [json.dumps(r) for r in rows])
  return root


@pytest.fixture(scope="module")
def real_sst2():
  root = (os.environ.get(glue_tasks.GLUE_DIR_ENV) or
          os.path.join(REPO, "..", "shared", "data", "glue"))
  if not os.path.isfile(os.path.join(root, "SST-2", "train.tsv")):
    pytest.skip(f"SST-2 not found under {root}; set {glue_tasks.GLUE_DIR_ENV}")
  return glue_readers.load_task("SST-2", root, verify_counts=True)


def test_real_sst2_matches_published_counts(real_sst2):
  train, dev = real_sst2["train"], real_sst2["dev"]
  assert (len(train), int(train.labels.sum())) == (67_349, 37_569)
  assert (len(dev), int(dev.labels.sum())) == (872, 444)
  assert train.labels.dtype == np.int64 and set(np.unique(train.labels)) == {0, 1}
  assert train.label_names == ("negative", "positive")
  assert train[0].texts == ("hide new secretions from the parental units",)
  assert train[0].label == 0
  assert dev[0].texts == ("it 's a charming and often affecting journey .",) and dev[0].label == 1
  np.testing.assert_array_equal(train.source_rows, np.arange(67_349))
  # Majority class of train is positive (37,569 of 67,349), so the baseline scores 444 / 872.
  baseline = glue_metrics.majority_baseline("SST-2", train.labels, dev.labels)
  assert baseline == {"accuracy": pytest.approx(444 / 872), "prediction": 1.0}
  shot = glue_sampling.few_shot(train, k_per_class=16, seed=13)
  assert np.bincount(shot.labels).tolist() == [16, 16]
  np.testing.assert_array_equal(
      shot.source_rows, glue_sampling.few_shot(train, k_per_class=16, seed=13).source_rows)


@pytest.mark.parametrize("task", list(SYNTHETIC))
def test_glue_layouts(tmp_path, task):
  files, first_texts, labels = SYNTHETIC[task]
  _make_glue(tmp_path, task)
  splits = glue_readers.load_task(task, tmp_path)
  assert set(splits) == set(glue_tasks.TASKS[task].files)
  train = splits["train"]
  assert train[0].texts == first_texts
  np.testing.assert_allclose(train.labels, labels)
  assert len(train.texts) == len(first_texts) == len(train.segment_names)
  assert train.labels.dtype == (np.float32 if task == "STS-B" else np.int64)
  for name, split in splits.items():
    assert len(split) == len(files[glue_tasks.TASKS[task].files[name]]) - (task != "CoLA")


def test_raw_quotes_crlf_and_bom_are_read_verbatim(tmp_path):
  # An unbalanced quote must not swallow the tab or the next line (no CSV quoting).
  lines = _tsv(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
               ("1", "1", "2", '"Quoted text', 'He said "no" .'), ("0", "3", "4", "x", "y"))
  path = os.path.join(tmp_path, "MRPC", "train.tsv")
  _write(path, lines, newline="\r\n", bom=True)
  _write(os.path.join(tmp_path, "MRPC", "dev.tsv"), lines)
  split = glue_readers.load_split("mrpc", "train", tmp_path)
  assert len(split) == 2 and split.labels.tolist() == [1, 0]
  assert split[0].texts == ('"Quoted text', 'He said "no" .')


def test_superglue_jsonl(tmp_path):
  for task, (rows, first_texts, labels) in SUPERGLUE.items():
    _make_superglue(tmp_path, task)
    dev = glue_readers.load_split(task, "dev", tmp_path)
    assert dev.path.endswith(os.path.join(glue_tasks.TASKS[task].directory, "val.jsonl"))
    assert dev[0].texts == first_texts
    np.testing.assert_array_equal(dev.labels, labels)


def test_multirc_is_flattened_per_answer_with_question_groups(tmp_path):
  _make_superglue(tmp_path, "MultiRC")
  split = glue_readers.load_split("MultiRC", "train", tmp_path)
  assert split.segment_names == ("paragraph", "question", "answer")
  assert split.label_names == ("false", "true") and split.num_labels == 2
  assert split.texts[2] == ("Force", "Nothing", "Yes", "A", "B")
  assert split.texts[0] == ("Force moves things.",) * 3 + ("P2",) * 2
  assert split.texts[1][2:] == ("Is it fast?", "Q3", "Q3")
  np.testing.assert_array_equal(split.groups, [0, 0, 1, 2, 2])
  np.testing.assert_array_equal(split.source_rows, np.arange(5))
  sub = split.select([4, 0, 3])
  np.testing.assert_array_equal(sub.groups, [2, 0, 2])
  np.testing.assert_array_equal(sub.labels, [1, 1, 1])
  assert sub[1].texts == ("Force moves things.", "What moves things?", "Force")
  # Other tasks carry no groups, also after select.
  _make_superglue(tmp_path, "WSC")
  wsc = glue_readers.load_split("WSC", "train", tmp_path)
  assert wsc.groups is None and wsc.select([1]).groups is None
  assert wsc[0].segment("span2") == "He" and wsc[0].segment("span1") == "Mark"


def test_bad_multirc_and_wsc_rows_name_the_line(tmp_path):
  def error(task, rows):
    _make_superglue(tmp_path, task, rows)
    with pytest.raises(DataError) as info:
      glue_readers.load_split(task, "train", tmp_path)
    message = str(info.value)
    assert "\n" not in message and "Fix:" in message
    return message
  good = SUPERGLUE["MultiRC"][0][0]
  path = tmp_path / "MultiRC" / "train.jsonl"
  answer = lambda **kw: {"passage": {"text": "P", "questions": [
      {"question": "Q", "answers": [{"text": "A", "label": 0}, kw]}]}}
  assert f"MultiRC file {path} line 2: question 0 answer 1: label '2' is not one of 0, 1." in (
      error("MultiRC", [good, answer(text="B", label=2)]))
  assert "line 2: question 0 answer 1 has no 'label' field" in error(
      "MultiRC", [good, answer(text="B")])
  assert "line 2: question 0 answer 1: field 'text' is missing or not a string" in error(
      "MultiRC", [good, answer(label=1)])
  assert "line 1: passage: field 'questions' is missing, not a list or empty" in error(
      "MultiRC", [{"passage": {"text": "P", "questions": []}}])
  assert "line 1: field 'passage.text' is missing or not a string" in error(
      "MultiRC", [{"passage": "P"}])
  assert "line 1: question 0: field 'answers' is missing" in error(
      "MultiRC", [{"passage": {"text": "P", "questions": [{"question": "Q"}]}}])
  assert "line 1: question 0 is not a JSON object" in error(
      "MultiRC", [{"passage": {"text": "P", "questions": ["Q"]}}])
  assert "line 1: field 'target.span2_text' is missing or not a string" in error(
      "WSC", [{"text": "T", "label": True, "target": {"span1_text": "a"}}])
  assert "line 1: label '\"true\"' is not one of false, true" in error(
      "WSC", [{"text": "T", "label": "true", "target": {"span1_text": "a", "span2_text": "b"}}])


@pytest.mark.parametrize("task, questions", [("WSC", None), ("MultiRC", {"train": 5_131,
                                                                         "dev": 953})])
def test_real_superglue_files_match_published_counts(task, questions):
  root = os.environ.get(glue_tasks.SUPERGLUE_DIR_ENV) or os.path.join(REPO, "..", "shared", "data",
                                                                  "superglue")
  if not os.path.isfile(os.path.join(root, task, "val.jsonl")):
    pytest.skip(f"{task} not found under {root}; set {glue_tasks.SUPERGLUE_DIR_ENV}")
  for split_name, split in glue_readers.load_task(task, root, verify_counts=True).items():
    assert len(split) == glue_tasks.PUBLISHED_ROWS[task][split_name]
    if questions:
      assert np.unique(split.groups).size == questions[split_name]
      assert np.all(np.diff(split.groups) >= 0)  # questions in file order


def test_mnli_mismatched_dev(tmp_path):
  _make_glue(tmp_path, "MNLI")
  mismatched = glue_readers.load_split("MNLI", "dev_mismatched", tmp_path)
  assert mismatched.split == "dev_mismatched" and mismatched.path.endswith("dev_mismatched.tsv")
  assert mismatched[0].texts == ("c", "d") and mismatched.labels.tolist() == [1]
  matched = glue_readers.load_split("mnli", "dev_matched", tmp_path)
  assert matched[0].texts == ("a", "b") and matched.labels.tolist() == [0]
  assert glue_tasks.PUBLISHED_ROWS["MNLI"]["dev_mismatched"] == 9_832


def test_data_dir_from_environment(tmp_path, monkeypatch):
  _make_glue(tmp_path, "RTE")
  monkeypatch.setenv(glue_tasks.GLUE_DIR_ENV, str(tmp_path))
  assert len(glue_readers.load_split("RTE", "train")) == 2
  monkeypatch.delenv(glue_tasks.GLUE_DIR_ENV)
  with pytest.raises(DataError, match="BDIFF_GLUE_DIR is not set"):
    glue_readers.load_split("RTE", "train")
  monkeypatch.delenv(glue_tasks.SUPERGLUE_DIR_ENV, raising=False)
  with pytest.raises(DataError, match="BDIFF_SUPERGLUE_DIR is not set"):
    glue_readers.load_split("CB", "train")


def test_unknown_task_or_split(tmp_path):
  with pytest.raises(ConfigError, match="unknown GLUE/SuperGLUE task 'SST-5'"):
    glue_readers.load_split("SST-5", "train", tmp_path)
  with pytest.raises(ConfigError, match="MNLI has no split 'dev'.*dev_matched, dev_mismatched"):
    glue_readers.load_split("MNLI", "dev", tmp_path)
  with pytest.raises(ConfigError, match="no split 'test'"):
    glue_readers.load_split("RTE", "test", tmp_path)


def _error(tmp_path, task, split, files=None):
  if files is not None:
    _make_glue(tmp_path, task, files)
  with pytest.raises(DataError) as info:
    glue_readers.load_split(task, split, tmp_path)
  message = str(info.value)
  assert "\n" not in message and "Fix:" in message
  return message


def test_missing_task_directory_says_where_to_put_files(tmp_path):
  message = _error(tmp_path, "QNLI", "train")
  assert f"QNLI task directory {tmp_path / 'QNLI'} not found." in message
  assert "train.tsv and dev.tsv" in message and "BDIFF_GLUE_DIR" in message
  assert "download_task('QNLI'" in message


def test_missing_file(tmp_path):
  _write(os.path.join(tmp_path, "RTE", "train.tsv"), SYNTHETIC["RTE"][0]["train.tsv"])
  message = _error(tmp_path, "RTE", "dev")
  assert f"RTE file {tmp_path / 'RTE' / 'dev.tsv'} not found." in message


def test_bad_header(tmp_path):
  bad = {"train.tsv": _tsv(("index", "premise", "hypothesis", "label"),
                           ("0", "a", "b", "entailment"))}
  message = _error(tmp_path, "RTE", "train", bad)
  assert "line 1: header" in message and "lacks column(s) ['sentence1', 'sentence2']" in message


def test_bad_label_names_the_line(tmp_path):
  bad = {"train.tsv": _tsv(("sentence", "label"), ("good", "1"), ("bad", "0"),
                           ("meh", "positive"))}
  message = _error(tmp_path, "SST-2", "train", bad)
  path = tmp_path / "SST-2" / "train.tsv"
  assert f"SST-2 file {path} line 4: label 'positive' is not one of 0, 1." in message


def test_bad_score_and_wrong_field_count(tmp_path):
  rows = SYNTHETIC["STS-B"][0]["train.tsv"] + _tsv(("2", "g", "f", "y", "o", "s", "s", "a", "b",
                                                    "7.5"))
  assert "line 4: label '7.5' is not a number in [0, 5]" in _error(
      tmp_path, "STS-B", "train", {"train.tsv": rows})
  rows = SYNTHETIC["CoLA"][0]["train.tsv"] + ["src\t1\tno sentence"]
  assert "line 3 has 3 tab-separated fields, expected 4" in _error(
      tmp_path, "CoLA", "train", {"train.tsv": rows})


def test_empty_and_header_only_files(tmp_path):
  assert "is empty (no header row)" in _error(tmp_path, "SST-2", "train", {"train.tsv": []})
  assert "has no examples" in _error(tmp_path, "SST-2", "train",
                                     {"train.tsv": ["sentence\tlabel"]})
  assert "has no examples" in _error(tmp_path, "CoLA", "dev", {"dev.tsv": ["", ""]})


def test_bad_utf8_names_the_line(tmp_path):
  path = tmp_path / "SST-2" / "dev.tsv"
  os.makedirs(path.parent)
  path.write_bytes(b"sentence\tlabel\nfine\t1\nbad \xff byte\t0\n")
  assert "line 3 is not valid UTF-8" in _error(tmp_path, "SST-2", "dev")


def test_bad_jsonl_rows(tmp_path):
  def error(task, rows):
    _make_superglue(tmp_path, task, rows)
    with pytest.raises(DataError) as info:
      glue_readers.load_split(task, "train", tmp_path)
    return str(info.value)
  # BoolQ labels are JSON booleans; 1 is not one of them.
  assert "line 1: label '1' is not one of false, true" in error(
      "BoolQ", [{"question": "q", "passage": "p", "label": 1}])
  assert "line 2: field 'hypothesis' is missing" in error(
      "CB", [{"premise": "p", "hypothesis": "h", "label": "neutral"}, {"premise": "p"}])
  _write(os.path.join(tmp_path, "WiC", "train.jsonl"), ['{"word": "a",'])
  with pytest.raises(DataError, match="line 1 is not valid JSON"):
    glue_readers.load_split("WiC", "train", tmp_path)


def test_verify_counts(tmp_path):
  _make_glue(tmp_path, "WNLI")
  with pytest.raises(DataError, match="has 2 examples; the published WNLI train split has 635"):
    glue_readers.load_split("WNLI", "train", tmp_path, verify_counts=True)
  assert len(glue_readers.load_split("WNLI", "train", tmp_path)) == 2


# --- few-shot sampling -----------------------------------------------------------------------

def _toy_split(labels, task="MNLI"):
  labels = np.asarray(labels)
  n = len(labels)
  spec = glue_tasks.TASKS[task]
  texts = tuple(tuple(f"{name}{i}" for i in range(n)) for name in spec.segment_names)
  return glue_tasks.GlueSplit(task=task, split="train", texts=texts,
                        labels=labels.astype(np.float32 if spec.is_regression else np.int64),
                        label_names=spec.label_names, segment_names=spec.segment_names,
                        source_rows=np.arange(n) + 100, path="toy")


def test_few_shot_is_balanced_deterministic_and_seeded():
  split = _toy_split(np.arange(300) % 3)
  a = glue_sampling.few_shot(split, k_per_class=16, seed=13)
  b = glue_sampling.few_shot(split, k_per_class=16, seed=13)
  c = glue_sampling.few_shot(split, k_per_class=16, seed=21)
  assert np.bincount(a.labels).tolist() == [16, 16, 16]
  np.testing.assert_array_equal(a.source_rows, b.source_rows)
  assert not np.array_equal(a.source_rows, c.source_rows)
  assert np.all(np.diff(a.source_rows) > 0)            # file order
  # Texts and labels travel together.
  i = int(a.source_rows[5]) - 100
  assert a[5].texts == (f"premise{i}", f"hypothesis{i}") and a[5].label == i % 3


def test_few_shot_with_selection_is_disjoint_and_extends_few_shot():
  split = _toy_split(np.arange(200) % 2, task="RTE")
  train, selection = glue_sampling.few_shot_with_selection(split, k_per_class=8, seed=42)
  np.testing.assert_array_equal(
      train.source_rows, glue_sampling.few_shot(split, k_per_class=8, seed=42).source_rows)
  assert np.bincount(selection.labels).tolist() == [8, 8]
  assert not set(train.source_rows) & set(selection.source_rows)


def test_few_shot_stsb_stratifies_by_score_half():
  scores = np.linspace(0.0, 5.0, 101)            # 50 below 2.5, 51 at or above
  shot = glue_sampling.few_shot(_toy_split(scores, task="STS-B"), k_per_class=4, seed=0)
  assert len(shot) == 8
  assert int(np.sum(shot.labels < 2.5)) == 4 and int(np.sum(shot.labels >= 2.5)) == 4


def test_few_shot_rejects_bad_requests():
  split = _toy_split([0] * 20 + [1] * 3, task="RTE")
  with pytest.raises(ConfigError, match="only 3 examples of class 1, fewer than the 16"):
    glue_sampling.few_shot(split, 16)
  with pytest.raises(ConfigError, match="only 3 examples of class 1, fewer than the 6 per class"):
    glue_sampling.few_shot_with_selection(split, 3)
  # A class missing altogether (MNLI has 3) is caught too.
  with pytest.raises(ConfigError, match="only 0 examples of class 2"):
    glue_sampling.few_shot(_toy_split(np.arange(20) % 2), 2)
  with pytest.raises(ConfigError, match="k_per_class=0 must be a positive integer"):
    glue_sampling.few_shot(split, 0)


def test_subsample():
  split = _toy_split(np.arange(50) % 3)
  a = glue_sampling.subsample(split, n=10, seed=1)
  assert len(a) == 10 and len(set(a.source_rows)) == 10
  np.testing.assert_array_equal(a.source_rows, glue_sampling.subsample(split, 10, 1).source_rows)
  assert not np.array_equal(a.source_rows, glue_sampling.subsample(split, 10, 2).source_rows)
  assert glue_sampling.subsample(split, n=1000, seed=1) is split


def test_holdout_partitions_train():
  split = _toy_split(np.arange(40) % 2, task="RTE")
  rest, sel = glue_sampling.holdout(split, 0.25, seed=3)
  assert (len(rest), len(sel)) == (30, 10)
  assert sorted(np.concatenate([rest.source_rows, sel.source_rows])) == list(range(100, 140))
  rest2, sel2 = glue_sampling.holdout(split, 10, seed=3)
  np.testing.assert_array_equal(sel.source_rows, sel2.source_rows)
  assert not np.array_equal(sel.source_rows, glue_sampling.holdout(split, 10, 4)[1].source_rows)
  for bad in (0, 40, 1.0, 0.0):
    with pytest.raises(ConfigError):
      glue_sampling.holdout(split, bad)


# --- downloading (offline: file:// URLs) -------------------------------------------------------

def _zip_task(tmp_path, folder, files):
  path = tmp_path / "src.zip"
  with zipfile.ZipFile(path, "w") as z:
    for name, lines in files.items():
      z.writestr(f"{folder}/{name}", "".join(line + "\n" for line in lines))
    z.writestr("unrelated/readme.txt", "x")
  return path.as_uri()


def test_download_task_from_zip_url(tmp_path):
  url = _zip_task(tmp_path, "RTE", SYNTHETIC["RTE"][0])
  root = tmp_path / "glue"
  task_dir = glue_download.download_task("RTE", root, url=url, verify_counts=False)
  assert task_dir == str(root / "RTE") and sorted(os.listdir(root)) == ["RTE"]
  assert len(glue_readers.load_split("RTE", "train", root)) == 2
  # Present now: no fetch happens (the URL no longer exists).
  os.remove(tmp_path / "src.zip")
  assert glue_download.download_task("RTE", root, url=url) == task_dir


def test_download_failures_leave_nothing_behind(tmp_path):
  root = tmp_path / "glue"
  with pytest.raises(DataError, match=r"could not download WNLI from .*missing\.zip.*Fix: put"):
    glue_download.download_task("WNLI", root, url=(tmp_path / "missing.zip").as_uri())
  url = _zip_task(tmp_path, "NOT-WNLI", SYNTHETIC["WNLI"][0])
  with pytest.raises(DataError, match="has no WNLI/ folder"):
    glue_download.download_task("WNLI", root, url=url)
  url = _zip_task(tmp_path, "WNLI", SYNTHETIC["WNLI"][0])
  with pytest.raises(DataError, match="published WNLI train split has 635"):
    glue_download.download_task("WNLI", root, url=url)
  assert os.listdir(root) == []
  os.makedirs(root / "WNLI")
  with pytest.raises(DataError, match="exists but lacks train.tsv, dev.tsv; not overwriting"):
    glue_download.download_task("WNLI", root, url=url)


def test_build_mrpc_splits_by_dev_ids(tmp_path):
  header = ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
  msr = tmp_path / "msr_paraphrase_train.txt"
  _write(str(msr), _tsv(header, ("1", "10", "11", "A.", "B."), ("0", "20", "21", 'C "q".', "D."),
                        ("1", "30", "31", "E.", "F.")), newline="\r\n", bom=True)
  ids = tmp_path / "dev_ids.tsv"
  _write(str(ids), _tsv(("20", "21")))
  glue_download.build_mrpc(str(msr), str(ids), str(tmp_path / "MRPC"))
  train = glue_readers.load_split("MRPC", "train", tmp_path)
  dev = glue_readers.load_split("MRPC", "dev", tmp_path)
  assert train.texts == (("A.", "E."), ("B.", "F.")) and train.labels.tolist() == [1, 1]
  assert dev.texts == (('C "q".',), ("D.",)) and dev.labels.tolist() == [0]


def test_every_task_has_a_download_source():
  """Each task the readers know can be fetched (WSC and MultiRC had no entry: KeyError)."""
  assert set(glue_download.ZIP_URLS) | {"MRPC"} == set(glue_tasks.TASKS)
