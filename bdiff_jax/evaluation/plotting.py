"""PNG plots people would rather look at than read: the training curves of a workdir.

The perplexity panel draws, beside the run's periodic readings (the bound on the blocks spread
over the validation split that training evaluates every `train.eval_every` steps; its size is
in the legend), the numbers a reader compares it with: the full-split evaluation at the end, the
count baselines of the same blocks (unigram and interpolated bigram, horizontal lines) and, when
given, an autoregressive twin's periodic readings and final full-split number.
"""

import json
import os
from typing import Optional

from bdiff_jax.runtime import metrics_log


def pyplot():
  """matplotlib's pyplot on the Agg backend (files only), imported on first use: a process that
  never plots (evaluation, sampling, a refused command, process 1 of a multi-process run) does
  not pay its ~0.7 s import."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _evals(records: list[dict]) -> list[dict]:
  return [r for r in records if r["kind"] == "eval" and "valid_word_ppl" in r]


def _final_valid(workdir: str) -> Optional[tuple[int, float]]:
  """(step, full-split valid word perplexity) of the workdir's final evaluation, if any."""
  path = os.path.join(workdir, "eval_best.json")
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
    return int(out["step"]), float(out["results"]["valid"]["word_ppl"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _tokens_label(evals: list[dict]) -> str:
  tokens = evals[-1].get("valid_tokens") if evals else None
  return f"{int(tokens):,} tokens spread over valid" if tokens else "a valid subset"


def _log_ticks(ax) -> None:
  """Readable ticks on a log axis: plain numbers at 1, 2, 3, 5 x 10^k."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
  ax.yaxis.set_minor_locator(ticker.LogLocator(base=10, subs=tuple(range(1, 10))))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def plot_training_curves(workdir: str, filename: str = "training_curves.png", *,
                         baselines: Optional[dict] = None, twin_workdir: str = "",
                         upper_bound: bool = True) -> str:
  """Train loss and validation perplexity against step, from metrics.jsonl; returns the path.

  baselines: the count baselines' results (`baselines.cached`: {"unigram": {"valid": ...},
  "bigram": {...}}), drawn as horizontal lines; twin_workdir: an autoregressive model's workdir
  whose periodic readings and final number are drawn beside this run's; upper_bound: the run's
  numbers are bounds (diffusion), said on the axis.
  """
  plt = pyplot()
  records = metrics_log.read(os.path.join(workdir, "metrics.jsonl"))
  train = [r for r in records if r["kind"] == "train" and isinstance(r.get("loss"), float)]
  evals = _evals(records)
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  if train:
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
  ax1.set_xlabel("step")
  ax1.set_ylabel("training loss (nats/token)")
  ax1.set_title("training loss")
  ax1.grid(alpha=0.3)

  what = "bound" if upper_bound else "exact"
  values = []
  if evals:
    ys = [r["valid_word_ppl"] for r in evals]
    values += ys
    ax2.plot([r["step"] for r in evals], ys, marker="o", ms=3, color="C0",
             label=f"this run, periodic ({what}; {_tokens_label(evals)})")
  final = _final_valid(workdir)
  if final:
    values.append(final[1])
    ax2.plot([final[0]], [final[1]], marker="*", ms=12, ls="none", color="C0",
             label=f"this run, full valid split: {final[1]:,.1f}")
  if twin_workdir:
    twin = _evals(metrics_log.read(os.path.join(twin_workdir, "metrics.jsonl")))
    if twin:
      ys = [r["valid_word_ppl"] for r in twin]
      values += ys
      ax2.plot([r["step"] for r in twin], ys, marker="s", ms=3, color="C2",
               label="autoregressive twin, periodic (exact)")
    twin_final = _final_valid(twin_workdir)
    if twin_final:
      values.append(twin_final[1])
      ax2.plot([twin_final[0]], [twin_final[1]], marker="*", ms=12, ls="none", color="C2",
               label=f"autoregressive twin, full valid split: {twin_final[1]:,.1f}")
  for name, style in (("unigram", ":"), ("bigram", "--")):
    v = ((baselines or {}).get(name) or {}).get("valid")
    if v:
      values.append(v["word_ppl"])
      ax2.axhline(v["word_ppl"], color="0.35", ls=style, lw=1.2,
                  label=f"{name} (counts), full valid split: {v['word_ppl']:,.1f}")
  if values:
    ax2.set_yscale("log")
    lo, hi = min(values), max(values)
    ax2.set_ylim(lo / 1.15, hi * 1.15)
    _log_ticks(ax2)
    ax2.legend(fontsize=7.5, loc="upper right")
  ax2.set_xlabel("step")
  ax2.set_ylabel("validation word perplexity" + (" (upper bound)" if upper_bound else ""))
  ax2.set_title("validation perplexity")
  ax2.grid(alpha=0.3, which="both")
  fig.tight_layout()
  path = os.path.join(workdir, filename)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
