"""Reruns issue 28's attack: every case that failed the reliability contract before, as a user
meets it (main.py in new processes, tiny configs, a temp dir per case), and prints a table
case -> met / not met with the evidence. A dev tool, not part of the test suite: ~15-25 min on 2
loaded CPU cores (two of its cases train with two processes).

  BDIFF_DATA_DIR=../shared/data/wikitext-2 python scripts/attack_reliability.py [--only a,b]

The harness is attack_harness.py. The contract (docs/reliability.md): one line `error: ... Fix: ...` (or the documented line),
the documented exit status, no traceback, nothing lost or overwritten (files hashed before and
after), resume where promised. Root ignores permission bits, so the read-only workdir and the
full disk are injected into main.py's own process (open/mkdir under the workdir raise EROFS;
fsync raises ENOSPC), as a read-only mount or a full disk would.
"""

import argparse
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attack_harness import (FIXTURE_OPT, Inputs, _env, _torch_bin, _units,  # pylint: disable=wrong-import-position
                            digest, finish, main_py, one_line, start, wait_for)


# ---------------------------------------------------------------------------------------- GLUE
def glue_sigkill_resume(inp, t):
  w = os.path.join(t, "w")
  args = inp.glue_args(w, steps=5000)
  p = start(args)
  if not wait_for(lambda: _units(w)):
    p.kill()
    return False, "no unit finished in 300 s"
  p.kill()
  p.wait()
  kept = digest(os.path.join(w, "glue_units"))
  r = main_py(args)
  after = digest(os.path.join(w, "glue_units"))
  same = all(after.get(k) == v for k, v in kept.items())
  ok = r.rc == 0 and same and len(after) == 2 and os.path.exists(os.path.join(w, "glue.json"))
  return ok, (f"SIGKILL after {len(kept)} unit(s); same command: exit {r.rc}, the kept unit "
              f"{'byte-identical' if same else 'CHANGED'}, {len(after)} units, glue.json "
              f"{'written' if os.path.exists(os.path.join(w, 'glue.json')) else 'missing'}")


def glue_other_seeds(inp, t):
  w = os.path.join(t, "w")
  r0 = main_py(inp.glue_args(w))
  before = digest(w)
  r = main_py(inp.glue_args(w, "--config.glue.seeds=(2,)"))
  after = digest(w)
  lost = [k for k, v in before.items() if after.get(k) != v and not k.startswith(".")]
  new = [k for k in after if k.startswith("glue-") and k.endswith(".json")]
  ok = r0.rc == 0 and r.rc == 0 and not lost and new
  return ok, f"exit {r0.rc}/{r.rc}; changed or lost: {lost or 'none'}; new results: {new}"


def glue_lock_and_sigterm(inp, t):
  w = os.path.join(t, "w")
  p = start(inp.glue_args(w, steps=5000))
  t0 = time.time()
  if not wait_for(lambda: _units(w)):
    p.kill()
    return False, "no unit finished in 300 s"
  second = main_py(inp.glue_args(w))
  lock_ok, lock_ev = one_line(second, 2, ("in use by another process",))
  p.send_signal(signal.SIGTERM)
  first = finish(p, t0)
  lines = [l for l in first.text.splitlines() if l.startswith("interrupted by SIGTERM")]
  ok = lock_ok and first.rc == 143 and len(lines) == 1 and "Traceback" not in first.text
  return ok, (f"second run: {lock_ev}; first run after SIGTERM: exit {first.rc}, "
              f"{lines[0][:160] if lines else first.text[-200:]}; units kept {len(_units(w))}")


def glue_sigint(inp, t):
  w = os.path.join(t, "w")
  p = start(inp.glue_args(w, steps=5000))
  t0 = time.time()
  if not wait_for(lambda: _units(w)):
    p.kill()
    return False, "no unit finished in 300 s"
  p.send_signal(signal.SIGINT)
  r = finish(p, t0)
  lines = [l for l in r.text.splitlines() if l.startswith("interrupted by SIGINT")]
  honest = lines and "units finished and kept" in lines[0] and "checkpoint saved" not in lines[0]
  ok = r.rc == 130 and len(lines) == 1 and honest and "Traceback" not in r.text
  return ok, f"exit {r.rc}: {lines[0][:200] if lines else r.text[-200:]}"


