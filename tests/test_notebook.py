"""The Colab notebook (notebooks/bdiff_jax_colab.ipynb) runs: all its code cells, in order, in a
fresh process on CPU with the smoke preset shortened to 4 steps of a 2 x 32 model (outside Colab
its install and Drive cells only set paths), must train, evaluate, sample with the prompt and
plot."""

import json
import math
import os

import pytest

from tests import helpers

NOTEBOOK = os.path.join(helpers.REPO, "notebooks", "bdiff_jax_colab.ipynb")


def code_cells() -> list[str]:
  with open(NOTEBOOK) as f:
    notebook = json.load(f)
  return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


def test_notebook_cells_are_valid_python():
  cells = code_cells()
  assert len(cells) >= 7
  for source in cells:
    compile(source, NOTEBOOK, "exec")
  joined = "\n".join(cells)
  for needed in ("drive.mount", "jax[tpu]==0.10.2", "jax[cuda12]==0.10.2", "train_mode.run",
                 "evaluate_mode.run", "sample_mode.run", "plt.show"):
    assert needed in joined, needed


@pytest.mark.slow
def test_notebook_runs_with_the_smoke_preset(tmp_path, real_data_dir, shared_tfds_dir):
  workdir = str(tmp_path / "run")
  script = "\n".join(code_cells()) + (
      "\nprint('NOTEBOOK ' + json.dumps({'status': result.status, 'end': result.end_step, "
      "'valid': evaluation['results']['valid']['word_ppl'], 'samples': samples, "
      "'fig_axes': len(fig.axes), 'train_points': len(train_records)}))\n")
  # The smoke preset narrowed (helpers.NARROW_SMOKE), compiled fast (helpers.tiny_compile_env):
  # what is tested is that the cells run in order, not the model.
  overrides = {**helpers.NARROW_SMOKE, "train.num_steps": 4, "train.eval_every": 4,
               "train.checkpoint_every": 4, "train.log_every": 2,
               "eval.seeds": [0], "eval.max_tokens": 256,
               "eval.batch_size": 8, "eval.during_training_max_tokens": 128,
               "data.tfds_dir": shared_tfds_dir, "sample.num_steps": 4,
               "sample.num_samples": 2, "sample.length": 16}
  proc = helpers.run_python(script, env_extra={
      **helpers.tiny_compile_env(),
      "BDIFF_NOTEBOOK_PRESET": "smoke", "BDIFF_NOTEBOOK_OVERRIDES": json.dumps(overrides),
      "BDIFF_NOTEBOOK_WORKDIR": workdir, "BDIFF_DATA_DIR": real_data_dir, "MPLBACKEND": "Agg",
      "BDIFF_REPO_DIR": helpers.REPO})
  helpers.assert_ok(proc)
  line = [l for l in proc.stdout.splitlines() if l.startswith("NOTEBOOK ")][-1]
  out = json.loads(line[len("NOTEBOOK "):])
  assert out["status"] == "finished" and out["end"] == 4
  assert math.isfinite(out["valid"]) and out["valid"] > 1
  assert out["samples"] and all(s.startswith("the game was") for s in out["samples"])
  assert out["fig_axes"] == 2 and out["train_points"] == 2
  assert os.path.exists(os.path.join(workdir, "metrics.jsonl"))
