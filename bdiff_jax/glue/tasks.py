"""GLUE and SuperGLUE readers: one labelled split as a `GlueSplit`, checked row by row.

(Longer than 400 lines because the column layout of each of the 16 tasks is documented here,
next to the table-driven readers that use it.)

GLUE tasks are read from the layout the GLUE benchmark distributes: `<glue_dir>/<TASK>/train.tsv`
and `dev.tsv` (MNLI: `dev_matched.tsv`, `dev_mismatched.tsv`), UTF-8, one row per line, fields
separated by tabs, **no quoting** (the files contain raw `"` characters, so a CSV reader with
quoting on would merge rows). Columns are found by header name, so MNLI's train (12 columns) and
dev (16 columns) files are read by the same spec. Every row must have exactly as many fields as
the header. The test files carry no labels and are not read.

Per task: the header (columns used in **bold**), then the file's label -> class id:

  CoLA   no header; 4 columns: source, **label**, original mark, **sentence**; 0 unacceptable,
         1 acceptable.
  SST-2  **sentence**, **label**; 0 negative, 1 positive.
  MRPC   **Quality**, #1 ID, #2 ID, **#1 String**, **#2 String**; 0 not_equivalent, 1 equivalent.
  QQP    id, qid1, qid2, **question1**, **question2**, **is_duplicate**; 0 not_duplicate,
         1 duplicate.
  STS-B  index, genre, filename, year, old_index, source1, source2, **sentence1**, **sentence2**,
         **score**; a float in [0, 5] (regression).
  MNLI   index, promptID, pairID, genre, sentence{1,2}_binary_parse, sentence{1,2}_parse,
         **sentence1**, **sentence2**, label1 (dev: label1..label5), **gold_label**;
         entailment 0, neutral 1, contradiction 2.
  QNLI   index, **question**, **sentence**, **label**; entailment 0, not_entailment 1.
  RTE    index, **sentence1**, **sentence2**, **label**; entailment 0, not_entailment 1.
  WNLI   index, **sentence1**, **sentence2**, **label**; 0 not_entailment, 1 entailment.

(Layouts as the GLUE baselines, jiant and the Hugging Face `glue` loader read them; class ids
follow the Hugging Face `glue` ClassLabel order. MRPC's header may start with a UTF-8 byte-order
mark, copied from Microsoft's source file by GLUE's download script; it is ignored.)

SuperGLUE "+" tasks are read from `<superglue_dir>/<Task>/train.jsonl` and `val.jsonl` (our split
name `dev`), one JSON object per line; segments are JSON string fields (`a.b`: field b of the
object in field a), `label` maps to class ids:

  BoolQ          BoolQ/  passage, question; false 0, true 1.
  CB             CB/     premise, hypothesis; "entailment" 0, "contradiction" 1, "neutral" 2.
  COPA           COPA/   premise, choice1, choice2, question ("cause"/"effect"); 0, 1 (the
                         correct choice).
  WiC            WiC/    word, sentence1, sentence2; false 0, true 1.
  SuperGLUE-RTE  RTE/    premise, hypothesis; "entailment" 0, "not_entailment" 1.
  WSC            WSC/    text, target.span1_text (segment "span1", the noun phrase),
                         target.span2_text ("span2", the pronoun); false 0, true 1 (the pronoun
                         refers to the noun phrase).
  MultiRC        MultiRC/ nested, one passage a line: passage.text, passage.questions[] with
                         question and answers[] with text and label (0, 1). Flattened to one
                         binary example per answer, segments ("paragraph", "question",
                         "answer"); label 0 false, 1 true (the answer is correct).
                         `GlueSplit.groups` holds each example's question: its 0-based position
                         among the file's questions, in file order (what MultiRC's exact match
                         groups by; see glue_metrics.multirc_metrics).

The data root is an argument (`glue_dir`, a config value) or, when empty, the environment:
`BDIFF_GLUE_DIR` for GLUE tasks and `BDIFF_SUPERGLUE_DIR` for SuperGLUE tasks. With
`verify_counts`, a split must have the published number of rows (`PUBLISHED_ROWS`, the counts of
the Hugging Face `glue`/`super_glue` builders of these same files). Every problem raises
`DataError` with one line naming the file (and the line for a bad row) and the fix; nothing here
touches the network (see `glue_download` for fetching missing tasks).
"""

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from bdiff_jax.errors import ConfigError, DataError

