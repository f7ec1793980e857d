"""Memory and speed of one training step: standard vs reversible (recompute / autodiff) backbones.

`run_memory_benchmark(config, workdir)` measures, for every depth in `config.benchmark.depths`,
sequence length in `config.benchmark.seq_lens` and backbone in `config.benchmark.backbones`, the
real train step of `bdiff_jax.train.train_step.make_train_step` (forward + backward of the
diffusion loss, gradient clipping, AdamW update and EMA, state donated) on random tokens:

  compiled memory  `jit(step).lower(state, batch).compile().memory_analysis()`: temp bytes (the
                   activations and other scratch buffers XLA allocates inside the step), argument
                   bytes (train state + batch), output bytes (new state + metrics) and alias bytes
                   (outputs written into donated argument buffers). "total" is
                   temp + argument + output as the issue defines it; since the state is donated,
                   temp + argument + output - alias is closer to what the step really holds.
  peak RSS         the process's peak resident set size after the steps (VmHWM on Linux, else
                   `ru_maxrss`); each configuration runs in a fresh subprocess so that it is per
                   configuration (it includes the JAX runtime and XLA's compiler, so it is
                   meaningful on CPU only and mostly at large sizes).
  step time        median wall time of `benchmark.steps` steps after one warm-up step (compile
                   excluded; the minimum is saved too, being less sensitive to other load).

The JSON also has XLA's `peak_memory_in_bytes` (on CPU it reports the argument buffers only) and
`param_bytes` (one copy of the parameters: the size of the gradient buffer, which is part of the
temp bytes and grows with depth for every backbone).

Argument and output bytes contain the parameters, gradients' optimizer state (AdamW moments) and
EMA copy, which grow linearly with depth for every backbone; the activation memory the reversible
backbone saves shows up in the temp bytes. Both are reported, and the issue's targets are checked
on the total and, as a diagnostic, on the temp bytes alone:

  depth:  reversible/recompute at the deepest depth <= 1.25x its memory at the shallowest,
  memory: reversible/recompute <= 0.3x standard at the deepest depth,
  time:   reversible/recompute step time <= 1.4x standard at the deepest depth,

reported as PASS/FAIL per sequence length (nothing is asserted). Writes `memory_benchmark.json`
and `memory_benchmark.png` to the workdir; progress, the table and the targets go to the
`Reporter` passed to `run` / `run_memory_benchmark`.

The worker for one configuration is this module run as a script:
  python -m bdiff_jax.benchmarks.memory --worker '<json>'
Worker protocol: the worker writes its result to stdout as one line, `WORKER_RESULT_PREFIX`
followed by the result as JSON; the parent reads the last such line (anything else the worker or
its libraries print is ignored).
"""

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from bdiff_jax.benchmarks import step_memory
from bdiff_jax.config import configuration
from bdiff_jax.errors import ConfigError
from bdiff_jax.evaluation import plotting
from bdiff_jax.runtime.reporter import Reporter
from bdiff_jax.train import train_state

BACKBONES = ("standard", "reversible/recompute", "reversible/autodiff")
RESULTS_FILE = "memory_benchmark.json"
PLOT_FILE = "memory_benchmark.png"
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_MB = 1024.0 * 1024.0
# The worker's result line on stdout: this prefix, then one JSON object (see the docstring).
WORKER_RESULT_PREFIX = "bdiff-memory-worker-result: "

# Issue targets: (name, limit).
TARGET_DEPTH = 1.25
TARGET_MEMORY = 0.3
TARGET_TIME = 1.4


