"""Quality of generated token sequences, the two numbers MDLM and DUO report for samples.

unigram entropy      the entropy (nats) of the empirical token distribution within one sample,
                     averaged over the samples. A sample of L distinct tokens has log L; one
                     that repeats a few tokens has little. Read it together with:
generative perplexity exp(total NLL / total tokens) of the samples under a *judge*, an
                     autoregressive model (exact NLL) of the same data and vocabulary. Lower is
                     more likely under the judge; a sampler that repeats itself also scores low,
                     which is what the entropy shows.

A quality table has one row per sampler step count of the model (`<objective>@<steps>`), one for
the judge's own samples (`ar`: what its exact likelihood says of text it generates itself at the
same length and temperature) and one for held-out real text (`real`: blocks of the validation
split, the reference both numbers should approach). Without a judge only entropies are reported.

Everything here is a pure function of token ids (numpy); drawing samples and scoring them with a
network are passed in as callables (`bdiff_jax/modes/sample.py` does that).
"""

from typing import Callable, Optional, Sequence

import numpy as np

from bdiff_jax.data import pipeline
from bdiff_jax.errors import ConfigError

# rows int32[N, L] -> -log p(row) in nats, float[N]
NllFn = Callable[[np.ndarray], np.ndarray]


def _check_rows(rows) -> np.ndarray:
  rows = np.asarray(rows)
  if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
    raise ValueError(f"rows must be a non-empty 2-D array of token ids, got shape {rows.shape}")
  return rows


def unigram_entropy(rows) -> np.ndarray:
  """float64[num_rows]: the entropy (nats) of each row's empirical token distribution."""
  rows = _check_rows(rows)
  out = np.empty(rows.shape[0], np.float64)
  for i, row in enumerate(rows):
    _, counts = np.unique(row, return_counts=True)
    p = counts / row.size
    out[i] = -float(np.sum(p * np.log(p)))
  return np.maximum(out, 0.0)  # a constant row: exactly 0, never -0.0


def mean_entropy(rows) -> float:
  """The mean over rows of `unigram_entropy` (the number the papers report)."""
  return float(unigram_entropy(rows).mean())


def generative_perplexity(nll_per_row, num_tokens: int) -> float:
  """exp(total NLL / total tokens): the judge's perplexity of the samples."""
  nll = np.asarray(nll_per_row, np.float64)
  if num_tokens <= 0:
    raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
  return float(np.exp(nll.sum() / num_tokens))


def real_text_rows(tokens: np.ndarray, length: int, num_rows: int) -> np.ndarray:
  """int32[K, length]: K = min(num_rows, blocks in the split) blocks of `length` tokens at
  evenly spaced block indices of the stream (`pipeline.spread_blocks`' choice: a prefix of a
  split is not representative)."""
  blocks, _ = pipeline.eval_blocks(tokens, length)
  n = blocks.shape[0]
  if n == 0:
    raise ConfigError(f"the validation split has {np.asarray(tokens).size} tokens, fewer than "
                      f"config.sample.length={length}: no block of real text to compare with.",
                      "lower --config.sample.length.")
  k = min(int(num_rows), n)
  return blocks[(np.arange(k) * n) // k]


def score(name: str, num_steps: Optional[int], rows, judge_nll: Optional[NllFn] = None) -> dict:
  """One row of the table: {name, num_steps, gen_ppl (None without a judge), entropy (mean),
  num_tokens, num_samples, entropy_per_sample, nll_per_sample (nats; None without a judge)}."""
  rows = _check_rows(rows)
  entropy = unigram_entropy(rows)
  out = {"name": name, "num_steps": num_steps, "gen_ppl": None,
         "entropy": float(entropy.mean()), "num_tokens": int(rows.size),
         "num_samples": int(rows.shape[0]), "entropy_per_sample": entropy.tolist(),
         "nll_per_sample": None}
  if judge_nll is not None:
    nll = np.asarray(judge_nll(rows), np.float64)
    if nll.shape != (rows.shape[0],):
      raise ValueError(f"judge_nll gave shape {nll.shape} for {rows.shape[0]} rows")
    out["gen_ppl"] = generative_perplexity(nll, rows.size)
    out["nll_per_sample"] = nll.tolist()
  return out


def quality_table(model_draws: Sequence[tuple[str, Optional[int], Callable[[], np.ndarray]]],
                  *, real: np.ndarray, judge_nll: Optional[NllFn] = None,
                  judge_draw: Optional[Callable[[], np.ndarray]] = None) -> list[dict]:
  """The rows of the quality table, in order: the model's draws, `ar`, `real`.

  Args:
    model_draws: (row name, sampler step count or None, draw() -> int32[N, L]) per row of the
      sampled model, e.g. ("diffusion@32", 32, ...); drawn in this order, one at a time.
    real: int32[K, L] held-out text (`real_text_rows`).
    judge_nll: the judge's -log p per row; None: entropies only.
    judge_draw: the judge's own samples (the `ar` row); None: no such row.
  """
  rows = [score(name, steps, draw(), judge_nll) for name, steps, draw in model_draws]
  if judge_draw is not None:
    rows.append(score("ar", None, judge_draw(), judge_nll))
  rows.append(score("real", None, real, judge_nll))
  return rows


def format_table(rows: Sequence[dict]) -> str:
  """The table as plain aligned text (one line per row, a header line)."""
  cells = [("row", "steps", "gen_ppl", "entropy", "tokens")]
  for r in rows:
    cells.append((r["name"], "-" if r["num_steps"] is None else str(r["num_steps"]),
                  "-" if r["gen_ppl"] is None else f"{r['gen_ppl']:.2f}",
                  f"{r['entropy']:.3f}", str(r["num_tokens"])))
  widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
  return "\n".join("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                    for i, (c, w) in enumerate(zip(line, widths)))
                   for line in cells)