GLUE_DIR_ENV = "BDIFF_GLUE_DIR"
SUPERGLUE_DIR_ENV = "BDIFF_SUPERGLUE_DIR"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """Where one task's files are and how a row becomes (segments, label).

  Attributes:
    name: canonical task name ("SST-2", "SuperGLUE-RTE", ...).
    benchmark: "glue" (TSV) or "superglue" (JSONL; MultiRC nested, read by `_read_multirc`).
    directory: the task's directory under the data root.
    files: split name -> file name in that directory.
    header: for TSV tasks, the header columns that must be present; None: no header row.
    num_columns: for header-less TSV files, the exact number of fields per row.
    segment_columns: header names (TSV), column indices (header-less TSV) or JSON keys of the
      text segments, in order (a tuple of keys: a field of a nested object).
    segment_names: the segments' names in `GlueSplit`/`Example`.
    label_column: header name, column index or JSON key of the label.
    raw_labels: how each class is written in the file (JSON tasks: `json.dumps` of the value);
      index = class id. Empty for regression.
    label_names: class id -> readable name. Empty for regression.
    label_range: for regression, the closed interval a label must lie in.
  """
  name: str
  benchmark: str
  directory: str
  files: dict[str, str]
  header: tuple[str, ...] | None
  num_columns: int | None
  segment_columns: tuple[Any, ...]
  segment_names: tuple[str, ...]
  label_column: Any
  raw_labels: tuple[str, ...]
  label_names: tuple[str, ...]
  label_range: tuple[float, float] | None = None

  @property
  def is_regression(self) -> bool:
    return not self.label_names

  @property
  def num_labels(self) -> int:
    """Number of classes; 1 for regression."""
    return len(self.label_names) or 1

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self.files)


_TSV = {"train": "train.tsv", "dev": "dev.tsv"}
_JSONL = {"train": "train.jsonl", "dev": "val.jsonl"}
_NLI2 = ("entailment", "not_entailment")


def _glue(name, header, segments, segment_names, label, raw, names, files=None, **kw):
  return TaskSpec(name=name, benchmark="glue", directory=name, files=dict(files or _TSV),
                  header=header, num_columns=kw.pop("num_columns", None),
                  segment_columns=segments, segment_names=segment_names, label_column=label,
                  raw_labels=raw, label_names=names, **kw)


