"""The WikiText-2 headline table from trained workdirs: models x training seeds, with baselines.

    python -m bdiff_jax.benchmarks.seed_table \
        --group "diffusion (main command)=runs/d0,runs/d1,runs/d2" \
        --group "autoregressive twin=runs/a0,runs/a1,runs/a2" \
        --reference "autoregressive twin" --out runs/wt2_table.json

Each group is one model trained with several seeds (one workdir per seed, listed in seed order).
Per workdir it reads the final full-split evaluation (`eval_best.json`), the periodic readings and
the train records (`metrics.jsonl`): steps, tokens, training wall-clock, tokens/s, and the early
plateau (below). Per group: mean ± sample standard deviation over seeds. With --reference, each
group's test-perplexity ratio to the reference group, per seed (seed i against seed i) and of the
means. The count baselines (unigram, bigram) are those the workdirs' evaluation wrote beside its
numbers (the same blocks). Prints a markdown table and writes the whole thing as JSON.

The plateau (`plateau`): the longest stretch of steps over which the periodic reading improves by
less than `--plateau_tolerance` (5%) and that the run then leaves, falling by more than twice that
within as many steps again.
"""

import argparse
import json
import os
import statistics
import sys
from typing import Optional

from bdiff_jax.runtime import metrics_log


def plateau(readings: list[tuple[int, float]], *, tolerance: float = 0.05) -> dict:
  """{"steps": length, "from": step, "to": step} of the longest plateau in the periodic readings
  (step, perplexity); steps 0 when there is none.

  A plateau is a stretch [a, b] over which the perplexity falls by less than `tolerance`
  (relative) and that the run then leaves: within the next b - a steps it falls by more than
  2 x tolerance. The slow improvement at the end of a run is not a plateau (nothing follows it).
  """
  r = sorted(readings)
  best = {"steps": 0, "from": None, "to": None}
  for i, (s_a, p_a) in enumerate(r):
    for j in range(i + 1, len(r)):
      s_b, p_b = r[j]
      if p_b < (1.0 - tolerance) * p_a:
        break
      exits = any(p_c < (1.0 - 2 * tolerance) * p_b
                  for s_c, p_c in r[j + 1:] if s_c - s_b <= s_b - s_a)
      if exits and s_b - s_a > best["steps"]:
        best = {"steps": s_b - s_a, "from": s_a, "to": s_b}
  return best


