"""train.fit_steps_to_wall: the schedule's length fitted to the wall-clock budget.

Unit layer: the planner's arithmetic against brute force, the window it times (inside the
warmup, whose learning rates do not depend on num_steps), the record and its adoption on
resume, config validation. Integration (slow): a fitted run, split by a resume, is step for
step the run configured with the fitted num_steps.
"""

import json

import numpy as np
import pytest

from bdiff_jax.config import configuration
from bdiff_jax.errors import ConfigError
from bdiff_jax.modes import train as train_mode
from bdiff_jax.optim import update_rule
from bdiff_jax.runtime.reporter import QUIET
from bdiff_jax.train import wall_schedule
from tests.helpers import load_config, train_losses


def _brute_events(after, upto, eval_every, checkpoint_every):
  return sum(1 for s in range(after + 1, upto + 1)
             if s % eval_every == 0 or s % checkpoint_every == 0 or s == upto)


@pytest.mark.parametrize("eval_every,checkpoint_every", [(100, 100), (7, 3), (4, 6), (1, 5)])
def test_events_between_counts_every_eval_checkpoint_and_the_last_step(eval_every,
                                                                       checkpoint_every):
  for after in (0, 3, 20, 99):
    for upto in range(after, after + 230, 7):
      assert wall_schedule.events_between(after, upto, eval_every=eval_every,
                                          checkpoint_every=checkpoint_every) == (
                                              _brute_events(after, upto, eval_every,
                                                            checkpoint_every)), (after, upto)


@pytest.mark.parametrize("remaining", [0.5, 7.0, 33.3, 61.0, 400.0])
def test_fit_is_the_largest_length_that_fits(remaining):
  timing = wall_schedule.Timing(step=0.25, event=1.5, compile=4.0)
  kw = dict(at_step=20, timing=timing, eval_every=10, checkpoint_every=25)
  cap, min_steps = 600, 51
  got = wall_schedule.fit_num_steps(cap=cap, remaining_seconds=remaining, min_steps=min_steps,
                                    **kw)

  def cost(n):  # brute force: every step, event and the recompilation a length other than cap
    return ((n - 20) * 0.25 + 1.5 * _brute_events(20, n, 10, 25) + (4.0 if n != cap else 0.0))

  fitting = [n for n in range(min_steps, cap + 1)
             if cost(n) <= wall_schedule.SAFETY * remaining]
  assert got == (max(fitting) if fitting else min_steps)
  assert wall_schedule.planned_seconds(got, 20, timing, eval_every=10, checkpoint_every=25,
                                       recompile=got != cap) == pytest.approx(cost(got))


def test_fit_keeps_the_cap_when_it_fits_and_needs_no_recompile():
  timing = wall_schedule.Timing(step=1.0, event=0.0, compile=50.0)
  kw = dict(at_step=10, timing=timing, eval_every=1000, checkpoint_every=1000, min_steps=11)
  # 100 steps need 91 s; any shorter schedule would also pay the 50 s compile.
  assert wall_schedule.fit_num_steps(cap=100, remaining_seconds=94.0, **kw) == 100
  assert wall_schedule.fit_num_steps(cap=100, remaining_seconds=90.0, **kw) == 48


def test_calibration_window_lies_inside_the_warmup_after_the_warm_up_steps():
  assert wall_schedule.calibration(0, 50) == (10, wall_schedule.CALIBRATION_STEPS)
  assert wall_schedule.calibration(0, 4) == (1, 4)
  assert wall_schedule.calibration(2, 4) == (3, 4)
  assert wall_schedule.calibration(3, 4) is None  # one step only: nothing after the first
  assert wall_schedule.calibration(12, 50) == (18, 30)
  assert wall_schedule.calibration(30, 50) is None


def test_warmup_learning_rates_do_not_depend_on_num_steps():
  """What makes a fit exact: the timed steps' learning rates are the fitted run's."""
  c = configuration.base_config()
  c.train.warmup_steps, c.train.learning_rate = 50, 2e-3
  rates = []
  for n in (60, 300, 4000):
    c.train.num_steps = n
    schedule = update_rule.learning_rate_schedule(c.train)
    rates.append(np.asarray([schedule(s) for s in range(c.train.warmup_steps + 1)]))
  np.testing.assert_array_equal(rates[0], rates[1])
  np.testing.assert_array_equal(rates[0], rates[2])


def _fit_config(cap=3000, fit=True):
  c = configuration.base_config()
  c.train.num_steps, c.train.fit_steps_to_wall, c.train.max_wall_seconds = cap, fit, 60.0
  return c