def case_config(config: ml_collections.ConfigDict, backbone: str, depth: int,
                seq_len: int) -> ml_collections.ConfigDict:
  """The full config of one benchmark configuration (model width etc. from config.benchmark)."""
  b = config.benchmark
  c = copy.deepcopy(config)
  kind, _, backward = backbone.partition("/")
  c.model.backbone = kind
  if kind == "reversible":
    c.model.reversible_backward = backward or "recompute"
  c.model.num_layers = int(depth)
  c.model.emb_dim = int(b.width)
  c.model.mlp_dim = int(b.mlp_ratio * b.width)
  c.model.num_heads = int(b.num_heads)
  c.model.num_kv_heads = int(b.num_heads)
  c.model.head_dim = int(b.width // b.num_heads)
  c.data.seq_len = int(seq_len)
  c.train.batch_size = int(b.batch_size)
  return c


def _ru_maxrss_mb() -> float:
  # ru_maxrss is in kilobytes on Linux (bytes on macOS).
  scale = 1.0 if sys.platform == "darwin" else 1024.0
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / _MB


def _rss_mb() -> float:
  """Peak resident set size of this process in MB.

  Linux keeps ru_maxrss across fork + exec, so a worker started from a big parent (e.g. pytest)
  would report the parent's peak; the kernel's VmHWM (high-water mark of this process's own
  address space) does not have that problem and is used when available.
  """
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return float(line.split()[1]) * 1024.0 / _MB
  except OSError:
    pass
  return _ru_maxrss_mb()


def measure_one(config: ml_collections.ConfigDict, backbone: str, depth: int,
                seq_len: int) -> dict[str, Any]:
  """Compiles and runs the train step of one configuration in this process."""
  jax.numpy.zeros(()).block_until_ready()
  rss_baseline = _rss_mb()
  b = config.benchmark
  c = case_config(config, backbone, depth, seq_len)
  configuration.validate(c)
  t0 = time.perf_counter()
  built = step_memory.compile_train_step(c, b.vocab_size)
  compile_s = time.perf_counter() - t0
  compiled, stats = built.compiled, built.stats
  # Initialisation runs once: compile it without LLVM optimisation (saves seconds per case).
  init = jax.jit(lambda: train_state.init_train_state(built.network, built.rule, seed=c.seed,
                                                      seq_len=seq_len),
                 compiler_options={"xla_backend_optimization_level": 0})
  state = init()
  rng = np.random.default_rng(c.seed)
  batches = [jax.device_put(rng.integers(0, b.vocab_size, (b.batch_size, seq_len),
                                         dtype=np.int32)) for _ in range(2)]

  times, losses = [], []
  for i in range(1 + int(b.steps)):  # step 0 warms up
    t0 = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2])
    loss = float(jax.block_until_ready(metrics["loss"]))
    jax.block_until_ready(state)
    if i:
      times.append(time.perf_counter() - t0)
    losses.append(loss)
  num_params = built.num_params
  return {
      "backbone": backbone, "depth": int(depth), "seq_len": int(seq_len),
      "num_params": num_params,
      "param_bytes": int(sum(x.nbytes for x in jax.tree_util.tree_leaves(state.params))),
      **{k: stats[k] for k in ("temp_bytes", "argument_bytes", "output_bytes", "alias_bytes",
                               "total_bytes", "held_bytes", "peak_memory_bytes")},
      "rss_peak_mb": _rss_mb(), "rss_baseline_mb": rss_baseline,
      "ru_maxrss_mb": _ru_maxrss_mb(),
      "step_time_s": statistics.median(times), "step_time_min_s": min(times),
      "step_times_s": times,
      "compile_s": compile_s, "losses": losses,
      "all_finite": bool(np.all(np.isfinite(losses))),
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
  }


def _run_isolated(config, backbone: str, depth: int, seq_len: int) -> dict[str, Any]:
  """`measure_one` in a fresh Python process (so that its peak RSS is its own)."""
  payload = json.dumps({"config": config.to_dict(), "backbone": backbone, "depth": depth,
                        "seq_len": seq_len})
  env = dict(os.environ)
  env["PYTHONPATH"] = _REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  try:
    proc = subprocess.run([sys.executable, "-m", "bdiff_jax.benchmarks.memory", "--worker",
                           payload], capture_output=True, text=True, env=env, cwd=_REPO,
                          timeout=float(config.benchmark.timeout_s), check=False)
  except subprocess.TimeoutExpired:
    return {"backbone": backbone, "depth": depth, "seq_len": seq_len,
            "error": f"timed out after {config.benchmark.timeout_s} s"}
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(WORKER_RESULT_PREFIX)]
  if proc.returncode != 0 or not lines:
    tail = proc.stderr.strip().splitlines()[-3:]
    return {"backbone": backbone, "depth": depth, "seq_len": seq_len,
            "error": f"exit status {proc.returncode}: {' | '.join(tail)}"}
  return json.loads(lines[-1][len(WORKER_RESULT_PREFIX):])


def _find(results, backbone, depth, seq_len):
  for r in results:
    if (r["backbone"], r["depth"], r["seq_len"]) == (backbone, depth, seq_len) and \
        "error" not in r:
      return r
  return None


