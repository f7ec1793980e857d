"""Where a compiled step's time goes on XLA:CPU, and which processor ran it.

`profile_steps(run_step, n)` traces `n` calls of a step with `jax.profiler` and `breakdown`
reads the trace (an XSpace, through `jax.profiler.ProfileData`): over the window from the first
XLA op to the last,
  * each XLA thread's busy time and idle fraction: at each instant the innermost event of a
    thread says what it does; an op (a fusion, a dot, a copy, ...) or the thunk executor itself
    is busy, a wait (`ThunkExecutor::Execute (wait for completion)`, `SlinkyThreadPool::Await`)
    or no event is idle;
  * how long 0, 1, 2, ... threads were busy at once (`busy_threads_s`): the time with 0 is the
    step's gaps (dispatch, synchronisation, Python), the time with 1 is where the other
    threads wait;
  * the ops by their own time (a nested op's time is not its parent's), and by the time each
    ran while it was the only busy thread;
  * the longest gaps, each with the op that ended before it and the op that started after it.
XLA:CPU runs ops on threads named `tf_XLA...` (its client's and Eigen's pools); the profiler's
region markers (`ThreadpoolListener::...`, `end: ...`) and other threads are ignored.

`processor()` says which processor a number comes from: its model, the ISA extensions that decide
XLA:CPU's and oneDNN's kernels, and the CPUs this process may use.
"""

import glob
import os
import platform
import tempfile
from typing import Any, Callable, Iterable

# ISA extensions worth naming beside a CPU throughput number (Linux /proc/cpuinfo flag names).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def processor() -> dict[str, Any]:
  """{"model", "isa", "logical_cpus", "usable_cpus", "machine"}: this machine's processor."""
  model, flags = "", set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "cpu model") and not model:
          model = value.strip()
        elif key in ("flags", "Features") and not flags:
          flags = set(value.split())
  except OSError:
    pass
  try:
    usable = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    usable = os.cpu_count()
  return {"model": model or platform.processor() or "unknown",
          "isa": [f for f in ISA_FLAGS if f in flags], "logical_cpus": os.cpu_count(),
          "usable_cpus": usable, "machine": platform.machine()}


def _is_xla_thread(name: str) -> bool:
  return name.startswith("tf_XLA")


# Events that wrap ops: while one is the innermost event of a thread, the thread waits (idle), or
# runs the thunk executor itself (busy, counted as EXECUTOR). Every other named event is an op.
WAITS = ("ThunkExecutor::Execute (wait for completion)", "SlinkyThreadPool::Await")
EXECUTOR = "ThunkExecutor::Execute"


def _is_marker(name: str) -> bool:
  return name.startswith("ThreadpoolListener") or name.startswith("end: ")


def _busy_segments(events) -> list[tuple[float, float, str]]:
  """One thread's events (start, stop, name), possibly nested, as non-overlapping busy segments
  (start, stop, op): at each instant the innermost event says what the thread does; a wait (or
  no event) is idle; a nested op's time is its own, not its parent's."""
  bounds = []
  for i, (a, b, name) in enumerate(events):
    if b > a:
      bounds += [(a, 1, -b, i), (b, 0, 0.0, i)]  # ends first; an outer event starts first
  bounds.sort()
  stack, out, t = [], [], None
  for when, kind, _, i in bounds:
    if stack and t is not None and when > t:
      name = events[stack[-1]][2]
      if name not in WAITS:
        if out and out[-1][2] == name and out[-1][1] == t:
          out[-1] = (out[-1][0], when, name)
        else:
          out.append((t, when, name))
    if kind:
      stack.append(i)
    else:
      stack.remove(i)
    t = when
  return out


