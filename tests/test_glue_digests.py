"""The settings digests of GLUE runs and units are pinned: a finished unit in a user's
<workdir>/glue_units is reused only under the same file name, `<unit>__<digest>.json`, so a change
of how the settings are held (a ConfigDict then, plain settings objects now) must not change a
digest.

The values below were computed on the code before the settings became plain objects (commit
5e757db, where `units.settings_digest(config.glue.to_dict())` and `units.Units` read the glue
ConfigDict), for configs/glue.py's `cpu` and `test` levels with the paths that depend on where
the repository lies set to fixed ones (and glue.bdiff.data.data_dir, which base_config() takes
from $BDIFF_DATA_DIR, to ''). They change only when a setting's default changes (in
configs/glue.py, or in base_config()'s sections that `glue.bdiff` / `glue.adamw` hold): then
the old units are recomputed by design, and these values are updated with that change
(2026-12-07: the `cpu` level's 8,000 steps and evaluations every 500; later that day a unit's
digest came to cover only its own rule's section and start model, `units.UNREAD_SECTIONS` /
`UNREAD_STARTS`).
"""

import hashlib
import json
import os

import pytest

from bdiff_jax.glue import rows as glue_rows
from bdiff_jax.glue.units import Units, settings_digest, unit_settings
from bdiff_jax.modes import glue as glue_mode
from configs import glue as glue_config

# Rows beyond each level's own, so that every kind of row (head, lora, each rule) is pinned.
EXTRA_ROWS = "opt:mezo:lora,opt:adamw:head,reversible_qwen3:dizo,standard_qwen3:mezo:head:lora"
PINNED = {
    "cpu": {
        "run": "5305adf89090",
        "rows": {"adamw_reversible_qwen3": "15f3f0a72ed6", "adamw_standard_qwen3": "3e732d068fe1",
                 "adamw_opt": "a53001f626cc", "mezo_opt": "5deaaeb05ca5",
                 "mezo_opt_lora": "f1dbcf7331ec", "dizo_opt": "d0633e481e54",
                 "adamw_opt_head": "a53001f626cc", "dizo_reversible_qwen3": "39649f1016ba",
                 "mezo_standard_qwen3_head_lora": "7516bf51fde5"},
        "units": 459,
        "first_last": ["SST-2__adamw_reversible_qwen3__seed0__15f3f0a72ed6.json",
                       "MultiRC__mezo_standard_qwen3_head_lora__seed2__7516bf51fde5.json"],
        "names_sha": "35f5a9ef0aa3fe4d",
    },
    "test": {
        "run": "b00be43be04e",
        "rows": {"adamw_reversible_qwen3": "6bf732ba19c5", "adamw_standard_qwen3": "404bbd0599c5",
                 "mezo_opt": "719a3bdae751", "dizo_opt": "2a5766721065",
                 "adamw_opt": "007f4a758258", "adamw_opt_head": "007f4a758258",
                 "mezo_opt_lora": "719a3bdae751", "dizo_reversible_qwen3": "15729d5f9697",
                 "mezo_standard_qwen3_head_lora": "0f7a1efc2cc0"},
        "units": 20,
        "first_last": ["SST-2__adamw_reversible_qwen3__seed0__6bf732ba19c5.json",
                       "SST-2__mezo_standard_qwen3_head_lora__seed1__0f7a1efc2cc0.json"],
        "names_sha": "5c0ce5b46b282a5f",
    },
}


def _settings(level):
  """(the plain settings, the ConfigDict's dict) of configs/glue.py:<level>."""
  c = glue_config.get_config(level)
  c.glue.glue_dir, c.glue.superglue_dir = "/data/glue", "/data/superglue"
  c.glue.opt_dir = "/data/opt"
  c.glue.bdiff.data.data_dir = ""  # base_config() takes it from $BDIFF_DATA_DIR
  return glue_mode.glue_settings(c), c.glue.to_dict()


@pytest.mark.parametrize("level", sorted(PINNED))
def test_settings_and_unit_digests_are_unchanged(level, tmp_path):
  g, as_dict = _settings(level)
  specs = glue_rows.parse_rows(as_dict["rows"] + "," + EXTRA_ROWS)
  tasks = [t.strip() for t in as_dict["tasks"].split(",")]
  units = Units(str(tmp_path / "units"), g, specs, tasks)
  names = [os.path.basename(units.path(n, r)) for n, r in units.names]
  got = {"run": settings_digest(g.to_dict()),
         "rows": {s.name: settings_digest(unit_settings(g, s)) for s in specs},
         "units": len(names), "first_last": [names[0], names[-1]],
         "names_sha": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]}
  assert got == PINNED[level]


@pytest.mark.parametrize("arg", ["test", "quick", "cpu", "full,scale=0", "full,scale=2"])
def test_the_settings_give_back_the_configs_dict(arg):
  c = glue_config.get_config(arg)
  g = glue_mode.glue_settings(c)
  assert json.dumps(g.to_dict(), sort_keys=True) == json.dumps(c.glue.to_dict(), sort_keys=True)
  assert settings_digest(g.to_dict()) == settings_digest(c.glue.to_dict())
  # A setting an older config lacks stays out of the dict (and of the digest).
  del c.glue["seq_len_by_task"], c.glue["lora_zo"]
  g = glue_mode.glue_settings(c)
  assert g.lora_zo is None and "lora_zo" not in g.to_dict()
  assert json.dumps(g.to_dict(), sort_keys=True) == json.dumps(c.glue.to_dict(), sort_keys=True)
