"""Append-only JSONL metrics in the workdir (`metrics.jsonl`), one JSON object per line.

Each record has `kind` ("train", "eval", ...), `step` and `time`. A run that crashed after its
last checkpoint and was resumed would log the steps after that checkpoint twice, so:
  * on resume, the loop calls `MetricsLog.truncate_after(restored_step)`, which atomically
    rewrites the file without the records of later steps (and without a line torn by a crash);
  * `read` keeps one record per (kind, step), the last one written, so plots and the comparison
    harness never see duplicates even in a file that was not truncated.
A line that is not a JSON object (torn by a crash or a full disk) is skipped with a warning by
`read` and dropped by `truncate_after`; `write` starts a new line after such a torn tail, so the
records written after it stay intact.
"""

import json
import logging
import math
import os
import time
from typing import Any, Optional

import jax
import numpy as np

from bdiff_jax.runtime import platform_info
from bdiff_jax.runtime.workdir import os_error_to_user_error


def _clean(v):
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricsLog:
  """Appends records to `<workdir>/<filename>`."""

  def __init__(self, workdir: str, filename: str = "metrics.jsonl"):
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise os_error_to_user_error(e, f"creating {workdir}") from None
    self.path = os.path.join(workdir, filename)

  def write(self, kind: str, step: int, **values) -> None:
    record = {"kind": kind, "step": int(step), "time": time.time()}
    record.update({k: _clean(v) for k, v in values.items()})
    line = json.dumps(record) + "\n"
    try:
      with open(self.path, "a+b") as f:
        if f.tell() > 0:  # append mode starts at the end
          f.seek(-1, os.SEEK_END)
          if f.read(1) != b"\n":
            line = "\n" + line  # a crash tore the last line: do not glue this record onto it
        f.write(line.encode("utf-8"))
    except OSError as e:
      raise os_error_to_user_error(e, f"writing {self.path}") from None

  def read(self) -> list[dict]:
    """The records of this log, one per (kind, step) (see `read`)."""
    return read(self.path)

  def truncate_after(self, step: int) -> int:
    """Drops every record with a step > `step` (and unreadable lines); returns how many.

    The file is rewritten atomically (temp file, fsync, rename) with its permissions kept, and
    only when something is dropped. Call it on resume with the restored checkpoint's step.
    """
    if not os.path.exists(self.path):
      return 0
    lines, bad = _read_lines(self.path)
    kept = [line for line, record in lines if _step(record) <= int(step)]
    dropped = len(lines) - len(kept) + bad
    if not dropped:
      return 0
    tmp = f"{self.path}.{os.getpid()}.tmp"
    try:
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in kept)
        f.flush()
        os.fsync(f.fileno())
      os.chmod(tmp, os.stat(self.path).st_mode & 0o7777)
      os.replace(tmp, self.path)
    except OSError as e:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise os_error_to_user_error(e, f"rewriting {self.path}") from None
    return dropped


def _step(record: dict) -> int:
  try:
    return int(record.get("step", 0))
  except (TypeError, ValueError):
    return 0


def _read_lines(path: str) -> tuple[list[tuple[str, dict]], int]:
  """([(line, record)] of the JSON-object lines, number of other non-blank lines)."""
  with open(path, encoding="utf-8", errors="replace") as f:
    raw = f.read().split("\n")
  out, bad = [], 0
  for line in raw:
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if isinstance(record, dict):
      out.append((line, record))
    else:
      bad += 1
  return out, bad


def read(path: str) -> list[dict]:
  """The records of a metrics file, in file order, keeping the last one of each (kind, step).

  A record superseded by a later one with the same kind and step (a step logged again after a
  resume) is dropped; the survivor sits where it was written. Unreadable lines are skipped.
  """
  if not os.path.exists(path):
    return []
  lines, bad = _read_lines(path)
  if bad:
    logging.warning("%s: skipped %d unreadable line(s) (torn by a crash?)", path, bad)
  records = [record for _, record in lines]
  last = {}
  for i, r in enumerate(records):
    last[(r.get("kind"), r.get("step"))] = i
  return [r for i, r in enumerate(records) if last[(r.get("kind"), r.get("step"))] == i]


class NullMetricsLog:
  """A `MetricsLog` that writes nothing: the log of the processes other than process 0 of a
  multi-process run (process 0 writes the run's one metrics.jsonl)."""

  path = None

  def write(self, kind: str, step: int, **values) -> None:
    del kind, step, values

  def read(self) -> list[dict]:
    return []

  def truncate_after(self, step: int) -> int:
    del step
    return 0


class MetricsBuffer:
  """Device metrics of recent steps; fetched, checked and logged at log boundaries."""

  def __init__(self, log: "MetricsLog", *, tokens_per_step: int, start_step: int,
               on_nonfinite):
    self._log = log
    self._tokens_per_step = tokens_per_step
    self._on_nonfinite = on_nonfinite  # (step, loss) -> raises
    self._pending: list[tuple[int, Any]] = []
    self._t_last, self._step_last = time.time(), start_step

  def add(self, step: int, metrics) -> None:
    self._pending.append((step, metrics))
    if len(self._pending) >= 2:  # keep one step in flight, but let the bar show finished steps
      self._pending[-2][1]["loss"].block_until_ready()

  def flush(self, step_now: int) -> Optional[dict]:
    """Fetches pending metrics, stops on a non-finite loss, logs means over the interval."""
    if not self._pending:
      return None
    fetched = jax.device_get([m for _, m in self._pending])
    for (s, _), m in zip(self._pending, fetched):
      if not np.isfinite(m["loss"]):
        self._on_nonfinite(s, m["loss"])
    now = time.time()
    # Means over the interval (one batch's diffusion loss is very noisy); lr at its end.
    last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
    last["learning_rate"] = float(fetched[-1]["learning_rate"])
    last["tokens_per_sec"] = ((step_now - self._step_last) * self._tokens_per_step /
                              max(now - self._t_last, 1e-9))
    last.update(platform_info.host_resident_mib())
    self._log.write("train", step_now, **last)
    self._t_last, self._step_last = now, step_now
    self._pending = []
    return last
