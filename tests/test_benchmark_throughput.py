"""The throughput benchmark (bdiff_jax/benchmarks/throughput.py, throughput_jax.py): its system
specs, its FLOP count, and one tiny interleaved run of two of our workers (an A/B of the same
code). PyTorch is not needed (it is a bench-only requirement); the numbers themselves are not
tested."""

import argparse
import json
import math
import subprocess
import sys

import pytest

from bdiff_jax.benchmarks import throughput
from bdiff_jax.benchmarks import throughput_jax
from tests import helpers


def _opts(**kw):
  return argparse.Namespace(**{"baseline_src": "", "allocator": "retain",
                                "torch_allocator": "system", **kw})


# pylint: disable=protected-access
def test_system_specs():
  shape = throughput.get_shape("reference")
  parse = lambda spec, **kw: throughput._parse_system(spec, shape, _opts(**kw))
  args, src = parse("jax:masked")
  assert (args["kind"], args["loss"], args["flags"]) == ("jax", "masked", None)
  assert src == throughput._REPO
  args, _ = parse("jax:masked:512@none")
  assert (args["loss"], args["flags"]) == ("masked:512", "none")
  args, src = parse("base", baseline_src="/tmp/other")
  assert (args["loss"], args["flags"], src) == ("full", "none", "/tmp/other")
  args, src = parse("base:masked", baseline_src="/tmp/other")
  assert (args["loss"], args["flags"], src) == ("masked", None, "/tmp/other")
  assert parse("torch_compile")[0] == {"kind": "torch", "shape": shape, "compile": True,
                                       "allocator": "system"}
  # Our workers get the project's malloc settings by default, PyTorch's glibc's; either can
  # be switched.
  assert parse("jax:masked")[0]["allocator"] == "retain"
  assert parse("base", baseline_src="/tmp/other")[0]["allocator"] == "retain"
  assert parse("jax:full", allocator="system")[0]["allocator"] == "system"
  assert parse("torch_eager", torch_allocator="retain")[0]["allocator"] == "retain"
  assert parse("torch_eager%retain")[0]["allocator"] == "retain"
  args, _ = parse("jax:masked/model.head=adaptive/train.batch_size=8@none")
  assert (args["loss"], args["flags"]) == ("masked", "none")
  assert args["overrides"] == ["model.head=adaptive", "train.batch_size=8"]
  config = throughput_jax.our_config(shape, overrides=args["overrides"])
  assert (config.model.head, config.train.batch_size) == ("adaptive", 8)
  with pytest.raises(SystemExit, match="bad override"):
    parse("jax:masked/head=adaptive")
  with pytest.raises(SystemExit, match="bad override 'foo=bar' in --set"):
    throughput.main(["--memory_preset", "smoke", "--set", "foo=bar"])
  args, _ = parse("jax:masked@none%system")
  assert (args["loss"], args["flags"], args["allocator"]) == ("masked", "none", "system")
  with pytest.raises(SystemExit, match="unknown allocator"):
    parse("jax:masked%fast")
  for bad, needle in (("base:masked", "baseline_src"), ("jax:partial", "unknown loss"),
                      ("tf", "unknown system"), ("jax", "unknown system")):
    with pytest.raises(SystemExit, match=needle):
      parse(bad)
  with pytest.raises(SystemExit, match="unknown loss"):
    parse("base:partial", baseline_src="/tmp/other")
# pylint: enable=protected-access


def test_systems_split_where_a_new_system_starts():
  flags = "--xla_cpu_experimental_ynn_fusion_type=-reduce,-individual_dot"
  assert throughput.split_systems(f"jax:masked,jax:masked@{flags},base:full,torch_compile") == [
      "jax:masked", f"jax:masked@{flags}", "base:full", "torch_compile"]
  assert throughput.split_systems("jax:masked%system,torch_eager") == ["jax:masked%system",
                                                                        "torch_eager"]


def test_matmul_flops_by_hand():
  shape = dict(d=4, layers=1, heads=1, seq=3, batch=2, vocab=10)
  n = 6  # tokens
  forward = (2 * n * 4 * 12 + 2 * n * 4 * 4 + 2 * (2 * n * 4 * 16)  # qkv, out, MLP up and down
             + 2 * 2 * n * 3 * 4  # scores and values: every token attends to 3
             + 2 * 5 * 4 * 10)  # the head on 5 rows
  assert throughput.step_matmul_flops(shape, head_rows=5) == 3 * forward


@pytest.mark.slow
def test_interleaved_run_of_the_same_code_twice(tmp_path):
  """jax:masked and base:masked built from this same checkout: both report timings from every
  round, the same loss bits (the same program on the same batch), the GEMM peak, the JSON,
  which host allocator settings each ran with (base: glibc's, from --allocator), the
  breakdown of a traced step and the processor."""
  out = tmp_path / "throughput.json"
  proc = subprocess.run(
      [sys.executable, "-m", "bdiff_jax.benchmarks.throughput", "--shape", "smoke",
       "--systems", "jax:masked,base:masked", "--baseline_src", helpers.REPO, "--rounds", "2",
       "--steps", "1", "--allocator", "system", "--profile_steps", "1", "--out", str(out)],
      cwd=helpers.REPO, env=helpers.subprocess_env(**helpers.tiny_compile_env()),
      capture_output=True, text=True, timeout=600)
  helpers.assert_ok(proc)
  result = json.loads(out.read_text())
  assert result["shape"] == throughput.shape_from_preset("smoke")
  assert result["gemm_peak_gflops_per_s"] > 0 and len(result["gemm_gflops_per_round"]) == 2
  a, b = result["systems"]["jax:masked"], result["systems"]["base:masked"]
  for s in (a, b):
    assert len(s["step_times_s"]) == 2 and s["tokens_per_s"] > 0
    assert s["memory"]["temp"] > 0 and s["xla_flops"] > 0 and s["max_rss_mib"] > 0
  assert math.isfinite(a["loss"]) and a["loss"] == b["loss"]
  assert a["allocator"] == b["allocator"] == "system: BDIFF_HOST_ALLOCATOR=system"
  assert "ratio_to_torch_compile" not in a  # no PyTorch system was run
  # Where each step's time went (step_profile.py), and on which processor.
  for s in (a, b):
    assert s["breakdown"]["steps"] == 1 and s["breakdown"]["threads"]
    assert s["breakdown"]["ops_by_time"] and 0 <= s["breakdown"]["gap_fraction"] < 1
  assert result["processor"]["model"] and result["processor"]["usable_cpus"] >= 1
  assert "ms/step traced" in proc.stdout and "processor:" in proc.stdout
  assert "jax:masked" in proc.stdout and "tokens/s" in proc.stdout
