"""The headline table's reader: plateaus, per-seed ratios, the baselines beside the models."""

import json
import os

from bdiff_jax.benchmarks import seed_table
from bdiff_jax.runtime import metrics_log


def test_plateau_is_a_stall_the_run_then_leaves():
  stalled = [(100, 900), (200, 650), (300, 640), (400, 630), (500, 625), (600, 620), (700, 500)]
  assert seed_table.plateau(stalled) == {"steps": 400, "from": 200, "to": 600}
  steady = [(100, 796), (200, 700), (300, 610), (400, 540), (500, 480)]
  assert seed_table.plateau(steady)["steps"] == 0
  # the slow end of a run that has learned is not a plateau: nothing leaves it
  slow_end = [(100, 800), (200, 500), (300, 410), (400, 405), (500, 401), (600, 398)]
  assert seed_table.plateau(slow_end)["steps"] == 0


def _run(path, seed, valid, test, readings, *, exact=False):
  os.makedirs(path)
  base = {"unigram": {"valid": {"word_ppl": 968.0}, "test": {"word_ppl": 914.0}},
          "bigram": {"valid": {"word_ppl": 328.4}, "test": {"word_ppl": 305.2}}}
  res = {k: {"word_ppl": v, "upper_bound": not exact} for k, v in (("valid", valid), ("test", test))}
  with open(os.path.join(path, "eval_best.json"), "w", encoding="utf-8") as f:
    json.dump({"step": readings[-1][0], "results": res, "baselines": base}, f)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump({"seed": seed, "train": {"batch_size": 32}, "data": {"seq_len": 128}}, f)
  log = metrics_log.MetricsLog(str(path))
  for step, ppl in readings:
    log.write("train", step, loss=6.0, tokens_per_sec=1000.0)
    log.write("eval", step, valid_word_ppl=ppl)
  return str(path)


def test_table_ratios_per_seed_and_baselines(tmp_path, capsys):
  d = [_run(tmp_path / f"d{i}", i, 300.0 + i, 280.0 + 2 * i, [(100, 900), (200, 500)])
       for i in range(2)]
  a = [_run(tmp_path / f"a{i}", i, 200.0, 140.0 + i, [(100, 400), (200, 250)], exact=True)
       for i in range(2)]
  out = tmp_path / "t.json"
  assert seed_table.main(["--group", "diff=" + ",".join(d), "--group", "ar=" + ",".join(a),
                          "--reference", "ar", "--out", str(out)]) == 0
  table = json.loads(out.read_text())
  diff = table["groups"][0]
  assert diff["test_ratio_per_seed"] == [280.0 / 140.0, 282.0 / 141.0]
  assert diff["valid"]["mean"] == 300.5 and diff["upper_bound"]
  assert diff["runs"][0]["tokens"] == 200 * 32 * 128
  text = capsys.readouterr().out
  assert "| bigram baseline" in text and "328.4" in text and "(bound)" in text


def test_bad_group_is_one_line(capsys):
  assert seed_table.main(["--group", "nodirs"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and "Fix:" in err[0]
