"""PNG plots people would rather look at than read."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from bdiff_jax import metrics_log


def plot_training_curves(workdir: str, filename: str = "training_curves.png") -> str:
  """Train loss and validation perplexity (bound) against step, from metrics.jsonl."""
  records = metrics_log.read(os.path.join(workdir, "metrics.jsonl"))
  train = [r for r in records if r["kind"] == "train" and isinstance(r.get("loss"), float)]
  evals = [r for r in records if r["kind"] == "eval" and "valid_word_ppl" in r]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  if train:
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train])
  ax1.set_xlabel("step")
  ax1.set_ylabel("training loss (nats/token)")
  ax1.set_title("training loss")
  ax1.grid(alpha=0.3)
  if evals:
    ax2.plot([r["step"] for r in evals], [r["valid_word_ppl"] for r in evals], marker="o")
    ax2.set_yscale("log")
  ax2.set_xlabel("step")
  ax2.set_ylabel("validation word perplexity")
  ax2.set_title("validation perplexity (upper bound for diffusion)")
  ax2.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, filename)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
