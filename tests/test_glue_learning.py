"""Learning tests of `--mode=glue` at the `test` level: on a tiny separable SST-2 task every row
must go from an untrained model at chance to >= 0.9 dev accuracy, selected after step 0 with
parameters that moved. A row that does not learn fails (`test_a_row_that_does_not_learn_fails`
checks that the assertions catch one)."""

import pytest

from bdiff_jax.modes import glue as glue_mode
from bdiff_jax.runtime.reporter import QUIET
from configs import glue as glue_config
from tests.test_glue_classification import write_sst2


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  # Dev sentences are not train sentences ("number 100".."number 123" are unseen).
  return write_sst2(str(tmp_path_factory.mktemp("glue_learn")), n_train=40, n_dev=24,
                    dev_offset=100)


def _run(toy, workdir, row, **over):
  c = glue_config.get_config("test")
  g = c.glue
  g.glue_dir = toy
  g.rows = row
  g.seeds = (0,)
  g.k_per_class = 0  # all of train minus the selection set: 32 examples
  for key, value in over.items():  # "zo.learning_rate": ...
    node, _, field = key.rpartition(".")
    (g[node] if node else g)[field] = value
  out = glue_mode.run(c, str(workdir), QUIET)
  return out["records"][0], out["rows"][0]


def assert_learned(rec, row):
  """Learned: at chance at step 0 (the dev split is balanced), >= 0.9 after, a later step
  selected, parameters moved, no 'selected step 0' / 'did not move' flag."""
  assert rec["zero_shot"]["dev"]["dev"]["accuracy"] <= 0.75, "step 0 is not at chance"
  assert rec["zero_shot"]["selection"] <= 0.5
  assert rec["selected_step"] > 0, "selected the untrained parameters"
  assert rec["relative_param_change"] > 1e-6, "the parameters did not move"
  assert rec["dev"]["accuracy"] >= 0.9, f"dev accuracy {rec['dev']['accuracy']}"
  assert rec["selection_best"] > rec["zero_shot"]["selection"]
  assert not [f for f in row["flags"] if "step 0" in f or "did not move" in f]
  assert row["mean"] > row["majority"] + 2 * row["standard_error"]


@pytest.mark.parametrize("row", ["standard_qwen3:adamw", "reversible_qwen3:adamw",
                                 "opt:adamw", "opt:adamw:head"])
def test_first_order_rows_learn(toy, tmp_path, row):
  rec, agg = _run(toy, tmp_path, row, num_steps=30, eval_every=5,
                  **{"adamw.learning_rate": 1e-2})
  assert_learned(rec, agg)


@pytest.mark.parametrize("ema_decay", [0.5, 1 - 1e-9])
def test_a_first_order_row_with_an_ema_evaluates_the_ema(toy, tmp_path, ema_decay):
  """glue.adamw.ema_decay > 0: the EMA of the parameters is evaluated, selected and reported. A
  short EMA learns like the parameters; an EMA that never leaves the start stays at chance
  (evaluating the trained parameters instead would learn)."""
  rec, agg = _run(toy, tmp_path, "standard_qwen3:adamw", num_steps=30, eval_every=5,
                  **{"adamw.learning_rate": 1e-2, "adamw.ema_decay": ema_decay})
  if ema_decay == 0.5:
    assert_learned(rec, agg)
  else:
    assert rec["relative_param_change"] < 1e-6
    assert max(p["dev"] for p in rec["curve"]) <= 0.75


# Zeroth order on the tiny OPT fixture: 300 steps (~13 ms each on one core) at a learning rate of
# 1e-2 (LoRA: 3e-2, its factors start at zero and move slower), batch 8, a 16-example selection
# set (informedness in steps of 1/8). Measured 2026-12-07: MeZO is at 1.0 on selection and dev from
# step 100, DiZO from 200, MeZO+LoRA from 250. The rules are being changed: if a change breaks
# this, retune here, do not loosen the assertions. DiZO draws Gaussian perturbations (the
# default), MeZO and MeZO+LoRA ±1 ones (the `cpu` level's `glue.zo.noise`; MeZO with them,
# 2026-12-07: dev 0.79 at step 100, 1.0 at 150 and 300, 0.71 at 250; DiZO with them reached
# only 0.875 in 300 steps).
@pytest.mark.parametrize("row,learning_rate,noise", [("opt:mezo", 1e-2, "rademacher"),
                                                     ("opt:dizo", 1e-2, "gaussian"),
                                                     ("opt:mezo:lora", 3e-2, "rademacher")])
def test_zeroth_order_rows_learn(toy, tmp_path, row, learning_rate, noise):
  rec, agg = _run(toy, tmp_path, row, num_steps=300, eval_every=50, selection=16,
                  batch_size=8, dev_curve=False,
                  **{"zo.learning_rate": learning_rate, "zo.noise": noise})
  assert rec["forward_passes"]["backward"] == 0
  if row.endswith(":lora"):  # only the LoRA factors train: a small part of the model
    assert 0 < rec["trainable_params"] < rec["params"] / 4
  assert_learned(rec, agg)


def test_a_row_that_does_not_learn_fails(toy, tmp_path):
  # A learning rate of 1e-12 (0 is refused up front): the parameters hardly move.
  rec, agg = _run(toy, tmp_path, "standard_qwen3:adamw", num_steps=10, eval_every=5,
                  **{"adamw.learning_rate": 1e-12})
  assert rec["selected_step"] == 0 and rec["relative_param_change"] < 1e-9
  assert "selected step 0 (1/1 seeds)" in agg["flags"]
  assert "parameters did not move (1/1 seeds)" in agg["flags"]
  with pytest.raises(AssertionError):
    assert_learned(rec, agg)