def breakdown(xspace, *, steps: int, top: int = 12) -> dict[str, Any]:
  """The breakdown of a trace (see the module docstring); `xspace`: a `ProfileData`, a path to
  an `.xplane.pb` or a directory holding one. Times in seconds."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  if isinstance(xspace, (str, os.PathLike)):
    xspace = ProfileData.from_file(find_xplane(xspace))
  threads, counts = {}, {}
  for plane in xspace.planes:
    for line in plane.lines:
      if not _is_xla_thread(line.name):
        continue
      events = [(e.start_ns * 1e-9, e.end_ns * 1e-9, e.name) for e in line.events
                if not _is_marker(e.name)]
      for _, _, name in events:
        counts[name] = counts.get(name, 0) + 1
      segments = _busy_segments(events)
      if segments:
        threads[f"{plane.name}/{line.name}"] = segments
  if not threads:
    return {"steps": steps, "window_s": 0.0, "threads": [], "note": "no XLA ops in the trace"}
  start = min(seg[0][0] for seg in threads.values())
  stop = max(seg[-1][1] for seg in threads.values())
  window = stop - start

  # Sweep over every segment boundary: how many threads are busy, and which op runs alone.
  bounds = []
  for tid, segments in enumerate(threads.values()):
    for a, b, name in segments:
      bounds += [(a, 1, tid, name), (b, -1, tid, name)]
  bounds.sort(key=lambda x: (x[0], x[1]))  # at a shared instant, ends before starts
  active: dict[int, str] = {}
  hist: dict[int, float] = {}
  alone: dict[str, float] = {}
  gaps, last_end_name, t = [], None, start
  for when, kind, tid, name in bounds:
    dt = when - t
    if dt > 0:
      hist[len(active)] = hist.get(len(active), 0.0) + dt
      if len(active) == 1:
        only = next(iter(active.values()))
        alone[only] = alone.get(only, 0.0) + dt
      elif not active:
        gaps.append({"s": dt, "after": last_end_name, "before": name, "at_s": t - start})
    if kind > 0:
      active[tid] = name
    else:
      active.pop(tid, None)
      last_end_name = name
    t = when

  totals: dict[str, float] = {}
  for segments in threads.values():
    for a, b, name in segments:
      totals[name] = totals.get(name, 0.0) + (b - a)
  busy_sum = sum(totals.values())
  by_time = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
  per_thread = sorted(({"thread": k, "busy_s": sum(b - a for a, b, _ in segments)}
                       for k, segments in threads.items()), key=lambda d: -d["busy_s"])
  for d in per_thread:
    d["idle_fraction"] = 1.0 - d["busy_s"] / window if window > 0 else 0.0
  return {
      "steps": steps, "window_s": window, "per_step_s": window / max(steps, 1),
      "threads": per_thread,
      "busy_threads_s": {str(k): v for k, v in sorted(hist.items())},
      "gap_fraction": hist.get(0, 0.0) / window if window > 0 else 0.0,
      "ops_by_time": [{"op": k, "count": counts.get(k, 0), "self_s": v,
                       "share_of_busy": v / busy_sum if busy_sum else 0.0}
                      for k, v in by_time],
      "ops_alone": [{"op": k, "alone_s": v}
                    for k, v in sorted(alone.items(), key=lambda kv: -kv[1])[:top]],
      "longest_gaps": sorted(gaps, key=lambda g: -g["s"])[:top],
      "gaps": len(gaps)}


def find_xplane(path) -> str:
  """The newest `.xplane.pb` at `path` (a file, or a directory searched recursively)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
  if not found:
    raise FileNotFoundError(f"no .xplane.pb under {path}")
  return max(found, key=os.path.getmtime)


def profile_steps(run_step: Callable[[], Any], n: int, *, top: int = 12) -> dict[str, Any]:
  """Traces `n` calls of `run_step()` (each must block until its step is done) and returns
  their `breakdown`."""
  import jax  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="step_profile_") as logdir:
    with jax.profiler.trace(logdir):
      for _ in range(n):
        run_step()
    return breakdown(logdir, steps=n, top=top)


def summary(b: dict[str, Any]) -> str:
  """One line: per-step time, how many threads were busy for which share, the top ops."""
  if not b.get("threads"):
    return "no XLA ops traced"
  w = b["window_s"] or 1.0
  shares = ", ".join(f"{k} busy {v / w:.0%}" for k, v in b["busy_threads_s"].items())
  ops = ", ".join(f"{o['op']} {o['share_of_busy']:.0%}" for o in b["ops_by_time"][:4])
  return f"{b['per_step_s'] * 1e3:.0f} ms/step traced; threads {shares}; top ops {ops}"
