"""GLUE benchmark results: per-seed records -> rows with mean ± spread, written as
glue.json, glue.md, glue.png (dev metric per row) and glue_curves_<task>.png (selection score
and dev metric against forward passes, every row of the task, mean and min-max band over seeds).

A row is flagged (`flags`) when it cannot be told from an untrained model: its predictions are
(almost) constant, its dev metric is at or below the majority class or within 2 standard errors
of it (the dev standard error of the metric, mean over seeds), it selected step 0 (the
untrained parameters) or its selected parameters did not move (relative change below
`STATIC_CHANGE`). Beside every row: the step-0 (zero-shot) dev metric and selection
score, the majority class and the bag-of-words baseline of the row's training examples
(`glue.baselines`). `equal_forward` compares each DiZO row with its MeZO row at the same number
of forward passes (the smaller of their budgets), read off the recorded curves.
"""

import json
import math
import os
import sys
import warnings

import numpy as np

from bdiff_jax.evaluation.plotting import pyplot
from bdiff_jax.glue import metrics as glue_metrics
from bdiff_jax.glue.probe import PROBE_EXAMPLES
from bdiff_jax.runtime import workdir as workdir_lib

CONSTANT_FRACTION = 0.99  # a seed whose most frequent prediction has this share is "constant"
STATIC_CHANGE = 1e-6  # a relative parameter change below this: "parameters did not move"


def flags(metric_values: list[float], majority: float, distributions: list, *,
          selected_steps: list[int] | None = None, changes: list[float] | None = None,
          standard_error: float | None = None, static: float = STATIC_CHANGE) -> list[str]:
  """Warnings for one row: 'constant predictor', 'at or below majority', 'within 2 standard
  errors of the majority', 'selected step 0 (k/n seeds)', 'parameters did not move (k/n seeds)'.

  A NaN majority (STS-B: a constant has no correlation) is compared as 0.
  """
  out = []
  if any(d is not None and max(d) >= CONSTANT_FRACTION for d in distributions):
    out.append("constant predictor")
  mean = float(np.mean(metric_values))
  ref = 0.0 if math.isnan(majority) else majority
  if math.isnan(mean) or mean <= ref + 1e-9:
    out.append("at or below majority")
  elif standard_error is not None and not math.isnan(standard_error) and (
      mean < ref + 2 * standard_error):
    out.append("within 2 standard errors of the majority")
  n = len(metric_values)
  if selected_steps is not None and any(s == 0 for s in selected_steps):
    out.append(f"selected step 0 ({sum(s == 0 for s in selected_steps)}/{n} seeds)")
  if changes is not None and any(c < static for c in changes):
    out.append(f"parameters did not move ({sum(c < static for c in changes)}/{n} seeds)")
  return out


def task_label(task: str, split: str) -> str:
  """The table's task name of one dev split: the task, or MNLI-m / MNLI-mm."""
  return {"dev_matched": f"{task}-m", "dev_mismatched": f"{task}-mm"}.get(split, task)


def aggregate(task: str, row_name: str, records: list[dict], baselines: dict, primary: str,
              split: str = "dev") -> dict:
  """One row of the table (one dev split) from its per-seed records (`modes.glue.run_seed`)
  and the task's baselines (`modes.glue.task_baselines`)."""
  values = [r["dev_splits"][split][primary] for r in records]
  dists = [r["prediction_distribution"] for r in records]
  maj = float(baselines["majority"][split][primary])
  bow = [float(m[primary]) for m in baselines["bow"][split]]
  se = float(np.mean([r["dev_standard_error"][split] for r in records]))
  steps = [int(r["selected_step"]) for r in records]
  probes = [float(r["start_probe"]["dev_splits"][split][primary]) for r in records
            if r.get("start_probe")]
  changes = [float(r["relative_param_change"]) for r in records]
  first = records[0]
  return {
      "task": task_label(task, split), "split": split, "row": row_name, "metric": primary,
      "mean": float(np.mean(values)), "std": float(np.std(values)),
      "seeds": [r["seed"] for r in records], "values": values,
      "standard_error": se,
      "zero_shot_dev": float(np.mean([r["zero_shot"]["dev"][split][primary] for r in records])),
      "selection_best": float(np.mean([r["selection_best"] for r in records])),
      "zero_shot_selection": float(np.mean([r["zero_shot"]["selection"] for r in records])),
      "selected_steps": steps, "relative_param_change": changes,
      "majority": maj, "bow": float(np.mean(bow)), "bow_std": float(np.std(bow)),
      "start_probe": float(np.mean(probes)) if probes else None,
      "flags": flags(values, maj, dists, selected_steps=steps, changes=changes,
                     standard_error=se, static=STATIC_CHANGE),
      "prediction_distribution": [float(x) for x in np.mean(dists, axis=0)]
      if dists[0] is not None else None,
      "train_seconds": float(np.mean([r["train_seconds"] for r in records])),
      "forward_passes": first["forward_passes"], "steps": first["steps"],
      "step_memory_bytes": first["step_memory_bytes"], "params": first["params"],
      "init": first["init"], "scoring": first["scoring"], "rule": first["rule"],
      "oov_rate": first.get("oov_rate"), "learning_rate": first.get("learning_rate"),
  }


