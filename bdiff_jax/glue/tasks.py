"""The GLUE and SuperGLUE tasks: each task's files, columns and labels (`TASKS`, `task_spec`),
where its data lives (`split_path`), and the labelled split (`GlueSplit`, `Example`).

The readers in `glue.readers` are driven by this table; what they check is described here, next
to the column layout of each of the 16 tasks.

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
                         groups by; see glue.metrics.multirc_metrics).

The data root is an argument (`glue_dir`, a config value) or, when empty, the environment:
`BDIFF_GLUE_DIR` for GLUE tasks and `BDIFF_SUPERGLUE_DIR` for SuperGLUE tasks. With
`verify_counts`, a split must have the published number of rows (`PUBLISHED_ROWS`, the counts of
the Hugging Face `glue`/`super_glue` builders of these same files). Every problem raises
`DataError` with one line naming the file (and the line for a bad row) and the fix; nothing here
touches the network (see `glue.download` for fetching missing tasks).
"""

import dataclasses
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