def _superglue(name, directory, segments, raw, names, segment_names=None):
  return TaskSpec(name=name, benchmark="superglue", directory=directory, files=dict(_JSONL),
                  header=None, num_columns=None, segment_columns=segments,
                  segment_names=segment_names or segments, label_column="label", raw_labels=raw,
                  label_names=names)


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    _glue("CoLA", None, (3,), ("sentence",), 1, ("0", "1"), ("unacceptable", "acceptable"),
          num_columns=4),
    _glue("SST-2", ("sentence", "label"), ("sentence",), ("sentence",), "label", ("0", "1"),
          ("negative", "positive")),
    _glue("MRPC", ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
          ("#1 String", "#2 String"), ("sentence1", "sentence2"), "Quality", ("0", "1"),
          ("not_equivalent", "equivalent")),
    _glue("QQP", ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
          ("question1", "question2"), ("question1", "question2"), "is_duplicate", ("0", "1"),
          ("not_duplicate", "duplicate")),
    _glue("STS-B", ("sentence1", "sentence2", "score"), ("sentence1", "sentence2"),
          ("sentence1", "sentence2"), "score", (), (), label_range=(0.0, 5.0)),
    _glue("MNLI", ("sentence1", "sentence2", "gold_label"), ("sentence1", "sentence2"),
          ("premise", "hypothesis"), "gold_label", ("entailment", "neutral", "contradiction"),
          ("entailment", "neutral", "contradiction"),
          files={"train": "train.tsv", "dev_matched": "dev_matched.tsv",
                 "dev_mismatched": "dev_mismatched.tsv"}),
    _glue("QNLI", ("question", "sentence", "label"), ("question", "sentence"),
          ("question", "sentence"), "label", _NLI2, _NLI2),
    _glue("RTE", ("sentence1", "sentence2", "label"), ("sentence1", "sentence2"),
          ("sentence1", "sentence2"), "label", _NLI2, _NLI2),
    _glue("WNLI", ("sentence1", "sentence2", "label"), ("sentence1", "sentence2"),
          ("sentence1", "sentence2"), "label", ("0", "1"), ("not_entailment", "entailment")),
    _superglue("BoolQ", "BoolQ", ("passage", "question"), ("false", "true"), ("false", "true")),
    _superglue("CB", "CB", ("premise", "hypothesis"),
               ('"entailment"', '"contradiction"', '"neutral"'),
               ("entailment", "contradiction", "neutral")),
    _superglue("COPA", "COPA", ("premise", "choice1", "choice2", "question"), ("0", "1"),
               ("choice1", "choice2")),
    _superglue("WiC", "WiC", ("word", "sentence1", "sentence2"), ("false", "true"),
               ("false", "true")),
    _superglue("SuperGLUE-RTE", "RTE", ("premise", "hypothesis"), ('"entailment"',
                                                                   '"not_entailment"'), _NLI2),
    _superglue("WSC", "WSC", ("text", ("target", "span1_text"), ("target", "span2_text")),
               ("false", "true"), ("false", "true"), segment_names=("text", "span1", "span2")),
    _superglue("MultiRC", "MultiRC", (("passage", "text"), "question", "text"), ("0", "1"),
               ("false", "true"), segment_names=("paragraph", "question", "answer")),
)}

GLUE_TASKS = tuple(n for n, t in TASKS.items() if t.benchmark == "glue")
SUPERGLUE_TASKS = tuple(n for n, t in TASKS.items() if t.benchmark == "superglue")

# Labelled rows per split (Hugging Face `glue` / `super_glue` dataset_infos of the same files).
PUBLISHED_ROWS: dict[str, dict[str, int]] = {
    "CoLA": {"train": 8_551, "dev": 1_043},
    "SST-2": {"train": 67_349, "dev": 872},
    "MRPC": {"train": 3_668, "dev": 408},
    "QQP": {"train": 363_846, "dev": 40_430},
    "STS-B": {"train": 5_749, "dev": 1_500},
    "MNLI": {"train": 392_702, "dev_matched": 9_815, "dev_mismatched": 9_832},
    "QNLI": {"train": 104_743, "dev": 5_463},
    "RTE": {"train": 2_490, "dev": 277},
    "WNLI": {"train": 635, "dev": 71},
    "BoolQ": {"train": 9_427, "dev": 3_270},
    "CB": {"train": 250, "dev": 56},
    "COPA": {"train": 400, "dev": 100},
    "WiC": {"train": 5_428, "dev": 638},
    "SuperGLUE-RTE": {"train": 2_490, "dev": 277},
    "WSC": {"train": 554, "dev": 104},
    # MultiRC: answers (in 456 / 83 passages, 5,131 / 953 questions).
    "MultiRC": {"train": 27_243, "dev": 4_848},
}


@dataclasses.dataclass(frozen=True)
class Example:
  """One labelled example: its text segments (in the task's order) and label."""
  task: str
  texts: tuple[str, ...]
  label: int | float
  segment_names: tuple[str, ...]

  def segment(self, name: str) -> str:
    """The text of the segment called `name` (e.g. "premise")."""
    return self.texts[self.segment_names.index(name)]