def test_adopt_takes_the_recorded_length_only_for_the_same_cap(tmp_path):
  timing = wall_schedule.Timing(step=0.9, event=1.0, compile=12.0)
  rec = wall_schedule.record(num_steps=2100, configured=3000, at_step=20, timing=timing,
                             max_wall_seconds=1800, remaining_seconds=1780, eval_every=100,
                             checkpoint_every=100)
  wall_schedule.write_record(str(tmp_path), rec)
  loaded = wall_schedule.load_record(str(tmp_path))
  assert loaded == json.loads(json.dumps(rec)) and loaded["num_steps"] == 2100
  config, adopted = wall_schedule.adopt(_fit_config(), loaded)
  assert adopted and config.train.num_steps == 2100
  for other in (_fit_config(cap=5000), _fit_config(fit=False)):  # the user's explicit choice
    config, adopted = wall_schedule.adopt(other, loaded)
    assert not adopted and config is other
  assert wall_schedule.adopt(_fit_config(), None) == (_fit_config(), False)


def test_unreadable_record_is_ignored(tmp_path):
  path = tmp_path / wall_schedule.RECORD_FILE
  for text in ("", "[1, 2]", '{"num_steps": "x", "configured_num_steps": 3}', "{broken"):
    path.write_text(text)
    assert wall_schedule.load_record(str(tmp_path)) is None
  assert wall_schedule.load_record(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("change,words", [
    (dict(max_wall_seconds=0.0), "max_wall_seconds"),
    (dict(update_rule="mezo"), "adamw"),
    (dict(warmup_steps=1), "warmup_steps >= 2"),
])
def test_config_validation(change, words):
  c = _fit_config()
  configuration.validate(c)
  for k, v in change.items():
    c.train[k] = v
  with pytest.raises(ConfigError, match=words):
    configuration.validate(c)


# ------------------------------------------------------------------------------ integration


def _smoke(data_dir, tfds_dir, **train):
  c = load_config("configs/wikitext2.py", "smoke")
  c.data.data_dir, c.data.tfds_dir = str(data_dir), str(tfds_dir)
  c.model.emb_dim, c.model.head_dim, c.model.mlp_dim, c.data.seq_len = 32, 16, 64, 32
  c.train.batch_size, c.train.warmup_steps, c.train.log_every = 4, 4, 1
  c.train.eval_every, c.train.checkpoint_every = 100, 100
  c.eval.max_tokens, c.eval.during_training_max_tokens, c.eval.batch_size = 64, 64, 2
  c.eval.seeds = (0,)
  c.sample.num_samples, c.sample.length, c.sample.num_steps = 1, 8, 2
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.mark.slow
def test_fitted_run_resumed_equals_the_run_configured_with_its_length(
    tmp_path, monkeypatch, real_data_dir, shared_tfds_dir):
  fitted_len, cap = 12, 40
  seen = {}

  def fake_fit(**kw):  # the planner is tested above; here the plumbing, deterministically
    seen.update(kw)
    return fitted_len

  monkeypatch.setattr(wall_schedule, "fit_num_steps", fake_fit)
  fit = dict(num_steps=cap, fit_steps_to_wall=True, max_wall_seconds=3600.0)
  split = tmp_path / "fitted"
  first = train_mode.run(_smoke(real_data_dir, shared_tfds_dir, stop_at_step=8, **fit),
                         str(split), QUIET)
  assert first.status == train_mode.STOPPED_AT_STEP and first.end_step == 8
  assert seen["cap"] == cap and seen["at_step"] == 4 and seen["min_steps"] == 5
  t = seen["timing"]
  assert t.step > 0 and t.event > 0 and t.compile > 0
  assert 0 < seen["remaining_seconds"] < 3600
  rec = wall_schedule.load_record(str(split))
  assert rec["num_steps"] == fitted_len and rec["configured_num_steps"] == cap
  with open(split / "config.json") as f:
    assert json.load(f)["train"]["num_steps"] == fitted_len  # eval and sample see it
  seen.clear()
  # The same command resumes on the fitted schedule (no new fit, no schedule change).
  second = train_mode.run(_smoke(real_data_dir, shared_tfds_dir, **fit), str(split), QUIET)
  assert not seen and second.status == train_mode.FINISHED and second.end_step == fitted_len
  with open(split / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  kinds = [r["kind"] for r in records]
  assert "config_change" not in kinds and kinds.count("schedule_fit") == 1
  lr = {r["step"]: r["learning_rate"] for r in records if r["kind"] == "train"}
  peak = _smoke(real_data_dir, shared_tfds_dir).train.learning_rate
  # The schedule decayed within the fitted length (the cap's would still be near its peak).
  assert lr[fitted_len] < 0.2 * peak
  straight_dir = tmp_path / "straight"
  train_mode.run(_smoke(real_data_dir, shared_tfds_dir, num_steps=fitted_len), str(straight_dir),
                 QUIET)
  straight_lr = {r["step"]: r["learning_rate"] for r in map(json.loads, open(
      straight_dir / "metrics.jsonl")) if r["kind"] == "train"}
  assert lr == straight_lr
  assert train_losses(split) == train_losses(straight_dir)  # step for step the same run