def glue_readonly(inp, t):
  w = os.path.join(t, "w")
  os.makedirs(w)
  r = main_py(inp.glue_args(w), inject=("readonly", w))
  ok, ev = one_line(r, 2, ("read-only",))
  return ok and r.secs < 120 and not os.listdir(w), f"{ev} (after {r.secs:.0f} s)"


def glue_disk_full_results(inp, t):
  w = os.path.join(t, "w")
  r0 = main_py(inp.glue_args(w))
  before = digest(w)
  r = main_py(inp.glue_args(w), inject=("enospc", w))  # the units are done: results only
  after = digest(w)
  lost = [k for k, v in before.items() if after.get(k) != v]
  ok, ev = one_line(r, 2, ("space",))
  return ok and r0.rc == 0 and not lost, f"{ev}; files changed or lost: {lost or 'none'}"


def _glue_refused(field_value, words=()):
  def case(inp, t):
    w = os.path.join(t, "w")
    r = main_py(inp.glue_args(w, field_value))
    ok, ev = one_line(r, 2, words)
    return ok and not os.path.exists(w), ev + ("" if not os.path.exists(w) else "; workdir made")
  return case


def glue_full_scale3(inp, t):
  r = main_py(["--config", "configs/glue.py:full,scale=3", "--workdir", os.path.join(t, "w"),
               "--mode=glue"])
  return one_line(r, 2, ("scale",))


def _nan_safetensors(path):
  """Sets the first value of the first float32 tensor of a safetensors file to NaN."""
  import json  # pylint: disable=import-outside-toplevel
  with open(path, "r+b") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    f.seek(8 + n + header[name]["data_offsets"][0])
    f.write(struct.pack("<f", float("nan")))
  return name


def glue_nan_start_weight(inp, t):
  opt = shutil.copytree(FIXTURE_OPT, os.path.join(t, "opt"))
  os.remove(os.path.join(opt, "pytorch_model.bin"))
  name = _nan_safetensors(os.path.join(opt, "model.safetensors"))
  r = main_py(inp.glue_args(os.path.join(t, "w"), f"--config.glue.opt_dir={opt}"))
  ok, ev = one_line(r, 2, ("non-finite",))
  return ok and "lower the" not in r.errors()[0] if r.errors() else False, f"NaN in {name}; {ev}"


def pytorch_bin_bomb(inp, t):
  opt = shutil.copytree(FIXTURE_OPT, os.path.join(t, "opt"))
  os.remove(os.path.join(opt, "model.safetensors"))
  path = _torch_bin(os.path.join(opt, "pytorch_model.bin"), size=(500_000_000,), stride=(0,),
                    numel=4, storage_bytes=16)
  measure = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
             "file=sys.stderr); sys.exit(r.returncode)")
  t0 = time.time()
  p = start(inp.glue_args(os.path.join(t, "w"), f"--config.glue.opt_dir={opt}"),
            prefix=(sys.executable, "-c", measure))
  r = finish(p, t0)
  rss = int(r.err.split("MAXRSS_KB")[-1].split()[0]) // 1024
  ok, ev = one_line(r, 2, ("elements",))
  return ok and rss < 1500, f"{os.path.getsize(path)}-byte file; {ev}; peak RSS {rss} MiB"


# -------------------------------------------------------------------------------- config files
def _config_file(source, mode="train"):
  def case(inp, t):
    path = os.path.join(t, "bad_config.py")
    with open(path, "w") as f:
      f.write(source)
    w = os.path.join(t, "w")
    r = main_py(["--config", path, "--workdir", w, f"--mode={mode}"])
    ok, ev = one_line(r, 2, ("bad_config.py",))
    return ok and not os.path.exists(w), ev
  return case


def glue_config_for_train(inp, t):
  w = os.path.join(t, "w")
  r = main_py(["--config", "configs/glue.py:test", "--workdir", w, "--mode=train"])
  ok, ev = one_line(r, 2, ("cannot serve",))
  return ok and not os.path.exists(w), ev


# -------------------------------------------------------------------- validation before writes
def _train_refused(override, words=()):
  def case(inp, t):
    w = os.path.join(t, "w")
    r = main_py(inp.train_args(w, override))
    ok, ev = one_line(r, 2, words)
    made = os.path.exists(w) and os.listdir(w)
    return ok and not made and "step None" not in r.text, ev + (f"; wrote {os.listdir(w)}"
                                                                if made else "; nothing written")
  return case


