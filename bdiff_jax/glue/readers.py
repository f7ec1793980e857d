"""Reading one labelled GLUE / SuperGLUE split as a `GlueSplit`, checked row by row.

`load_split(task, split, glue_dir)` and `load_task(task, glue_dir)`: TSV files for GLUE tasks,
JSON lines for SuperGLUE ones (MultiRC's nested passages flattened to one example per answer),
laid out and labelled as `glue.tasks` describes. Every problem raises `DataError` with one line
naming the file (and the line for a bad row) and the fix.
"""

import json
import math
import os

import numpy as np

from bdiff_jax.errors import DataError
from bdiff_jax.glue.tasks import (PUBLISHED_ROWS, GlueSplit, TaskSpec, location_fix, split_path,
                                  task_spec)


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