def check_targets(results: list[dict], depths, seq_lens) -> list[dict]:
  """The issue's targets per sequence length, on total bytes and (diagnostic) temp bytes."""
  lo, hi = min(depths), max(depths)
  checks = []

  def add(seq_len, name, metric, value, limit, what):
    if value is None:
      checks.append({"seq_len": seq_len, "target": name, "metric": metric, "value": None,
                     "limit": limit, "status": "MISSING", "description": what})
    else:
      checks.append({"seq_len": seq_len, "target": name, "metric": metric, "value": value,
                     "limit": limit, "status": "PASS" if value <= limit else "FAIL",
                     "description": what})

  for seq_len in seq_lens:
    rev_hi = _find(results, "reversible/recompute", hi, seq_len)
    rev_lo = _find(results, "reversible/recompute", lo, seq_len)
    std_hi = _find(results, "standard", hi, seq_len)
    for metric in ("total_bytes", "temp_bytes"):
      ratio = lambda a, b, m=metric: (a[m] / b[m]) if a and b and b[m] else None
      add(seq_len, "depth", metric, ratio(rev_hi, rev_lo), TARGET_DEPTH,
          f"reversible/recompute {hi} layers / {lo} layers")
      add(seq_len, "memory", metric, ratio(rev_hi, std_hi), TARGET_MEMORY,
          f"reversible/recompute / standard at {hi} layers")
    t = (rev_hi["step_time_s"] / std_hi["step_time_s"]) if rev_hi and std_hi else None
    add(seq_len, "time", "step_time_s", t, TARGET_TIME,
        f"reversible/recompute / standard step time at {hi} layers")
  return checks


def format_table(results: list[dict]) -> str:
  head = (f"{'seq':>5} {'depth':>5} {'backbone':<21} {'temp MB':>9} {'arg MB':>8} "
          f"{'out MB':>8} {'alias MB':>8} {'total MB':>9} {'held MB':>8} {'RSS MB':>7} "
          f"{'step s':>7} {'compile s':>9}")
  lines = [head, "-" * len(head)]
  for r in sorted(results, key=lambda r: (r["seq_len"], r["depth"],
                                          BACKBONES.index(r["backbone"])
                                          if r["backbone"] in BACKBONES else 9)):
    if "error" in r:
      lines.append(f"{r['seq_len']:>5} {r['depth']:>5} {r['backbone']:<21} ERROR {r['error']}")
      continue
    lines.append(
        f"{r['seq_len']:>5} {r['depth']:>5} {r['backbone']:<21} {r['temp_bytes'] / _MB:>9.1f} "
        f"{r['argument_bytes'] / _MB:>8.1f} {r['output_bytes'] / _MB:>8.1f} "
        f"{r['alias_bytes'] / _MB:>8.1f} {r['total_bytes'] / _MB:>9.1f} "
        f"{r['held_bytes'] / _MB:>8.1f} {r['rss_peak_mb']:>7.0f} {r['step_time_s']:>7.3f} "
        f"{r['compile_s']:>9.1f}")
  return "\n".join(lines)


def format_targets(checks: list[dict]) -> str:
  lines = []
  for c in checks:
    value = "n/a" if c["value"] is None else f"{c['value']:.3f}x"
    kind = "" if c["metric"] != "temp_bytes" else "  (diagnostic: activations only)"
    lines.append(f"[{c['status']:<7}] seq {c['seq_len']:>5} {c['target']:<6} "
                 f"{c['metric']:<12} {value:>8} (limit {c['limit']}x): "
                 f"{c['description']}{kind}")
  return "\n".join(lines)


