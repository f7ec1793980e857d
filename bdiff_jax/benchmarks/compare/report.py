"""The comparison's report: aggregation over training seeds, compare.json, compare.md, compare.png.

Per model: parameters, tokens seen, train tokens/s, peak train-step memory and valid/test
word-level perplexity (an UPPER BOUND for diffusion, EXACT for the autoregressive model), each as
mean, sample std and per-seed values over the training seeds; then the memory-vs-depth sweep.
"""

import json
import os
import statistics
from typing import Any

from bdiff_jax.evaluation.plotting import pyplot

JSON_FILE = "compare.json"
MARKDOWN_FILE = "compare.md"
PLOT_FILE = "compare.png"
OUTPUTS = (JSON_FILE, MARKDOWN_FILE, PLOT_FILE)
MIB = 1024.0 * 1024.0


def summarize(values: list[float]) -> dict[str, Any]:
  """Mean, sample std (0 for one value), count and the values."""
  values = [float(v) for v in values]
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def shape_text(model_config) -> str:
  """'2x64, 4/2 heads, hd 16, mlp 192' for a config.model section (or its dict)."""
  m = model_config
  return (f"{m['num_layers']}x{m['emb_dim']}, {m['num_heads']}/{m['num_kv_heads']} heads, "
          f"hd {m['head_dim']}, mlp {m['mlp_dim']}")


def model_summary(entry, model_config, num_params: int, memory: dict,
                  results: list[dict]) -> dict[str, Any]:
  """One model's row of compare.json: its runs (one per training seed) aggregated."""
  def over_seeds(get):
    return summarize([get(r) for r in results])

  return {
      "model": entry.label, "backbone": entry.backbone, "objective": entry.objective,
      "block": entry.block, "model_config": model_config.to_dict(),
      "num_params": num_params,
      "memory": memory,
      "ppl_kind": "upper bound" if entry.upper_bound else "exact",
      "upper_bound": entry.upper_bound,
      "tokens_seen": over_seeds(lambda r: r["tokens_seen"]),
      "steps": over_seeds(lambda r: r["steps"]),
      "train_tokens_per_sec": over_seeds(lambda r: r["train_tokens_per_sec"]),
      "run_wall_seconds": over_seeds(lambda r: r["run_wall_seconds"]),
      "valid_word_ppl": over_seeds(lambda r: r["valid"]["word_ppl"]),
      "test_word_ppl": over_seeds(lambda r: r["test"]["word_ppl"]),
      "valid_nll_per_token": over_seeds(lambda r: r["valid"]["nll_per_token"]),
      "test_nll_per_token": over_seeds(lambda r: r["test"]["nll_per_token"]),
      "eval": {k: results[0]["valid"][k] for k in ("num_tokens", "full_split", "eval_seeds",
                                                   "num_time_samples")},
      "runs": [{k: v for k, v in r.items() if k != "curve"} for r in results],
  }


def _pm(s: dict, fmt: str) -> str:
  text = format(s["mean"], fmt)
  return text + (f" ± {format(s['std'], fmt)}" if s["n"] > 1 else "")


def format_markdown(summary: dict) -> str:
  """The Markdown report: the model table, the memory-vs-depth table and notes."""
  b = summary["budget"]
  lines = [f"# Comparison ({summary['level']} level, {summary['scale']} scale)", ""]
  budget = {"tokens": f"{b['amount']:,.0f} training tokens per model",
            "steps": f"{b['amount']:,.0f} training steps per model",
            "seconds": f"{b['amount']:,.0f} s of training wall-clock per model"}[b["kind"]]
  lines += [f"Equal budget: {budget} (batch {b['batch_size']} x seq_len {b['seq_len']}); "
            f"training seeds {summary['seeds']}; {summary['device']}.", ""]
  lines += ["| model | shape | params | tokens seen | train tok/s | peak train-step memory "
            "(MiB) | valid word ppl | test word ppl | perplexity is |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|"]
  for m in summary["models"]:
    lines.append(
        f"| {m['model']} | {shape_text(m['model_config'])} | {m['num_params']:,} | "
        f"{_pm(m['tokens_seen'], ',.0f')} | {_pm(m['train_tokens_per_sec'], ',.0f')} | "
        f"{m['memory']['held_bytes'] / MIB:,.1f} | {_pm(m['valid_word_ppl'], ',.2f')} | "
        f"{_pm(m['test_word_ppl'], ',.2f')} | {m['ppl_kind']} |")
  ev = summary["models"][0]["eval"]
  subset = ("full valid and test splits" if ev["full_split"] else
            f"the first {ev['num_tokens']:,} tokens of valid and of test (a SUBSET)")
  lines += ["", "Notes:",
            f"- Perplexities on {subset}, blocks of {b['seq_len']} tokens scored independently;"
            " word perplexity = exp(total NLL / words, one <eos> per line).",
            "- Diffusion: UPPER BOUND from the ELBO (mean over evaluation seeds, "
            f"K={ev['num_time_samples']} time samples); autoregressive: EXACT likelihood.",
            "- ± is the sample std over training seeds (shown with two or more seeds); "
            "per-seed values are in compare.json.",
            "- train tok/s: median over the run's log intervals, compilation left out. Memory: "
            "XLA compiled memory analysis of the full train step (temp + argument + output - "
            "alias bytes; state donated).",
            "- Wall-clock per run (training + evaluation): " + ", ".join(
                f"{m['model']} {_pm(m['run_wall_seconds'], ',.0f')} s"
                for m in summary["models"]) + "."]
  if summary["memory_vs_depth"]:
    lines += ["", *_depth_table(summary)]
  return "\n".join(lines) + "\n"