def _at_budget(curve: list[dict], budget: int) -> dict:
  """The last curve point with at most `budget` forward passes."""
  return [p for p in curve if p["forward"] <= budget][-1]


def equal_forward(records: list[dict]) -> list[dict]:
  """DiZO vs MeZO at equal forward passes, for each task and each model with both rows.

  The budget is the smaller of the two rows' final forward passes; each row's value is its last
  evaluation point within the budget (selection score and, where recorded, dev metric), mean
  over seeds.
  """
  by_row = {}
  for r in records:
    by_row.setdefault((r["task"], r["row"]), []).append(r)
  out = []
  for (task, name), mezo in sorted(by_row.items()):
    if not name.startswith("mezo_") or (task, "dizo_" + name[5:]) not in by_row:
      continue
    dizo = by_row[(task, "dizo_" + name[5:])]
    budget = min(mezo[0]["curve"][-1]["forward"], dizo[0]["curve"][-1]["forward"])
    entry = {"task": task, "model": name[5:], "forward": int(budget)}
    for rule, recs in (("mezo", mezo), ("dizo", dizo)):
      points = [_at_budget(r["curve"], budget) for r in recs]
      entry[rule] = {"step": points[0]["step"],
                     "selection": float(np.mean([p["selection"] for p in points])),
                     "dev": float(np.mean([p.get("dev", math.nan) for p in points]))}
    out.append(entry)
  return out