# ---------------------------------------------------------------------------- eval, checkpoints
def eval_other_seeds(inp, t):
  w = inp.trained(os.path.join(t, "w"))
  before = digest(w)
  r = main_py(inp.train_args(w, "--mode=eval", "--config.eval.seeds=(5,)"))
  after = digest(w)
  changed = [k for k, v in before.items() if after.get(k) != v and not k.endswith(".jsonl")]
  new = [k for k in after if k.startswith("eval_best") and k not in before]
  ok = r.rc == 0 and not changed and new
  return ok, f"exit {r.rc}; eval_best.json {'kept' if not changed else changed}; new: {new}"


def corrupt_latest_names_best(inp, t):
  w = inp.trained(os.path.join(t, "w"))
  step_dir = os.path.join(w, "checkpoints", "8")
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 2)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 0xFF]))
  r = main_py(inp.train_args(w, "--config.train.num_steps=12"))
  return one_line(r, 2, ("best",))


def orbax_tmp_folders(inp, t):
  w = inp.trained(os.path.join(t, "w"))
  tmp = os.path.join(w, "checkpoints", "12.orbax-checkpoint-tmp-1234567")
  os.makedirs(tmp)
  with open(os.path.join(tmp, "partial"), "wb") as f:
    f.write(b"x" * 100)
  kept = {k: v for k, v in digest(os.path.join(w, "checkpoints")).items() if "tmp" not in k}
  r = main_py(inp.train_args(w))
  after = digest(os.path.join(w, "checkpoints"))
  same = all(after.get(k) == v for k, v in kept.items())
  notes = [l for l in r.text.splitlines() if l.startswith("note:") and "tmp" in l]
  ok = r.rc == 0 and not os.path.exists(tmp) and same and notes
  return ok, (f"exit {r.rc}; tmp folder {'removed' if not os.path.exists(tmp) else 'LEFT'}; "
              f"committed checkpoints {'byte-identical' if same else 'CHANGED'}; "
              f"{notes[0][:150] if notes else 'no note line'}")


# ------------------------------------------------------------------------------- multi-process
def _children(pid):
  with open(f"/proc/{pid}/task/{pid}/children") as f:
    return [int(c) for c in f.read().split()]


def _lost_process(victim, stop=False):
  def case(inp, t):
    inp.trained(os.path.join(t, "warm"))  # the data cache is prepared before two processes race
    w = os.path.join(t, "w")
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    args = inp.train_args(w, "--config.train.num_steps=100000")
    procs = [start(args, env=_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                  JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i,
                                  BDIFF_PEER_TIMEOUT=10)) for i in (0, 1)]
    t0 = time.time()
    if not wait_for(lambda: os.path.isdir(os.path.join(w, "checkpoints", "4")), 600):
      for p in procs:
        p.kill()
      return False, "no checkpoint in 600 s: " + finish(procs[0], t0, 5).text[-300:]
    if stop:  # process 0 hangs (as a host cut off the network): its process and child stop
      tree = [procs[victim].pid] + _children(procs[victim].pid)
      for pid in tree:
        os.kill(pid, signal.SIGSTOP)
    else:
      procs[victim].kill()  # SIGKILL of the process as started
    t_kill = time.time()
    r = finish(procs[1 - victim], t0, 120)
    waited = time.time() - t_kill
    procs[victim].kill()
    if stop:
      for pid in tree:
        try:
          os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
    procs[victim].wait()
    ok, ev = one_line(r, 3, (f"lost process {victim}",))
    # supervisor: 10 s; watchdog: BDIFF_PEER_TIMEOUT (10) + 2 s, + 5 s for a step in flight
    bound = 10 if victim == 0 and not stop else 10 + 2 + 5
    ok = ok and waited < bound and "Check failure" not in r.text
    # The same command resumes (a few more steps, on two processes again).
    resume = [start(inp.train_args(w, "--config.train.num_steps=" + str(_latest(w) + 2)),
                    env=_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port + 1}",
                             JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i)) for i in (0, 1)]
    runs = [finish(p, time.time()) for p in resume]
    resumed = all(x.rc == 0 for x in runs) and "resum" in runs[0].text.lower()
    why = "" if resumed else " (" + " | ".join(
        [l for x in runs for l in x.text.splitlines() if l.startswith("error:")][:2]
        or [runs[0].text[-300:]]) + ")"
    return ok and resumed, (f"{ev[:200]} ({waited:.1f} s after the kill, bound {bound} s); "
                            f"rerun exit {[x.rc for x in runs]}, resumed: {resumed}{why}")
  return case


