"""GLUE benchmark results: per-seed records -> rows with mean ± spread, written as
glue.json, glue.md and glue.png.

A row whose predictions are (almost) constant, or whose metric does not beat the majority-class
baseline, is flagged, so a constant predictor cannot pass for a result.
"""

import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

CONSTANT_FRACTION = 0.99  # a seed whose most frequent prediction has this share is "constant"


def flags(metric_values: list[float], majority: float, distributions: list) -> list[str]:
  """Warnings for one row: 'constant predictor' and/or 'at or below majority'."""
  out = []
  if any(d is not None and max(d) >= CONSTANT_FRACTION for d in distributions):
    out.append("constant predictor")
  mean = float(np.mean(metric_values))
  if math.isnan(mean) or (not math.isnan(majority) and mean <= majority + 1e-9):
    out.append("at or below majority")
  return out


def aggregate(task: str, row_name: str, records: list[dict], majority: dict,
              primary: str) -> dict:
  """One row of the table from its per-seed records (see `modes.glue.run_seed`)."""
  values = [r["dev"][primary] for r in records]
  dists = [r["prediction_distribution"] for r in records]
  maj = float(majority[primary])
  first = records[0]
  return {
      "task": task, "row": row_name, "metric": primary,
      "mean": float(np.mean(values)), "std": float(np.std(values)),
      "seeds": [r["seed"] for r in records], "values": values,
      "majority": maj, "flags": flags(values, maj, dists),
      "prediction_distribution": [float(x) for x in np.mean(dists, axis=0)]
      if dists[0] is not None else None,
      "train_seconds": float(np.mean([r["train_seconds"] for r in records])),
      "forward_passes": first["forward_passes"], "steps": first["steps"],
      "step_memory_bytes": first["step_memory_bytes"], "params": first["params"],
      "init": first["init"], "scoring": first["scoring"], "rule": first["rule"],
      "oov_rate": first.get("oov_rate"),
  }


def _fmt_bytes(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


def markdown(rows: list[dict], meta: dict) -> str:
  lines = [f"# GLUE fine-tuning ({meta['level']})", "",
           f"{meta['description']}", "",
           "| task | row | init | scoring | metric | dev mean ± std | majority | predictions "
           "| flags | steps | fwd / bwd passes | train s | step memory | params | OOV |",
           "|" + "---|" * 15]
  for r in rows:
    dist = ("/".join(f"{x:.2f}" for x in r["prediction_distribution"])
            if r["prediction_distribution"] is not None else "-")
    fp = r["forward_passes"]
    oov = "-" if r["oov_rate"] is None else f"{100 * r['oov_rate']:.1f}%"
    lines.append(
        f"| {r['task']} | {r['row']} | {r['init']} | {r['scoring']} | {r['metric']} | "
        f"{r['mean']:.4f} ± {r['std']:.4f} (n={len(r['values'])}) | {r['majority']:.4f} | "
        f"{dist} | {', '.join(r['flags']) or 'ok'} | {r['steps']} | "
        f"{fp['forward']} / {fp['backward']} | {r['train_seconds']:.1f} | "
        f"{_fmt_bytes(r['step_memory_bytes'])} | {r['params']:,} | {oov} |")
  lines += ["", "Spread: population std over seeds. Step memory: XLA's memory analysis of the "
            "compiled train step (arguments + outputs + temporaries - aliased). OOV: share of "
            "prompt words the word-level vocabulary maps to <unk> after case mapping."]
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
  x = np.arange(len(rows))
  ax.bar(x, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4)
  ax.scatter(x, [r["majority"] for r in rows], color="red", marker="_", s=400,
             label="majority class", zorder=3)
  ax.set_xticks(x)
  ax.set_xticklabels([f"{r['task']}\n{r['row']}" for r in rows], fontsize=7)
  ax.set_ylabel("dev metric (primary)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(workdir: str, rows: list[dict], records: list[dict], meta: dict) -> dict:
  """Writes glue.json / glue.md / glue.png into `workdir`; returns their paths."""
  os.makedirs(workdir, exist_ok=True)
  paths = {k: os.path.join(workdir, f"glue.{k}") for k in ("json", "md", "png")}
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump({"meta": meta, "rows": rows, "records": records}, f, indent=2)
  with open(paths["md"], "w", encoding="utf-8") as f:
    f.write(markdown(rows, meta))
  plot(rows, paths["png"])
  return paths