def plot(results: list[dict], seq_lens, path: str) -> None:
  """Memory (total solid, temp dashed) and step time against depth, one column per seq_len."""
  plt = plotting.pyplot()

  n = len(seq_lens)
  fig, axes = plt.subplots(2, n, figsize=(4.5 * n, 7.5), squeeze=False)
  # standard and reversible/autodiff keep the same activations and overlap: thick vs thin lines.
  styles = {"standard": dict(color="tab:blue", lw=4.0, ms=8, alpha=0.45),
            "reversible/recompute": dict(color="tab:red", lw=1.8, ms=5),
            "reversible/autodiff": dict(color="tab:green", lw=1.2, ms=4)}
  for j, seq_len in enumerate(seq_lens):
    ax_mem, ax_time = axes[0, j], axes[1, j]
    for backbone in BACKBONES:
      rows = sorted((r for r in results if r["backbone"] == backbone and r["seq_len"] == seq_len
                     and "error" not in r), key=lambda r: r["depth"])
      if not rows:
        continue
      d = [r["depth"] for r in rows]
      st = styles[backbone]
      ax_mem.plot(d, [r["total_bytes"] / _MB for r in rows], "o-", label=f"{backbone} total",
                  **st)
      ax_mem.plot(d, [r["temp_bytes"] / _MB for r in rows], "s--", label=f"{backbone} temp",
                  **st)
      ax_time.plot(d, [r["step_time_s"] for r in rows], "o-", label=backbone, **st)
    ax_mem.set_title(f"train-step memory, seq_len {seq_len}")
    ax_mem.set_xlabel("layers")
    ax_mem.set_ylabel("MB (compiled memory analysis)")
    ax_mem.grid(alpha=0.3)
    ax_time.set_title(f"step time, seq_len {seq_len}")
    ax_time.set_xlabel("layers")
    ax_time.set_ylabel("seconds (median)")
    ax_time.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  axes[1, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_memory_benchmark(config: ml_collections.ConfigDict, workdir: str,
                         reporter: Optional[Reporter] = None) -> dict[str, Any]:
  """Runs every configuration (each in a fresh subprocess), writes JSON + PNG, reports progress,
  a table and PASS/FAIL per target (default: `Reporter()`, to stdout). Returns the JSON content."""
  reporter = reporter or Reporter()
  b = config.benchmark
  depths = [int(d) for d in b.depths]
  seq_lens = [int(s) for s in b.seq_lens]
  backbones = [str(x) for x in b.backbones]
  for x in backbones:
    if x not in BACKBONES:
      raise ValueError(f"unknown benchmark backbone {x!r}; use {BACKBONES}")
  os.makedirs(workdir, exist_ok=True)
  results = []
  cases = [(s, d, x) for s in seq_lens for d in depths for x in backbones]
  t_start = time.time()
  for i, (seq_len, depth, backbone) in enumerate(cases):
    r = _run_isolated(config, backbone, depth, seq_len)
    results.append(r)
    if "error" in r:
      status = f"ERROR {r['error']}"
    else:
      status = (f"total {r['total_bytes'] / _MB:.1f} MB, temp {r['temp_bytes'] / _MB:.1f} MB, "
                f"{r['step_time_s']:.3f} s/step")
    reporter.info(f"[{i + 1}/{len(cases)}] seq {seq_len} depth {depth} {backbone}: {status}")
  checks = check_targets(results, depths, seq_lens)
  out = {
      "config": config.benchmark.to_dict(),
      "model": config.model.to_dict(),
      "environment": {"python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                      "wall_seconds": time.time() - t_start},
      "results": results,
      "targets": checks,
  }
  ok = [r for r in results if "error" not in r]
  if ok:
    out["environment"].update(device=ok[0]["device"], backend=ok[0]["backend"])
  with open(os.path.join(workdir, RESULTS_FILE), "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)
  plot(results, seq_lens, os.path.join(workdir, PLOT_FILE))
  reporter.info(format_table(results))
  reporter.info(format_targets(checks))
  reporter.info(f"wrote {os.path.join(workdir, RESULTS_FILE)} and "
                f"{os.path.join(workdir, PLOT_FILE)}")
  return out


def run(config: ml_collections.ConfigDict, workdir: str, reporter: Reporter) -> dict[str, Any]:
  """`main.py --mode=memory`."""
  if "benchmark" not in config:
    raise ConfigError("--mode=memory needs a benchmark config (a `benchmark` section).",
                      "pass --config configs/benchmark.py[:test|:gpu].")
  return run_memory_benchmark(config, workdir, reporter)


def _worker(payload: str) -> None:
  """Worker protocol: measures one configuration and writes the result line to stdout."""
  args = json.loads(payload)
  config = ml_collections.ConfigDict(args["config"])
  result = measure_one(config, args["backbone"], args["depth"], args["seq_len"])
  # The one print of the benchmarks: the machine-readable line the parent process parses.
  print(WORKER_RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
  else:
    sys.exit("usage: python -m bdiff_jax.benchmarks.memory --worker '<json>' "
             "(run the benchmark with main.py --mode=memory)")
