"""Where the config goes: which library files read it, in which order, during a real train run.

  python scripts/config_walk.py [--steps 2] [--json runs/config_walk.json]

Runs the train mode in this process on the smoke preset (a few steps on the real WikiText-2 of
$BDIFF_DATA_DIR, tiny evaluation and samples, a temporary workdir) with every read of a
ConfigDict field (attribute, item, get, to_dict) recorded with the bdiff_jax file and function
that made it. It prints the files in the order they first read the config, and the walk: the
sequence of reading files with consecutive repeats merged. A *climb* is a step of the walk from a
file to one in a higher layer (the layers of tests/test_architecture.py: runtime/models/optim <
data/diffusion < objectives/config/evaluation < train < glue < modes); a *return* is a step back
to a file the walk visited before. A config read once, at the top, by one builder that hands
plain values down has few of both.
"""

import argparse
import collections
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdiff_jax.runtime import bootstrap  # pylint: disable=wrong-import-position

bootstrap.bootstrap()

import ml_collections  # pylint: disable=wrong-import-position,g-import-not-at-top

from bdiff_jax.modes import train as train_mode  # pylint: disable=wrong-import-position
from bdiff_jax.runtime.reporter import QUIET  # pylint: disable=wrong-import-position
from tests import helpers  # pylint: disable=wrong-import-position
from tests.test_architecture import _LAYERS  # pylint: disable=wrong-import-position

_PACKAGE = os.path.join(helpers.REPO, "bdiff_jax") + os.sep
_ML_COLLECTIONS = os.path.dirname(ml_collections.__file__) + os.sep
_LAYER = {p: i for i, names in enumerate(_LAYERS) for p in names}


def _layer(rel: str) -> int:
  parts = rel.split("/")  # bdiff_jax/<package>/<file>.py or bdiff_jax/errors.py
  return _LAYER[parts[1] if len(parts) > 2 else os.path.splitext(parts[1])[0]]


def record_reads():
  """Patches ConfigDict's readers; returns the list that collects (file, function) per read."""
  reads = []

  def caller():
    frame = sys._getframe(2)  # pylint: disable=protected-access
    while frame is not None and frame.f_code.co_filename.startswith(_ML_COLLECTIONS):
      frame = frame.f_back
    if frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
      rel = os.path.relpath(frame.f_code.co_filename, helpers.REPO)
      reads.append((rel, frame.f_code.co_name))

  for name in ("__getattr__", "__getitem__", "get", "to_dict"):
    original = getattr(ml_collections.ConfigDict, name)

    def patched(self, *args, _original=original, **kwargs):
      caller()
      return _original(self, *args, **kwargs)

    setattr(ml_collections.ConfigDict, name, patched)
  return reads


def walk_summary(reads) -> dict:
  walk = [f for i, (f, _) in enumerate(reads) if i == 0 or reads[i - 1][0] != f]
  climbs = [(a, b) for a, b in zip(walk, walk[1:]) if _layer(b) > _layer(a)]
  seen, returns = set(), 0
  for f in walk:
    returns += f in seen
    seen.add(f)
  first = list(dict.fromkeys(f for f, _ in reads))
  return {"reads": len(reads), "files": first, "num_files": len(first), "walk": walk,
          "climbs": [f"{a} -> {b}" for a, b in climbs], "num_climbs": len(climbs),
          "num_returns": returns,
          "functions": collections.Counter(f"{f}:{fn}" for f, fn in reads).most_common()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  config = helpers.load_config("configs/wikitext2.py", "smoke")
  data = helpers.wikitext2_dir()
  with tempfile.TemporaryDirectory() as tmp:
    config.data.data_dir, config.data.tfds_dir = data, os.path.join(tmp, "tfds")
    config.train.num_steps, config.train.eval_every = args.steps, args.steps
    config.train.checkpoint_every = args.steps
    config.eval.max_tokens = config.eval.during_training_max_tokens = 128
    config.sample.num_samples, config.sample.length, config.sample.num_steps = 1, 8, 2
    reads = record_reads()
    train_mode.run(config, os.path.join(tmp, "workdir"), QUIET)
  out = walk_summary(reads)
  print(f"{out['reads']} reads of the config in {out['num_files']} files; the walk has "
        f"{len(out['walk'])} steps, {out['num_climbs']} climbs back up, {out['num_returns']} "
        "returns")
  print("files, in the order they first read it:")
  for f in out["files"]:
    print(f"  {f}")
  print("climbs:")
  for c in out["climbs"]:
    print(f"  {c}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