@dataclasses.dataclass(frozen=True, eq=False)
class GlueSplit:
  """One labelled split of a task.

  Attributes:
    task: canonical task name.
    split: "train", "dev" (MNLI: "dev_matched" / "dev_mismatched").
    texts: one tuple per segment, each holding that segment of every example:
      `texts[s][i]` is segment s of example i (whitespace-stripped).
    labels: (num_examples,) int64 class ids, or float32 scores for regression (STS-B).
    label_names: class id -> name; () for regression.
    segment_names: the segments' names, e.g. ("premise", "hypothesis").
    source_rows: (num_examples,) int64, each example's 0-based position among the data rows of
      the file (MultiRC: among the file's answers, in file order), so subsets made by `select`
      can be traced back to the file.
    path: the file read.
    groups: MultiRC: (num_examples,) int64, each example's question (its 0-based position among
      the file's questions); the examples of one question share it. None for other tasks.
  """
  task: str
  split: str
  texts: tuple[tuple[str, ...], ...]
  labels: np.ndarray
  label_names: tuple[str, ...]
  segment_names: tuple[str, ...]
  source_rows: np.ndarray
  path: str
  groups: np.ndarray | None = None

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def __getitem__(self, i: int) -> Example:
    label = self.labels[i]
    return Example(task=self.task, texts=tuple(seg[i] for seg in self.texts),
                   label=float(label) if self.is_regression else int(label),
                   segment_names=self.segment_names)

  @property
  def is_regression(self) -> bool:
    return not self.label_names

  @property
  def num_labels(self) -> int:
    """Number of classes; 1 for regression."""
    return len(self.label_names) or 1

  def select(self, indices: Sequence[int] | np.ndarray) -> "GlueSplit":
    """The examples at `indices` (positions in this split), in that order."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
      raise IndexError(f"indices out of range for a split of {len(self)} examples")
    return dataclasses.replace(
        self, texts=tuple(tuple(seg[i] for i in idx) for seg in self.texts),
        labels=self.labels[idx], source_rows=self.source_rows[idx],
        groups=None if self.groups is None else self.groups[idx])


def task_spec(task: str) -> TaskSpec:
  """The spec of `task` (case-insensitive; "SST2", "sts-b", "mnli" all work)."""
  key = task.replace("-", "").replace("_", "").lower()
  for name, spec in TASKS.items():
    if name.replace("-", "").lower() == key:
      return spec
  raise ConfigError(f"unknown GLUE/SuperGLUE task {task!r}.",
                    f"use one of {', '.join(TASKS)}.")


def resolve_data_dir(task: str, glue_dir: str | os.PathLike | None = None) -> str:
  """The data root for `task`: `glue_dir` if given, else the benchmark's environment variable."""
  spec = task_spec(task)
  if glue_dir:
    return os.fspath(glue_dir)
  env = GLUE_DIR_ENV if spec.benchmark == "glue" else SUPERGLUE_DIR_ENV
  value = os.environ.get(env, "")
  if not value:
    raise DataError(f"no {spec.benchmark.upper()} data directory given for {spec.name} "
                    f"(glue_dir is empty and {env} is not set).", location_fix(spec, "<dir>"))
  return value


def location_fix(spec: TaskSpec, root: str) -> str:
  """The fix for a missing or broken task: where its files go and how to point at them."""
  env = GLUE_DIR_ENV if spec.benchmark == "glue" else SUPERGLUE_DIR_ENV
  names = " and ".join(spec.files.values())
  return (f"put {spec.name}'s {names} in {os.path.join(root, spec.directory)}/ (the official "
          f"{spec.benchmark.upper()} zip unpacked; online, "
          f"bdiff_jax.glue.download.download_task({spec.name!r}, root) does this), then pass "
          f"that root as glue_dir or set {env}.")


def split_path(task: str, split: str, glue_dir: str | os.PathLike | None = None) -> str:
  """The file holding `split` of `task` (not checked for existence)."""
  spec = task_spec(task)
  if split not in spec.files:
    raise ConfigError(f"{spec.name} has no split {split!r}.",
                      f"use one of {', '.join(spec.splits)}.")
  return os.path.join(resolve_data_dir(task, glue_dir), spec.directory, spec.files[split])