def _latest(w):
  steps = [int(d) for d in os.listdir(os.path.join(w, "checkpoints")) if d.isdigit()]
  return max(steps)


CASES = [
    ("glue: SIGKILL, then the same command", glue_sigkill_resume),
    ("glue: rerun with other seeds", glue_other_seeds),
    ("glue: second run on the workdir; SIGTERM", glue_lock_and_sigterm),
    ("glue: Ctrl-C", glue_sigint),
    ("glue: read-only workdir", glue_readonly),
    ("glue: disk full while results are written", glue_disk_full_results),
    ("glue: glue.num_steps=-1", _glue_refused("--config.glue.num_steps=-1", ("num_steps",))),
    ("glue: glue.eval_every=0", _glue_refused("--config.glue.eval_every=0", ("eval_every",))),
    ("glue: configs/glue.py:full,scale=3", glue_full_scale3),
    ("glue: glue.batch_size=0", _glue_refused("--config.glue.batch_size=0", ("batch_size",))),
    ("glue: NaN start weight", glue_nan_start_weight),
    ("config file: syntax error", _config_file("def get_config(:\n  pass\n")),
    ("config file: get_config raises", _config_file(
        "def get_config(arg=None):\n  raise RuntimeError('boom')\n")),
    ("config file: missing import", _config_file(
        "import no_such_module_xyz\ndef get_config(arg=None):\n  return None\n")),
    ("config file: get_config returns None", _config_file(
        "def get_config(arg=None):\n  return None\n")),
    ("config file: glue config with --mode=train", glue_config_for_train),
    ("validation: sample.temperature=inf", _train_refused("--config.sample.temperature=inf",
                                                          ("temperature",))),
    ("validation: mesh.fsdp=3 on 1 device", _train_refused("--config.mesh.fsdp=3", ("fsdp",))),
    ("validation: batch_size=100000000", _train_refused("--config.train.batch_size=100000000",
                                                        ("batch",))),
    ("validation: learning_rate=inf", _train_refused("--config.train.learning_rate=inf",
                                                     ("learning_rate",))),
    ("eval: again with other seeds", eval_other_seeds),
    ("multi-process: kill process 1", _lost_process(1)),
    ("multi-process: kill process 0 (coordinator)", _lost_process(0)),
    ("multi-process: process 0 hangs (SIGSTOP; not in the issue)", _lost_process(0, stop=True)),
    ("pytorch_model.bin: 5e8 elements over 4 floats", pytorch_bin_bomb),
    ("checkpoint: corrupt latest, intact best", corrupt_latest_names_best),
    ("checkpoint: failed save's tmp folders", orbax_tmp_folders),
]


def main():
  # Started in the background by a non-interactive shell, this process and its children would
  # ignore SIGINT: the Ctrl-C cases need it delivered, as from a terminal.
  if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="comma-separated substrings of case names")
  parser.add_argument("--keep", default="", help="keep the temp dirs here")
  a = parser.parse_args()
  root = a.keep or tempfile.mkdtemp(prefix="attack_")
  os.makedirs(root, exist_ok=True)
  inp = Inputs(root)
  wanted = [c for c in CASES if not a.only or any(s in c[0] for s in a.only.split(","))]
  rows = []
  for i, (name, case) in enumerate(wanted):
    t = os.path.join(root, f"case{i:02d}")
    os.makedirs(t)
    t0 = time.time()
    try:
      met, evidence = case(inp, t)
      met = bool(met)
    except Exception as e:  # pylint: disable=broad-except
      met, evidence = False, f"attack script failed: {type(e).__name__}: {e}"[:300]
    rows.append((name, met, evidence))
    print(f"[{'met' if met else 'NOT MET'}] {name} ({time.time() - t0:.0f} s): {evidence}",
          flush=True)
  print("\n| case | contract | evidence |\n|---|---|---|")
  for name, met, evidence in rows:
    print(f"| {name} | {'met' if met else '**not met**'} | {evidence.replace('|', '/')} |")
  print(f"\n{sum(m for _, m, _ in rows)} of {len(rows)} met")
  if not a.keep:
    shutil.rmtree(root, ignore_errors=True)
  return 0 if all(m for _, m, _ in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