def _fmt_bytes(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


def markdown(rows: list[dict], meta: dict, records: list[dict] | None = None) -> str:
  lines = [f"# GLUE fine-tuning ({meta['level']})", "",
           f"{meta['description']}", "",
           "| task | row | init | scoring | metric | dev mean ± std | step-0 dev | majority "
           "| BoW LR | start probe | 2 SE | selection: selected / step 0 | selected steps "
           "| rel. change | predictions | flags | steps | fwd / bwd passes | train s "
           "| step memory | params | OOV |",
           "|" + "---|" * 22]
  for r in rows:
    dist = ("/".join(f"{x:.2f}" for x in r["prediction_distribution"])
            if r["prediction_distribution"] is not None else "-")
    fp = r["forward_passes"]
    oov = "-" if r["oov_rate"] is None else f"{100 * r['oov_rate']:.1f}%"
    change = " ".join(f"{c:.1e}" for c in r["relative_param_change"])
    probe = "-" if r.get("start_probe") is None else f"{r['start_probe']:.4f}"
    lines.append(
        f"| {r['task']} | {r['row']} | {r['init']} | {r['scoring']} | {r['metric']} | "
        f"{r['mean']:.4f} ± {r['std']:.4f} (n={len(r['values'])}) | {r['zero_shot_dev']:.4f} | "
        f"{r['majority']:.4f} | {r['bow']:.4f} | {probe} | {2 * r['standard_error']:.4f} | "
        f"{r['selection_best']:.3f} / {r['zero_shot_selection']:.3f} | "
        f"{', '.join(map(str, r['selected_steps']))} | {change} | "
        f"{dist} | {', '.join(r['flags']) or 'ok'} | {r['steps']} | "
        f"{fp['forward']} / {fp['backward']} | {r['train_seconds']:.1f} | "
        f"{_fmt_bytes(r['step_memory_bytes'])} | {r['params']:,} | {oov} |")
  lines += ["", "Spread: population std over seeds. Step-0 dev: the untrained (zero-shot) "
            "model. Majority: always the train split's majority class (where the metric is the F1 "
            "of class 1, MRPC/QQP/MultiRC: always class 1, whose F1 is not 0). BoW LR: "
            "L2-regularised logistic (STS-B: ridge) regression on unigram + "
            "bigram counts of the same training examples, mean over seeds. Start probe: the same "
            "regression on the start model's final hidden state where the candidates are read "
            f"(at most {PROBE_EXAMPLES:,} of the training examples; '-' where candidates are "
            "read at several positions): what re-weighting the start's features alone gives. "
            "2 SE: twice the dev "
            "standard error of the metric (mean over seeds). Selection: the chance-corrected "
            "selection score (informedness = 0 for any constant predictor; STS-B: Pearson) of "
            "the selected step and of step 0, mean over seeds. Rel. change: ||theta - theta_0|| "
            "/ ||theta_0|| of the selected parameters, per seed. Step memory: XLA's memory "
            "analysis of the compiled train step (arguments + outputs + temporaries - aliased). "
            "OOV: share of prompt words the word-level vocabulary maps to <unk> after case "
            "mapping."]
  if records:
    eq = equal_forward(records)
    if eq:
      lines += ["", "## DiZO vs MeZO at equal forward passes", "",
                "| task | model | forward passes | MeZO step | MeZO selection / dev | DiZO step "
                "| DiZO selection / dev |", "|" + "---|" * 7]
      for e in eq:
        m, d = e["mezo"], e["dizo"]
        lines.append(f"| {e['task']} | {e['model']} | {e['forward']} | {m['step']} | "
                     f"{m['selection']:.3f} / {m['dev']:.4f} | {d['step']} | "
                     f"{d['selection']:.3f} / {d['dev']:.4f} |")
    grids = {(r["task"], r["row"]): r["lr_grid"] for r in records if r.get("lr_grid")}
    if grids:
      lines += ["", "## Learning-rate grids (first seed, selection score)", ""]
      for (task, row), grid in grids.items():
        cells = ", ".join(f"{c['learning_rate']:g}: {c['selection_best']:.3f} (step "
                          f"{c['selected_step']})" for c in grid)
        lines.append(f"- {task} {row} ({grid[0]['steps']} steps each): {cells}")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
  x = np.arange(len(rows))
  ax.bar(x, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4)
  ax.scatter(x, [r["majority"] for r in rows], color="red", marker="_", s=400,
             label="majority class", zorder=3)
  ax.scatter(x, [r["bow"] for r in rows], color="green", marker="_", s=400,
             label="bag-of-words LR", zorder=3)
  ax.scatter(x, [r["zero_shot_dev"] for r in rows], color="black", marker="x",
             label="step 0 (untrained)", zorder=3)
  ax.set_xticks(x)
  ax.set_xticklabels([f"{r['task']}\n{r['row']}" for r in rows], fontsize=7)
  ax.set_ylabel("dev metric (primary)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120, format="png")  # `path` may be a temporary name
  plt.close(fig)


def _baseline_lines(ax, baselines, task: str) -> None:
  """The majority class and the bag-of-words model (mean over seeds) of `task`'s first dev split
  as horizontal lines: what a row's dev curve must rise above."""
  base = next((b for b in baselines or [] if b.get("task") == task), None)
  if base is None or not base.get("majority"):
    return
  split = next(iter(base["majority"]))
  from_metric = glue_metrics.primary_metric(task)
  maj = base["majority"][split].get(from_metric, math.nan)
  bows = [m.get(from_metric, math.nan) for m in base.get("bow", {}).get(split, [])]
  for value, label, style in ((maj, "majority class", ":"),
                              (float(np.nanmean(bows)) if bows else math.nan,
                               "bag-of-words LR (same train set)", "--")):
    if np.isfinite(value):
      ax.axhline(value, color="0.4", linestyle=style, linewidth=1, label=label)


def plot_curves(records: list[dict], task: str, path: str, baselines=None) -> None:
  """Selection score and dev metric against forward passes, every row of `task` on one figure:
  the mean over seeds and the min-max band; the dev panel also shows the majority class and the
  bag-of-words baseline."""
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  names = list(dict.fromkeys(r["row"] for r in records if r["task"] == task))
  for name in names:
    recs = [r for r in records if r["task"] == task and r["row"] == name]
    n = min(len(r["curve"]) for r in recs)
    x = np.array([p["forward"] for p in recs[0]["curve"][:n]], np.float64)
    for ax, key in zip(axes, ("selection", "dev")):
      y = np.array([[p.get(key, math.nan) for p in r["curve"][:n]] for r in recs], np.float64)
      if np.all(np.isnan(y)):
        continue
      with warnings.catch_warnings():  # points where no seed has a value (dev_curve off)
        warnings.simplefilter("ignore", RuntimeWarning)
        line, = ax.plot(x, np.nanmean(y, axis=0), marker=".", label=name)
        ax.fill_between(x, np.nanmin(y, axis=0), np.nanmax(y, axis=0),
                        color=line.get_color(), alpha=0.2)
  _baseline_lines(axes[1], baselines, task)
  for ax, what in zip(axes, ("selection score (informedness / Pearson)", "dev metric")):
    ax.set_xlabel("forward passes")
    ax.set_ylabel(what)
    ax.set_title(f"{task}: {what}", fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120, format="png")  # `path` may be a temporary name
  plt.close(fig)


def results_stem(workdir: str, digest: str) -> str:
  """The results' file stem for a run whose settings digest is `digest`: "glue" when the
  workdir holds no glue.json or one written with the same settings (`meta.settings_digest`),
  else "glue-<digest>", so that a run with other settings (seeds, tasks, rows, steps, ...)
  never replaces another's results. An unreadable glue.json, or one without a digest (written
  before digests), counts as other settings: it is left alone."""
  path = os.path.join(workdir, "glue.json")
  if not os.path.exists(path):
    return "glue"
  try:
    with open(path, encoding="utf-8") as f:
      theirs = json.load(f).get("meta", {}).get("settings_digest")
  except (OSError, ValueError, AttributeError):
    theirs = None
  return "glue" if theirs == digest else f"glue-{digest}"


def write(workdir: str, rows: list[dict], records: list[dict], meta: dict,
          baselines: list[dict] | None = None, *, stem: str = "glue") -> dict:
  """Writes <stem>.json / <stem>.md / <stem>.png / <stem>_curves_<task>.png into `workdir`;
  returns their paths.

  Each file is published complete (`workdir.write_atomically`: a private temporary file, then a
  rename), and the JSON last: a kill or a full disk part-way leaves every earlier file as it
  was, and a <stem>.json is never torn.

  Raises:
    StorageError / DiskFullError: a file could not be written (one line).
  """
  os.makedirs(workdir, exist_ok=True)
  paths = {k: os.path.join(workdir, f"{stem}.{k}") for k in ("json", "md", "png")}
  text = json.dumps({"meta": meta, "rows": rows, "records": records, "baselines": baselines or [],
                     "equal_forward": equal_forward(records)}, indent=2)
  workdir_lib.write_text_atomically(paths["md"], markdown(rows, meta, records),
                                    f"the GLUE table {stem}.md")
  workdir_lib.write_atomically(paths["png"], lambda tmp: plot(rows, tmp),
                               f"the GLUE plot {stem}.png")
  for task in dict.fromkeys(r["task"] for r in records):
    paths[f"curves_{task}"] = os.path.join(workdir, f"{stem}_curves_{task}.png")
    workdir_lib.write_atomically(paths[f"curves_{task}"],
                                 lambda tmp, t=task: plot_curves(records, t, tmp, baselines),
                                 f"the GLUE curves {stem}_curves_{task}.png")
  workdir_lib.write_text_atomically(paths["json"], text, f"the GLUE results {stem}.json")
  return paths


def main(argv: list[str]) -> int:
  """`python -m bdiff_jax.glue.report GLUE_JSON [GLUE_JSON ...]`: prints the table of each
  results file again (what a README or paper quotes is regenerated from glue.json, not typed)."""
  if len(argv) < 2:
    print("usage: python -m bdiff_jax.glue.report <workdir>/glue.json [more glue.json ...]")
    return 2
  for path in argv[1:]:
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
      print(markdown(data["rows"], data["meta"], data.get("records")))
    except (OSError, ValueError, KeyError, TypeError) as e:
      print(f"error: {path} is not a readable glue.json ({type(e).__name__}: {e}). Fix: pass the "
            "glue.json a --mode=glue run wrote.", file=sys.stderr)
      return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main(sys.argv))