def _read_lines(path: str, spec: TaskSpec, root: str) -> list[str]:
  """The file's lines (without line ends); trailing blank lines dropped."""
  fix = location_fix(spec, root)
  task_dir = os.path.dirname(path)
  if not os.path.isdir(task_dir):
    raise DataError(f"{spec.name} task directory {task_dir} not found.", fix)
  if not os.path.isfile(path):
    raise DataError(f"{spec.name} file {path} not found.", fix)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataError(f"{spec.name} file {path} cannot be read: {e.strerror}.", fix) from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"{spec.name} file {path} line {line} is not valid UTF-8 ({e.reason}).",
                    fix) from None
  lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
  while lines and not lines[-1].strip():
    lines.pop()
  if lines and lines[0].startswith("\ufeff"):
    lines[0] = lines[0][1:]
  return lines


def _parse_label(spec: TaskSpec, raw: str, where: str, fix: str) -> int | float:
  if spec.is_regression:
    try:
      value = float(raw)
    except ValueError:
      value = math.nan
    lo, hi = spec.label_range
    if not (math.isfinite(value) and lo <= value <= hi):
      raise DataError(f"{where}: label {raw!r} is not a number in [{lo:g}, {hi:g}].", fix)
    return value
  try:
    return spec.raw_labels.index(raw)
  except ValueError:
    raise DataError(f"{where}: label {raw!r} is not one of {', '.join(spec.raw_labels)}.",
                    fix) from None


def _read_tsv(path, spec, root):
  lines = _read_lines(path, spec, root)
  fix = (f"repair or re-download {spec.name} (the official GLUE zip; fields are tab-separated, "
         f"no quoting).")
  first = 0
  if spec.header is None:
    width = spec.num_columns
    seg_idx, label_idx = spec.segment_columns, spec.label_column
  else:
    if not lines:
      raise DataError(f"{spec.name} file {path} is empty (no header row).", fix)
    header = lines[0].split("\t")
    missing = [c for c in spec.header if c not in header]
    if missing:
      raise DataError(f"{spec.name} file {path} line 1: header {header[:12]} lacks column(s) "
                      f"{missing} (expected {list(spec.header)}).", fix)
    width = len(header)
    seg_idx = tuple(header.index(c) for c in spec.segment_columns)
    label_idx = header.index(spec.label_column)
    first = 1
  segments = [[] for _ in seg_idx]
  labels = []
  for n in range(first, len(lines)):
    fields = lines[n].split("\t")
    where = f"{spec.name} file {path} line {n + 1}"
    if len(fields) != width:
      raise DataError(f"{where} has {len(fields)} tab-separated fields, expected {width}.", fix)
    for seg, i in zip(segments, seg_idx):
      seg.append(fields[i].strip())
    labels.append(_parse_label(spec, fields[label_idx].strip(), where, fix))
  return segments, labels, None


def _jsonl_fix(spec):
  return (f"repair or re-download {spec.name} (the official SuperGLUE v2 zip, one JSON object "
          "a line).")


def _json_rows(path, spec, root):
  """(line number, where, object) of each line of a JSONL file."""
  fix = _jsonl_fix(spec)
  for n, line in enumerate(_read_lines(path, spec, root)):
    where = f"{spec.name} file {path} line {n + 1}"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where} is not valid JSON ({e.msg}).", fix) from None
    if not isinstance(row, dict):
      raise DataError(f"{where} is not a JSON object.", fix)
    yield where, row


def _string_field(row: dict, key, where: str, fix: str) -> str:
  """`row[key]` (key: a name, or a tuple of names into nested objects), a string, stripped."""
  value = row
  for k in key if isinstance(key, tuple) else (key,):
    value = value.get(k) if isinstance(value, dict) else None
  if not isinstance(value, str):
    name = ".".join(key) if isinstance(key, tuple) else key
    raise DataError(f"{where}: field {name!r} is missing or not a string.", fix)
  return value.strip()


def _label_field(spec, row: dict, where: str, fix: str) -> int | float:
  if "label" not in row:
    raise DataError(f"{where} has no 'label' field (test files are unlabelled).", fix)
  return _parse_label(spec, json.dumps(row["label"]), where, fix)


def _read_jsonl(path, spec, root):
  fix = _jsonl_fix(spec)
  segments = [[] for _ in spec.segment_columns]
  labels = []
  for where, row in _json_rows(path, spec, root):
    for seg, key in zip(segments, spec.segment_columns):
      seg.append(_string_field(row, key, where, fix))
    labels.append(_label_field(spec, row, where, fix))
  return segments, labels, None