def _depth_table(summary: dict) -> list[str]:
  b = summary["budget"]
  depths = sorted({r["depth"] for r in summary["memory_vs_depth"]})
  lines = [f"## Train-step memory vs depth ({summary['memory_block']} block, diffusion, "
           f"batch {b['batch_size']} x seq_len {b['seq_len']})", "",
           "| layers | standard held MiB | reversible held MiB | reversible / standard | "
           "standard temp MiB | reversible temp MiB |", "|---:|---:|---:|---:|---:|---:|"]
  by = {(r["backbone"], r["depth"]): r for r in summary["memory_vs_depth"]}
  for d in depths:
    s, r = by[("standard", d)], by[("reversible", d)]
    lines.append(f"| {d} | {s['held_bytes'] / MIB:,.1f} | {r['held_bytes'] / MIB:,.1f} | "
                 f"{r['held_bytes'] / s['held_bytes']:.3f} | {s['temp_bytes'] / MIB:,.1f} | "
                 f"{r['temp_bytes'] / MIB:,.1f} |")
  lines += ["", "held = temp + argument + output - alias bytes (the state, incl. AdamW "
            "moments and EMA, grows with depth for both); temp = activations and scratch."]
  return lines


def plot(summary: dict, runs_by_model: dict[str, list[dict]], path: str) -> None:
  """Training loss against tokens and against wall-clock, and memory against depth."""
  plt = pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  tokens_per_step = summary["budget"]["batch_size"] * summary["budget"]["seq_len"]
  for label, results in runs_by_model.items():
    for i, r in enumerate(results):
      curve = r["curve"]
      if not curve:
        continue
      t0 = curve[0]["time"]
      kw = {"label": label if i == 0 else None, "alpha": 0.9 if i == 0 else 0.5}
      color = axes[0].plot([c["step"] * tokens_per_step for c in curve],
                           [c["loss"] for c in curve], **kw)[0].get_color()
      axes[1].plot([c["time"] - t0 for c in curve], [c["loss"] for c in curve], color=color,
                   **kw)
  axes[0].set_xlabel("training tokens")
  axes[1].set_xlabel("seconds since the first log record")
  for ax in axes[:2]:
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("loss (diffusion: ELBO bound; AR: exact NLL)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  mem = summary["memory_vs_depth"]
  for backbone, marker, color in (("standard", "o", "tab:blue"), ("reversible", "s", "tab:red")):
    rows = sorted((r for r in mem if r["backbone"] == backbone), key=lambda r: r["depth"])
    if rows:
      depths = [r["depth"] for r in rows]
      axes[2].plot(depths, [r["held_bytes"] / MIB for r in rows], marker + "-", color=color,
                   label=f"{backbone}: held")
      axes[2].plot(depths, [r["temp_bytes"] / MIB for r in rows], marker + "--", color=color,
                   alpha=0.6, label=f"{backbone}: temp (activations)")
      axes[2].set_xticks(depths)
  axes[2].set_xlabel("layers")
  axes[2].set_ylabel("MiB (compiled memory analysis)")
  axes[2].set_title("train-step memory vs depth", fontsize=9)
  axes[2].grid(alpha=0.3)
  if mem:
    axes[2].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def remove_outputs(workdir: str) -> None:
  """Deletes an earlier comparison's outputs, so that they cannot be mistaken for this one's."""
  for name in OUTPUTS:
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      os.remove(path)


def write_outputs(workdir: str, summary: dict, runs_by_model: dict[str, list[dict]]) -> str:
  """Writes compare.png, compare.md and compare.json; returns the Markdown."""
  markdown = format_markdown(summary)
  plot(summary, runs_by_model, os.path.join(workdir, PLOT_FILE))
  with open(os.path.join(workdir, MARKDOWN_FILE), "w", encoding="utf-8") as f:
    f.write(markdown)
  with open(os.path.join(workdir, JSON_FILE), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  return markdown
