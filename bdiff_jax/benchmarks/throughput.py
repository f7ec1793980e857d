r"""Train-step throughput of the project against a PyTorch implementation of the same step.

    python -m bdiff_jax.benchmarks.throughput --shape reference      # d256 L4 H4 seq128 B32 V33278
    python -m bdiff_jax.benchmarks.throughput --shape cpu            # configs/wikitext2.py:cpu dims
    python -m bdiff_jax.benchmarks.throughput --memory_preset default   # XLA memory analysis only

The model on both sides (what ../shared/bench/torch_reference.py specifies): bidirectional
pre-norm transformer, learned positions, GELU MLP (4x), untied head over the V real tokens,
continuous-time ELBO of absorbing masked diffusion with a linear schedule on masked positions
only, AdamW, gradient clipping at 1. Ours is the project's real train step
(`bdiff_jax.train.train_step.make_train_step`, built in `throughput_jax.py`) at that shape; it
also does its usual extra work: adaLN time conditioning (the PyTorch model adds a linear
embedding of t instead), and an EMA of the params.

Systems measured (each a persistent worker process, so that its compiled step stays warm):
  jax:<loss>[/<override>...][@<flags>]  ours; <loss> = "masked" (head at masked positions
                        only, `diffusion_loss_gathered`), "masked:<R>" (the same, R rows of the
                        head at a time, for memory) or "full" (head at every position);
                        <override> = a config override "section.field=value" for this system
                        only, e.g. `jax:masked/model.head=adaptive`;
                        <flags> = XLA_FLAGS for the worker (commas allowed), default:
                        `xla_flags.apply_default_flags()`,
                        "none": no flags of ours.
  base[:<loss>[@<flags>]]  ours as built from another checkout (`--baseline_src DIR`, e.g. a
                        `git worktree` of the commit before a change): an A/B of a code change
                        in one run. Plain `base`: full head, no flags; with <loss>, as jax:.
                        The checkout must have the sub-package layout (bdiff_jax/train/, ...):
                        throughput_jax.py imports the project by those paths.
  torch_eager, torch_compile   the PyTorch step (`throughput_torch.py`; needs torch:
                        requirements-bench.txt).
Host allocator (bdiff_jax/runtime/host_allocator.py): our workers apply the project's malloc
settings, as main.py does (`--allocator system` leaves glibc's defaults); the PyTorch workers run with
glibc's defaults, as the reference script does (`--torch_allocator retain` gives them ours:
PyTorch's CPU allocator also gets its large buffers from malloc). A `%retain` or `%system`
suffix sets it for one system (`--systems jax:masked,jax:masked%system,torch_compile`). Each
system's JSON records what was applied ("allocator") and its peak resident memory.
Rounds run the systems one after another (A B C A B C ..., the order rotated each round), never
two at once; each reports the median step time over all its timed steps, tokens/s =
batch * seq / median, and the ratios to the PyTorch systems. The machine load (1-minute load
average) is recorded before and after.

Achieved GFLOP/s: matmul FLOPs of a step counted analytically (forward 2*m*n*k per product, the
backward twice that), with the head counted at the *expected number of masked positions*
(B * L / 2 for the linear schedule) for every system, divided by the median step time; compared
with a measured peak: the median time of a float32 [2048, 2048] x [2048, 2048] jnp matmul timed
in each round in the first jax worker. XLA's own count (`cost_analysis()['flops']` of the
compiled step, which includes the padded rows of the masked buffer and elementwise work) is
reported too.

Writes JSON (`--out`, default throughput_<shape>.json in the current directory).
"""

import argparse
import functools
import importlib.util
import json
import os
import re
import resource
import statistics
import subprocess
import sys
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = {"reference": dict(d=256, layers=4, heads=4, seq=128, batch=32, vocab=33278)}
VOCAB = 33278  # WikiText-2 v1 words incl. <eos>