def _json_list(obj: dict, key: str, where: str, fix: str) -> list:
  value = obj.get(key)
  if not isinstance(value, list) or not value:
    raise DataError(f"{where}: field {key!r} is missing, not a list or empty.", fix)
  return value


def _read_multirc(path, spec, root):
  """MultiRC's passages flattened to one example per answer; groups = question positions."""
  fix = _jsonl_fix(spec)
  segments = [[], [], []]
  labels, groups = [], []
  question_id = 0
  for where, row in _json_rows(path, spec, root):
    paragraph = _string_field(row, ("passage", "text"), where, fix)
    questions = _json_list(row.get("passage") or {}, "questions", f"{where}: passage", fix)
    for qn, question in enumerate(questions):
      q_where = f"{where}: question {qn}"
      if not isinstance(question, dict):
        raise DataError(f"{q_where} is not a JSON object.", fix)
      text = _string_field(question, "question", q_where, fix)
      for an, answer in enumerate(_json_list(question, "answers", q_where, fix)):
        a_where = f"{q_where} answer {an}"
        if not isinstance(answer, dict):
          raise DataError(f"{a_where} is not a JSON object.", fix)
        for seg, value in zip(segments, (paragraph, text,
                                         _string_field(answer, "text", a_where, fix))):
          seg.append(value)
        labels.append(_label_field(spec, answer, a_where, fix))
        groups.append(question_id)
      question_id += 1
  return segments, labels, groups


def load_split(task: str, split: str, glue_dir: str | os.PathLike | None = None, *,
               verify_counts: bool = False) -> GlueSplit:
  """Reads and checks one labelled split.

  Args:
    task: a name in `TASKS` (case-insensitive, hyphens optional).
    split: "train" or "dev" (MNLI: "train", "dev_matched", "dev_mismatched").
    glue_dir: the data root holding `<TASK>/`; empty or None: `BDIFF_GLUE_DIR` (GLUE tasks) or
      `BDIFF_SUPERGLUE_DIR` (SuperGLUE tasks).
    verify_counts: also require the published number of rows (`PUBLISHED_ROWS`).

  Returns:
    The split, examples in file order.

  Raises:
    ConfigError: unknown task or split.
    DataError: missing directory/file, bad UTF-8, missing header columns, a row with the wrong
      number of fields, a label outside the task's label set, no rows, or (verify_counts) a row
      count other than the published one. One line naming the file (and line) and the fix.
  """
  spec = task_spec(task)
  path = split_path(spec.name, split, glue_dir)
  root = os.path.dirname(os.path.dirname(path))
  if spec.benchmark == "glue":
    reader = _read_tsv
  else:
    reader = _read_multirc if spec.name == "MultiRC" else _read_jsonl
  segments, labels, groups = reader(path, spec, root)
  if not labels:
    raise DataError(f"{spec.name} file {path} has no examples.",
                    f"re-download {spec.name}: the file is empty or holds only a header.")
  expected = PUBLISHED_ROWS[spec.name][split]
  if verify_counts and len(labels) != expected:
    raise DataError(f"{spec.name} file {path} has {len(labels):,} examples; the published "
                    f"{spec.name} {split} split has {expected:,}.",
                    f"re-download {spec.name}, or pass verify_counts=False for a modified copy.")
  dtype = np.float32 if spec.is_regression else np.int64
  return GlueSplit(task=spec.name, split=split, texts=tuple(tuple(s) for s in segments),
                   labels=np.asarray(labels, dtype=dtype), label_names=spec.label_names,
                   segment_names=spec.segment_names,
                   source_rows=np.arange(len(labels), dtype=np.int64), path=path,
                   groups=None if groups is None else np.asarray(groups, dtype=np.int64))


def load_task(task: str, glue_dir: str | os.PathLike | None = None, *,
              verify_counts: bool = False) -> dict[str, GlueSplit]:
  """All labelled splits of `task`, by split name (see `load_split`)."""
  spec = task_spec(task)
  return {s: load_split(spec.name, s, glue_dir, verify_counts=verify_counts) for s in spec.splits}