def read_run(workdir: str, *, tolerance: float = 0.05) -> dict:
  """One seed's numbers from its workdir."""
  with open(os.path.join(workdir, "eval_best.json"), encoding="utf-8") as f:
    ev = json.load(f)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  records = metrics_log.read(os.path.join(workdir, "metrics.jsonl"))
  train = [r for r in records if r.get("kind") == "train"]
  evals = [(r["step"], r["valid_word_ppl"]) for r in records
           if r.get("kind") == "eval" and "valid_word_ppl" in r]
  tokens_per_step = int(config["train"]["batch_size"]) * int(config["data"]["seq_len"])
  steps = int(ev["step"])
  wall = None
  if len(train) >= 2 and train[-1]["step"] > train[0]["step"]:
    span = train[-1]["time"] - train[0]["time"]
    wall = span * train[-1]["step"] / (train[-1]["step"] - train[0]["step"])
  rates = sorted(r["tokens_per_sec"] for r in train if "tokens_per_sec" in r)
  res = ev["results"]
  return {
      "workdir": os.path.abspath(workdir), "seed": config.get("seed"), "step": steps,
      "tokens": steps * tokens_per_step, "train_seconds": wall,
      "tokens_per_sec": rates[len(rates) // 2] if rates else None,
      "valid": res["valid"]["word_ppl"], "test": res["test"]["word_ppl"],
      "upper_bound": bool(res["valid"].get("upper_bound", False)),
      "plateau": plateau(evals, tolerance=tolerance),
      "readings": evals, "baselines": ev["baselines"],
      "checkpoint": ev.get("checkpoint"),
  }


def _summary(values: list[float]) -> dict:
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  mean = statistics.fmean(values)
  return {"mean": mean, "std": std, "spread_pct": 100.0 * std / mean, "values": values}


def build(groups: list[tuple[str, list[str]]], *, reference: str = "",
          tolerance: float = 0.05) -> dict:
  out = {"groups": [], "baselines": None, "reference": reference or None}
  by_name = {}
  for name, dirs in groups:
    runs = [read_run(d, tolerance=tolerance) for d in dirs]
    g = {"name": name, "runs": runs,
         "valid": _summary([r["valid"] for r in runs]),
         "test": _summary([r["test"] for r in runs]),
         "upper_bound": runs[0]["upper_bound"]}
    out["groups"].append(g)
    by_name[name] = g
    out["baselines"] = out["baselines"] or runs[0]["baselines"]
  if reference:
    ref = by_name[reference]
    for g in out["groups"]:
      n = min(len(g["runs"]), len(ref["runs"]))
      g["test_ratio_per_seed"] = [g["runs"][i]["test"] / ref["runs"][i]["test"] for i in range(n)]
      g["test_ratio_of_means"] = g["test"]["mean"] / ref["test"]["mean"]
  return out


def markdown(table: dict) -> str:
  lines = ["| model | seeds | steps (tokens) | train min | tok/s | valid | test | early plateau "
           "(steps, per seed) |" + (" test / reference (per seed) |" if table["reference"] else ""),
           "|---|---:|---|---:|---:|---:|---:|---|" + ("---|" if table["reference"] else "")]
  for g in table["groups"]:
    runs = g["runs"]
    kind = "bound" if g["upper_bound"] else "exact"
    steps = " / ".join(f"{r['step']:,}" for r in runs)
    tokens = f"{min(r['tokens'] for r in runs) / 1e6:.1f}–{max(r['tokens'] for r in runs) / 1e6:.1f}M"
    mins = [r["train_seconds"] / 60 for r in runs if r["train_seconds"]]
    rates = [r["tokens_per_sec"] for r in runs if r["tokens_per_sec"]]
    row = (f"| {g['name']} | {len(runs)} | {steps} ({tokens}) | "
           f"{statistics.fmean(mins):.1f} | {statistics.fmean(rates):,.0f} | "
           f"{g['valid']['mean']:.1f} ± {g['valid']['std']:.1f} ({kind}) | "
           f"{g['test']['mean']:.1f} ± {g['test']['std']:.1f} | "
           + ", ".join(str(r["plateau"]["steps"]) for r in runs) + " |")
    if table["reference"]:
      row += (f" {g['test_ratio_of_means']:.2f} ("
              + ", ".join(f"{x:.2f}" for x in g["test_ratio_per_seed"]) + ") |")
    lines.append(row)
  b = table["baselines"] or {}
  for name in ("unigram", "bigram"):
    if name in b:
      lines.append(f"| {name} baseline (counts, train split) | - | - | - | - | "
                   f"{b[name]['valid']['word_ppl']:.1f} (exact) | "
                   f"{b[name]['test']['word_ppl']:.1f} | - |" + (" - |" if table["reference"] else ""))
  return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--group", action="append", required=True,
                 help="NAME=workdir,workdir,... (one workdir per training seed)")
  p.add_argument("--reference", default="", help="the group the ratios are taken against")
  p.add_argument("--plateau_tolerance", type=float, default=0.05)
  p.add_argument("--out", default="", help="write the table as JSON here")
  a = p.parse_args(argv)
  groups = []
  for spec in a.group:
    name, sep, dirs = spec.partition("=")
    if not sep or not dirs:
      print(f"error: --group {spec!r} is not NAME=dir,dir,... Fix: name the group and list its "
            "workdirs.", file=sys.stderr)
      return 2
    groups.append((name, [d for d in dirs.split(",") if d]))
  names = [g[0] for g in groups]
  if a.reference and a.reference not in names:
    print(f"error: --reference {a.reference!r} is not a group ({', '.join(names)}). Fix: pass "
          "one of the group names.", file=sys.stderr)
    return 2
  try:
    table = build(groups, reference=a.reference, tolerance=a.plateau_tolerance)
  except (OSError, KeyError, ValueError) as e:
    print(f"error: cannot read a workdir ({e}). Fix: pass finished training workdirs (each with "
          "eval_best.json, config.json and metrics.jsonl).", file=sys.stderr)
    return 2
  print(markdown(table))
  if a.out:
    with open(a.out, "w", encoding="utf-8") as f:
      json.dump(table, f, indent=1)
    print(f"written to {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
