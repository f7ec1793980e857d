"""The step breakdown of the throughput benchmark (bdiff_jax/benchmarks/step_profile.py): exact
numbers on a hand-made trace, and a real trace of a jitted function read back consistently."""

import jax
import jax.numpy as jnp
import pytest
from jax.profiler import ProfileData

from bdiff_jax.benchmarks import step_profile

MS = 10**9  # picoseconds per millisecond (XPlane offsets are in ps)


def _event(meta, start_ms, stop_ms):
  return (f"events {{ metadata_id: {meta} offset_ps: {int(start_ms * MS)} "
          f"duration_ps: {int((stop_ms - start_ms) * MS)} }}")


def _trace() -> ProfileData:
  """Two XLA threads (ms). A, the client, waits for the step [0, 14] and runs fusion [0, 4]
  (with a nested op `inner` [1, 2] and two markers) and dot [6, 10]. B runs the thunk executor
  [1.5, 14], in it dot [2, 5], then waits [5, 12], then reduce [12, 14]. A Python thread is
  ignored."""
  names = {1: "fusion", 2: "dot", 3: "reduce", 4: "inner", 5: "ThreadpoolListener::Record",
           6: "end: fusion", 7: "python_call", 8: "ThunkExecutor::Execute (wait for completion)",
           9: "ThunkExecutor::Execute", 10: "SlinkyThreadPool::Await"}
  meta = " ".join(f'event_metadata {{ key: {k} value {{ id: {k} name: "{v}" }} }}'
                  for k, v in names.items())
  a = " ".join([_event(8, 0, 14), _event(1, 0, 4), _event(4, 1, 2), _event(5, 3, 3),
                _event(6, 4, 4), _event(2, 6, 10)])
  b = " ".join([_event(9, 1.5, 14), _event(2, 2, 5), _event(10, 5, 12), _event(3, 12, 14)])
  py = _event(7, 0, 14)
  text = f"""
  planes {{ id: 1 name: "/host:CPU"
    lines {{ id: 1 name: "tf_XLAPjRtCpuClient/1" timestamp_ns: 1000 {a} }}
    lines {{ id: 2 name: "tf_XLAEigen/2" timestamp_ns: 1000 {b} }}
    lines {{ id: 3 name: "python" timestamp_ns: 1000 {py} }}
    {meta} }}"""
  return ProfileData.from_text_proto(text)


def test_breakdown_of_a_hand_made_trace():
  b = step_profile.breakdown(_trace(), steps=2)
  approx = lambda x: pytest.approx(x, abs=1e-12)
  assert b["window_s"] == approx(14e-3) and b["per_step_s"] == approx(7e-3)
  # A: 0-1 fusion, 1-2 inner, 2-4 fusion, 6-10 dot; B: 1.5-2 executor, 2-5 dot, 12-14 reduce.
  assert b["busy_threads_s"] == {"0": approx(3e-3), "1": approx(8.5e-3), "2": approx(2.5e-3)}
  assert b["gap_fraction"] == approx(3 / 14)
  threads = {t["thread"].rsplit("/", 1)[-1]: t for t in b["threads"]}
  assert threads["1"]["busy_s"] == approx(8e-3)  # waiting for the step is not busy
  assert threads["2"]["busy_s"] == approx(5.5e-3)  # nor is an await inside the executor
  assert threads["2"]["idle_fraction"] == approx(8.5 / 14)
  ops = {o["op"]: o for o in b["ops_by_time"]}
  assert set(ops) == {"fusion", "dot", "reduce", "inner", step_profile.EXECUTOR}  # no markers
  assert [o["op"] for o in b["ops_by_time"]][:3] == ["dot", "fusion", "reduce"]
  assert ops["dot"]["count"] == 2 and ops["dot"]["self_s"] == approx(7e-3)
  assert ops["fusion"]["self_s"] == approx(3e-3) and ops["inner"]["self_s"] == approx(1e-3)
  assert ops[step_profile.EXECUTOR]["self_s"] == approx(0.5e-3)
  assert ops["dot"]["share_of_busy"] == approx(7 / 13.5)
  assert {o["op"]: o["alone_s"] for o in b["ops_alone"]} == {
      "dot": approx(5e-3), "reduce": approx(2e-3), "fusion": approx(1e-3),
      "inner": approx(0.5e-3)}
  assert b["gaps"] == 2
  first, second = b["longest_gaps"]
  assert (first["s"], first["after"], first["before"], first["at_s"]) == (
      approx(2e-3), "dot", "reduce", approx(10e-3))
  assert (second["s"], second["after"], second["before"]) == (approx(1e-3), "dot", "dot")
  assert "0 busy 21%" in step_profile.summary(b) and "dot 52%" in step_profile.summary(b)


def test_a_real_trace_adds_up():
  a = jnp.ones((256, 256))
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum(0) @ x)
  f(a).block_until_ready()
  b = step_profile.profile_steps(lambda: f(a).block_until_ready(), 3)
  assert b["steps"] == 3 and b["window_s"] > 0 and b["threads"] and b["ops_by_time"]
  assert sum(b["busy_threads_s"].values()) == pytest.approx(b["window_s"], rel=1e-6)
  for t in b["threads"]:
    assert 0 < t["busy_s"] <= b["window_s"] * (1 + 1e-9) and 0 <= t["idle_fraction"] < 1


def test_processor_names_the_machine():
  cpu = step_profile.processor()
  assert cpu["model"] and cpu["logical_cpus"] >= cpu["usable_cpus"] >= 1
  assert set(cpu["isa"]) <= set(step_profile.ISA_FLAGS)