def get_preset_config(preset: str):
  """configs/wikitext2.py:<preset> ("default" or "" for the default preset)."""
  spec = importlib.util.spec_from_file_location("_wt2_config",
                                                os.path.join(_REPO, "configs", "wikitext2.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset if preset != "default" else "")


def shape_from_preset(preset: str) -> dict[str, int]:
  """d, layers, heads, seq, batch of configs/wikitext2.py:<preset>, with the WikiText-2 vocab."""
  c = get_preset_config(preset)
  return dict(d=c.model.emb_dim, layers=c.model.num_layers, heads=c.model.num_heads,
              seq=c.data.seq_len, batch=c.train.batch_size, vocab=VOCAB)


def get_shape(name: str) -> dict[str, int]:
  return dict(SHAPES[name]) if name in SHAPES else shape_from_preset(name)


def step_matmul_flops(shape: dict[str, int], head_rows: float) -> float:
  """Matmul FLOPs of one train step (forward + backward = 3x forward); head on head_rows rows."""
  d, n, length = shape["d"], shape["batch"] * shape["seq"], shape["seq"]
  per_layer = n * (2 * (3 * d * d + d * d + 2 * d * 4 * d) + 2 * 2 * length * d)
  return 3.0 * (shape["layers"] * per_layer + head_rows * 2 * d * shape["vocab"])


def _max_rss_mib() -> float:
  """This process's peak resident memory so far (the host allocator keeps what it frees)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@functools.cache
def _this_checkout(relpath: str, name: str):
  """A module of this checkout loaded by its path (relative to bdiff_jax/), not by name: a base
  system's worker runs this file with another checkout first on its path, whose modules may
  differ or predate these."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), relpath)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _host_allocator():
  """This checkout's bdiff_jax/runtime/host_allocator.py."""
  return _this_checkout(os.path.join("runtime", "host_allocator.py"), "_bdiff_host_allocator")


def _step_profile():
  """This checkout's bdiff_jax/benchmarks/step_profile.py (the breakdown and the processor)."""
  return _this_checkout(os.path.join("benchmarks", "step_profile.py"), "_bdiff_step_profile")


def _apply_allocator(mode: str) -> str:
  """host_allocator.configure in `mode`, before the worker imports JAX or PyTorch."""
  module = _host_allocator()
  return module.configure(dict(os.environ, **{module.ENV_VAR: mode}))


def _worker_main(payload: str) -> None:
  args = json.loads(payload)
  args["allocator_applied"] = _apply_allocator(args.get("allocator", "system"))
  out = os.fdopen(os.dup(1), "w")  # the protocol channel; anything else printed goes to stderr
  os.dup2(2, 1)

  def reply(obj):
    out.write(json.dumps(obj) + "\n")
    out.flush()

  # The side measured, loaded only now (after the allocator settings): a PyTorch worker never
  # imports JAX, ours never PyTorch.
  side = _this_checkout(os.path.join("benchmarks", f"throughput_{args['kind']}.py"),
                        f"_bdiff_throughput_{args['kind']}")
  side.worker(args, reply, max_rss_mib=_max_rss_mib, preset_config=get_preset_config,
              profile_steps=_step_profile().profile_steps)


# ------------------------------------------------------------------------------------------------
# The parent: start workers, interleave rounds, report.


class Worker:
  """A persistent benchmark process answering one JSON line per command."""

  def __init__(self, name: str, args: dict[str, Any], *, python: str, src: str):
    self.name, self.args = name, args
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + _REPO)
    self.proc = subprocess.Popen(
        [python, os.path.abspath(__file__), "--worker", json.dumps(args)], env=env, cwd=src,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.info = None
    self.times: list[float] = []
    self.max_rss_mib = None
    self.breakdown = None

  def read(self) -> dict[str, Any]:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"benchmark worker {self.name} exited (code {self.proc.wait()}).")
    return json.loads(line)

  def send(self, cmd: dict[str, Any]) -> dict[str, Any]:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    return self.read()

  def close(self):
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.close()
      except OSError:
        pass
      self.proc.wait(timeout=60)


def split_systems(systems: str) -> list[str]:
  """The --systems list: split at each comma that starts a new system (jax:, base,
  torch_...), so that a system's XLA flags may hold commas themselves
  (`jax:masked@--xla_cpu_experimental_ynn_fusion_type=-reduce,-individual_dot`)."""
  return [s for s in re.split(r",(?=jax:|base\b|torch_)", systems) if s]


def _parse_system(spec: str, shape, opts) -> tuple[dict[str, Any], str]:
  """(worker args, source dir) for one --systems entry."""
  spec, _, allocator = spec.partition("%")
  if allocator and allocator not in _host_allocator().MODES:
    raise SystemExit(f"unknown allocator {allocator!r} in {spec}%{allocator}: use one of "
                     f"{', '.join(_host_allocator().MODES)}")
  args, src = _parse_system_name(spec, shape, opts)
  default = opts.torch_allocator if args["kind"] == "torch" else opts.allocator
  args["allocator"] = allocator or default
  return args, src


def _check_overrides(items, where: str) -> None:
  """Exits with one line for an override that `our_config` cannot apply."""
  for item in items:
    if "=" not in item or "." not in item.partition("=")[0]:
      raise SystemExit(f"bad override {item!r} {where}: use section.field=value")


def _parse_system_name(spec: str, shape, opts) -> tuple[dict[str, Any], str]:
  if spec in ("torch_eager", "torch_compile"):
    return {"kind": "torch", "shape": shape, "compile": spec == "torch_compile"}, _REPO
  name, _, rest = spec.partition(":")
  if name not in ("jax", "base") or (name == "jax" and not rest):
    raise SystemExit(f"unknown system {spec!r}")
  src = _REPO
  if name == "base":
    if not opts.baseline_src:
      raise SystemExit(f"system {spec!r} needs --baseline_src DIR")
    src = os.path.abspath(opts.baseline_src)
    if not rest:  # plain `base`: the full head, no flags of ours
      return {"kind": "jax", "shape": shape, "loss": "full", "flags": "none"}, src
  rest, _, flags = rest.partition("@")
  loss, *overrides = rest.split("/")
  if loss.partition(":")[0] not in ("masked", "full"):
    raise SystemExit(f"unknown loss {loss!r} in {spec!r}: use masked or full")
  _check_overrides(overrides, f"in {spec!r}")
  return {"kind": "jax", "shape": shape, "loss": loss, "flags": flags or None,
          "overrides": overrides}, src


def _load() -> float:
  return os.getloadavg()[0]


def run(opts) -> dict[str, Any]:
  shape = get_shape(opts.shape)
  python = {"jax": sys.executable, "torch": opts.torch_python or sys.executable}
  workers = []
  load_before = _load()
  try:
    for spec in split_systems(opts.systems):
      args, src = _parse_system(spec, shape, opts)
      w = Worker(spec, args, python=python[args["kind"]], src=src)
      w.info = w.read()  # one at a time: compiling never overlaps a timed step
      print(f"{spec}: ready {json.dumps(w.info)}", flush=True)
      workers.append(w)
    gemm = []
    gemm_worker = next((w for w in workers if w.args["kind"] == "jax"), None)
    for r in range(opts.rounds):
      order = workers[r % len(workers):] + workers[:r % len(workers)]
      for w in order:
        res = w.send({"cmd": "steps", "n": opts.steps})
        w.times += res["times"]
        w.max_rss_mib = res["max_rss_mib"]
        if w is gemm_worker:
          gemm.append(w.send({"cmd": "gemm"})["gflops"])
      print(f"round {r + 1}/{opts.rounds}: " + ", ".join(
          f"{w.name} {statistics.median(w.times[-opts.steps:]):.3f}s" for w in workers),
            flush=True)
    # After the timed rounds (tracing slows the steps it traces): where our steps' time goes.
    for w in workers:
      if w.args["kind"] == "jax" and opts.profile_steps > 0:
        w.breakdown = w.send({"cmd": "profile", "n": opts.profile_steps})
        print(f"{w.name}: {_step_profile().summary(w.breakdown)}", flush=True)
  finally:
    for w in workers:
      w.close()
  tokens = shape["batch"] * shape["seq"]
  useful = step_matmul_flops(shape, head_rows=tokens / 2)  # linear schedule: E[masked] = N / 2
  peak = statistics.median(gemm) if gemm else None
  systems = {}
  for w in workers:
    med = statistics.median(w.times)
    systems[w.name] = {
        "median_step_s": med, "min_step_s": min(w.times), "tokens_per_s": tokens / med,
        "step_times_s": w.times, "max_rss_mib": w.max_rss_mib,
        "gflops_per_s": useful / med / 1e9,
        "fraction_of_gemm_peak": (useful / med / 1e9 / peak) if peak else None, **w.info}
    if w.breakdown is not None:
      systems[w.name]["breakdown"] = w.breakdown
  for name, sys_ in systems.items():
    for ref in ("torch_eager", "torch_compile"):
      if ref in systems:
        sys_[f"ratio_to_{ref}"] = sys_["tokens_per_s"] / systems[ref]["tokens_per_s"]
  return {"shape": shape, "shape_name": opts.shape, "rounds": opts.rounds,
          "steps_per_round": opts.steps, "tokens_per_step": tokens,
          "useful_matmul_flops_per_step": useful, "gemm_peak_gflops_per_s": peak,
          "gemm_gflops_per_round": gemm, "load_1min_before": load_before,
          "load_1min_after": _load(), "cpu_count": os.cpu_count(),
          "processor": _step_profile().processor(), "systems": systems}


def memory_report(opts) -> dict[str, Any]:
  """XLA memory analysis of the train step of configs/wikitext2.py:<preset> (compile only)."""
  shape = shape_from_preset(opts.memory_preset)
  out = {"preset": opts.memory_preset, "shape": shape, "overrides": opts.set, "systems": {}}
  for spec in split_systems(opts.systems):
    args, src = _parse_system(spec, shape, opts)
    if args["kind"] != "jax":
      continue
    args.update(compile_only=True, preset=opts.memory_preset, set=opts.set)
    w = Worker(spec, args, python=sys.executable, src=src)
    try:
      info = w.read()
    finally:
      w.proc.wait(timeout=600)
    m = info["memory"]
    info["total_bytes"] = m["temp"] + m["argument"] + m["output"]
    out["systems"][spec] = info
    print(f"{spec}: temp {m['temp'] / 2**20:,.0f} MiB, argument {m['argument'] / 2**20:,.0f} MiB, "
          f"output {m['output'] / 2**20:,.0f} MiB, total {info['total_bytes'] / 2**20:,.0f} MiB",
          flush=True)
  return out


def _table(result: dict[str, Any]) -> str:
  cpu = result.get("processor") or {}
  lines = [f"processor: {cpu.get('model', '?')} ({', '.join(cpu.get('isa', [])) or 'no ISA flags'};"
           f" {cpu.get('usable_cpus', '?')} usable CPUs)",
           f"shape {result['shape']} ({result['shape_name']}); load {result['load_1min_before']:.1f}"
           f" -> {result['load_1min_after']:.1f} on {result['cpu_count']} cores; GEMM peak "
           f"{result['gemm_peak_gflops_per_s'] or float('nan'):.1f} GFLOP/s",
           f"{'system':28s} {'tokens/s':>9s} {'step ms':>8s} {'GFLOP/s':>8s} {'%peak':>6s}"
           f" {'/eager':>7s} {'/compile':>8s}"]
  for name, s in result["systems"].items():
    pct = s["fraction_of_gemm_peak"]
    lines.append(f"{name:28s} {s['tokens_per_s']:9,.0f} {s['median_step_s'] * 1e3:8.0f} "
                 f"{s['gflops_per_s']:8.1f} {(pct or 0) * 100:5.0f}% "
                 f"{s.get('ratio_to_torch_eager', float('nan')):7.2f} "
                 f"{s.get('ratio_to_torch_compile', float('nan')):8.2f}")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--shape", default="reference", help="reference, or a configs/wikitext2.py preset")
  p.add_argument("--systems", default="jax:masked,torch_eager,torch_compile")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=3, help="timed steps per system per round")
  p.add_argument("--profile_steps", type=int, default=2,
                 help="after the rounds, trace this many steps of each of our systems and add "
                 "the breakdown (per-thread busy time, gaps, ops; step_profile.py) to the JSON; "
                 "0: off")
  p.add_argument("--baseline_src", default="", help="checkout for the 'base' system")
  p.add_argument("--torch_python", default="", help="python with torch (default: this one)")
  p.add_argument("--allocator", default="retain", choices=_host_allocator().MODES,
                 help="host malloc settings of our workers (bdiff_jax/runtime/host_allocator.py)")
  p.add_argument("--torch_allocator", default="system", choices=_host_allocator().MODES,
                 help="host malloc settings of the PyTorch workers (default: glibc's, as the "
                 "reference script runs)")
  p.add_argument("--memory_preset", default="", help="only XLA memory analysis of this preset")
  p.add_argument("--set", action="append", default=[],
                 help="memory mode: config override for our step, e.g. model.backbone=reversible")
  p.add_argument("--out", default="")
  opts = p.parse_args(argv)
  _check_overrides(opts.set, "in --set")
  if opts.worker:
    _worker_main(opts.worker)
    return
  if opts.memory_preset:
    result = memory_report(opts)
    out = opts.out or f"throughput_memory_{opts.memory_preset}.json"
  else:
    result = run(opts)
    print(_table(result))
    out = opts.out or f"throughput_{opts.shape}.json"
  with open(out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
