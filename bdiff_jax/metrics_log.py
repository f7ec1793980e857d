"""Append-only JSONL metrics in the workdir (`metrics.jsonl`), one JSON object per line."""

import json
import math
import os
import time


def _clean(v):
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricsLog:

  def __init__(self, workdir: str, filename: str = "metrics.jsonl"):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, filename)

  def write(self, kind: str, step: int, **values) -> None:
    record = {"kind": kind, "step": int(step), "time": time.time()}
    record.update({k: _clean(v) for k, v in values.items()})
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")


def read(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
