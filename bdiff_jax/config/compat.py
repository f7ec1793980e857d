"""Which config changes a workdir accepts: resume, eval and sample against the saved config.

Training writes the run's config to `<workdir>/config.json` (`write_config_atomically`); it is
the reference for everything later done in that workdir. Every field of
`configuration.base_config()` is in exactly one of four classes (a test enforces it, so a new
field must be classified here):

ARCHITECTURE_FIELDS: what the parameters are and what function they compute: the parameter
  shapes, the tokenizer, the block length, the objective and the noise process the model was
  trained to invert.
    data.name, data.variant, data.seq_len,
    model.backbone, model.block, model.objective, model.num_layers, model.emb_dim,
    model.num_heads, model.num_kv_heads, model.head_dim, model.mlp_dim, model.time_conditioning,
    model.positional, model.rope_theta, model.norm_eps, model.tie_embeddings, model.attention,
    model.candidate_k,
    diffusion.schedule, diffusion.schedule_exponent, diffusion.corruption,
    diffusion.uniform_fraction, diffusion.estimator.

TRAINING_FIELDS: the data stream and the training noise: the data order and position (seed,
  batch size), dropout, initialisation, the numerics, the training-time time draws. A resumed run
  with another value would match no uninterrupted run, while config.json would claim it does.
    seed, train.batch_size, train.update_rule (the rule's state), train.dizo.targets (which
    tensors DiZO keeps a copy of), model.dropout_rate, model.head_bias_init, model.dtype (the compute
    dtype), diffusion.antithetic, diffusion.train_positions_per_seq (which masked positions
    training scores).

SCHEDULE_FIELDS: the optimizer and its schedule. A resume may change them deliberately (the fix
  for a loss that turned NaN is a lower learning rate; more steps extend a run); the trainer
  prints one line per change and records it in metrics.jsonl (kind "config_change"), because
  the run then follows another schedule than an uninterrupted one. To split one run over several
  jobs without changing anything, use train.stop_at_step.
    train.num_steps (the length of the cosine decay), train.fit_steps_to_wall (whether
    num_steps is fitted to the wall-clock budget), train.learning_rate, train.warmup_steps,
    train.end_learning_rate_fraction, train.weight_decay, train.b1, train.b2, train.grad_clip,
    train.ema_decay, train.zo.* and train.dizo.* except dizo.targets.

RESUMABLE_FIELDS: may differ from run to run in one workdir: where the data and its cache live
  (the data's identity is checked separately: the workdir's vocab.json must match), how often to
  log/evaluate/checkpoint, when to stop, memory-for-compute choices, evaluation and sampling.
    data.data_dir, data.tfds_dir, data.verify_counts, model.reversible_backward, model.remat,
    train.log_every, train.eval_every, train.checkpoint_every, train.keep_checkpoints,
    train.max_wall_seconds, train.stop_at_step, train.progress_bar,
    train.checkpoint_every_minutes, preset, preset_reason, diffusion.masked_head and
    diffusion.head_chunk_rows (the same loss computed with less work or memory),
    mesh.data, mesh.fsdp (where the state lives: a checkpoint restores onto any mesh, since
    orbax restores with the target shardings),
    eval.* (batch_size, num_time_samples, seeds, max_tokens, during_training_max_tokens, use_ema,
    checkpoint), sample.* (num_samples, length, num_steps, grid, temperature, top_k, top_p,
    prompt, seed, judge_workdir, quality_steps).

Rules:
  resume (train in a workdir that has a checkpoint): `check_compatible(saved, config)` refuses
    any difference in ARCHITECTURE_FIELDS or TRAINING_FIELDS (`INCOMPATIBLE_FIELDS`), listing
    every differing field as `name: saved -> current` and the flags that restore the saved values.
  eval / sample: `config_for_restore(config, saved, explicit_overrides)` takes every
    ARCHITECTURE and TRAINING field from the saved config, so `--mode=eval` with any config file
    (e.g. the default one on a smoke workdir) rebuilds the trained model. A field the user set
    explicitly on the command line is kept: for a TRAINING field (e.g. model.dtype=bfloat16 to
    evaluate in bfloat16) that is the user's choice; for an ARCHITECTURE field it must equal the
    saved value, else `ConfigMismatchError`.
  A field absent from an older config.json counts as its `base_config()` default.
"""

import copy
import json
import os
from typing import Any, Collection, Iterable, Mapping, Optional

import ml_collections

from bdiff_jax.config import configuration
from bdiff_jax.errors import ConfigError, ConfigMismatchError
from bdiff_jax.runtime.workdir import os_error_to_user_error

CONFIG_FILE = "config.json"

ARCHITECTURE_FIELDS = frozenset({
    "data.name", "data.variant", "data.seq_len",
    "model.backbone", "model.block", "model.objective", "model.num_layers", "model.emb_dim",
    "model.num_heads", "model.num_kv_heads", "model.head_dim", "model.mlp_dim",
    "model.time_conditioning", "model.positional", "model.rope_theta", "model.norm_eps",
    "model.tie_embeddings", "model.attention", "model.candidate_k", "model.head",
    "model.adaptive_cutoffs", "model.adaptive_shrink",
    "diffusion.schedule", "diffusion.schedule_exponent", "diffusion.corruption",
    "diffusion.uniform_fraction", "diffusion.estimator",
})

TRAINING_FIELDS = frozenset({
    "seed", "train.batch_size", "train.update_rule", "train.dizo.targets", "model.dropout_rate", "model.head_bias_init",
    "model.dtype", "diffusion.antithetic", "diffusion.train_positions_per_seq",
})

# The optimizer and its schedule: a resume may change them on purpose (e.g. a lower learning
# rate after a loss that turned NaN, or more steps); the trainer says so in one line and records
# the change in metrics.jsonl, since the run then no longer matches an uninterrupted one.
SCHEDULE_FIELDS = frozenset({
    "train.num_steps", "train.fit_steps_to_wall", "train.learning_rate", "train.warmup_steps",
    "train.end_learning_rate_fraction", "train.weight_decay", "train.b1", "train.b2",
    "train.grad_clip", "train.ema_decay",
    "train.zo.learning_rate", "train.zo.schedule", "train.zo.eps", "train.zo.num_perturbations",
    "train.zo.weight_decay", "train.zo.freeze_embeddings", "train.dizo.interval",
    "train.dizo.iterations", "train.dizo.eps_p", "train.dizo.step_size", "train.dizo.tau",
})

INCOMPATIBLE_FIELDS = ARCHITECTURE_FIELDS | TRAINING_FIELDS

RESUMABLE_FIELDS = frozenset({
    "data.data_dir", "data.tfds_dir", "data.verify_counts", "model.reversible_backward",
    "model.remat", "model.adaptive_tail_capacity",
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.max_wall_seconds", "train.stop_at_step", "train.progress_bar",
    "train.checkpoint_every_minutes", "preset", "preset_reason",
    "diffusion.masked_head", "diffusion.head_chunk_rows",
    "mesh.data", "mesh.fsdp",
    "eval.batch_size", "eval.num_time_samples", "eval.seeds", "eval.max_tokens",
    "eval.during_training_max_tokens", "eval.use_ema", "eval.checkpoint",
    "sample.num_samples", "sample.length", "sample.num_steps", "sample.grid",
    "sample.temperature", "sample.top_k", "sample.top_p", "sample.prompt", "sample.seed",
    "sample.judge_workdir", "sample.quality_steps",
})

_HINTS: dict[str, str] = {}


def schedule_changes(saved: Mapping, current: Any) -> list[tuple[str, Any, Any]]:
  """[(field, saved, current)] of the SCHEDULE_FIELDS a resume changes (allowed, but said)."""
  return differences(saved, current, SCHEDULE_FIELDS)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
  """{"model.emb_dim": 256, ...}: the leaves of a (nested) ConfigDict or dict, JSON-normalised
  (tuples become lists), so that a config compares equal to its own config.json."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      out.update(flatten(value, name + "."))
    else:
      out[name] = json.loads(json.dumps(value))
  return out


def unclassified_fields(config: Any) -> list[str]:
  """Fields of `config` in none of the three classes (should be empty)."""
  known = INCOMPATIBLE_FIELDS | SCHEDULE_FIELDS | RESUMABLE_FIELDS
  return sorted(set(flatten(config)) - known)


def load_saved_config(workdir: str | os.PathLike) -> Optional[dict]:
  """The workdir's config.json as a nested dict, or None when there is none.

  Raises:
    ConfigError: the file exists but is not a JSON object.
  """
  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]}).",
                      "restore it from a backup or train in a new --workdir.") from None
  if not isinstance(saved, dict):
    raise ConfigError(f"{path} does not hold a config (a JSON object).",
                      "restore it from a backup or train in a new --workdir.")
  return saved


def _saved_values(saved: Mapping) -> dict[str, Any]:
  """The saved leaves, with base_config() defaults for fields an older config.json lacks."""
  values = flatten(configuration.base_config())
  values.update(flatten(saved))
  return values


def differences(saved: Mapping, current: Any,
                fields: Iterable[str]) -> list[tuple[str, Any, Any]]:
  """[(field, saved value, current value)] for the `fields` whose values differ, sorted."""
  old, new = _saved_values(saved), flatten(current)
  return [(f, old.get(f), new.get(f)) for f in sorted(fields)
          if f in new and old.get(f) != new.get(f)]


def _flag(field: str, value: Any) -> str:
  text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
  return f"--config.{field}={text}"


def check_compatible(saved: Mapping, current: Any, *, allowed: Collection[str] = ()) -> None:
  """Refuses to resume with a config that differs from the saved one in an incompatible field.

  Args:
    saved: the workdir's config.json (`load_saved_config`).
    current: the config of this run.
    allowed: incompatible fields to let through anyway (none by default).

  Raises:
    ConfigMismatchError: listing every differing field `name: saved -> current`, the flags that
      restore the saved values, and the alternative (a new --workdir).
  """
  unknown = [f for f in unclassified_fields(current) if f not in allowed]
  fields = (INCOMPATIBLE_FIELDS | set(unknown)) - set(allowed)
  diffs = differences(saved, current, fields)
  if not diffs:
    return
  listed = ", ".join(f"{f}: {old!r} -> {new!r}" for f, old, new in diffs)
  flags = " ".join(_flag(f, old) for f, old, _ in diffs)
  hints = "".join(f" ({_HINTS[f]})" for f, _, _ in diffs if f in _HINTS)
  raise ConfigMismatchError(
      f"this workdir was trained with another config; resuming would mix two runs "
      f"(saved -> current: {listed}).{hints}",
      f"rerun with the workdir's values ({flags}, or the config file it was trained with), or "
      "pass a new --workdir to train this config from scratch.")


def config_for_restore(current: ml_collections.ConfigDict, saved: Mapping,
                       explicit_overrides: Collection[str]) -> ml_collections.ConfigDict:
  """The config for eval/sample in a trained workdir: the saved model, the current eval/sample.

  Args:
    current: the config from the command line (config file + overrides).
    saved: the workdir's config.json.
    explicit_overrides: dotted field names set on the command line (`--config.<field>=...`),
      e.g. from `explicit_overrides_from_argv(sys.argv)`.

  Returns:
    A copy of `current` whose ARCHITECTURE, TRAINING and SCHEDULE fields hold the saved values,
    except TRAINING and SCHEDULE fields the user set explicitly.

  Raises:
    ConfigMismatchError: an explicitly set ARCHITECTURE field differs from the saved value.
  """
  explicit = set(explicit_overrides)
  old, new = _saved_values(saved), flatten(current)
  clashes = [(f, old.get(f), new[f]) for f in sorted(ARCHITECTURE_FIELDS & explicit)
             if f in new and old.get(f) != new[f]]
  if clashes:
    listed = ", ".join(f"--config.{f}={new_v!r} but the checkpoint has {old_v!r}"
                       for f, old_v, new_v in clashes)
    raise ConfigMismatchError(
        f"the command line contradicts the model this workdir was trained with ({listed}).",
        "drop those overrides (eval and sample take the model from <workdir>/config.json), or "
        "pass the --workdir of a run trained with them.")
  result = copy.deepcopy(current)
  locked = result.is_locked
  result.unlock()
  taken = INCOMPATIBLE_FIELDS | SCHEDULE_FIELDS
  for field in sorted(taken - ((TRAINING_FIELDS | SCHEDULE_FIELDS) & explicit)):
    if field in new and field in old and old[field] != new[field]:
      _set(result, field, old[field])
  if locked:
    result.lock()
  return result


def _set(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  current = node[leaf]
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  node[leaf] = value


def explicit_overrides_from_argv(argv: Iterable[str]) -> set[str]:
  """Dotted field names set on a command line: `--config.a.b=v`, `--config.a.b v`,
  `--config.a.b` / `--noconfig.a.b` (booleans). `--prompt` sets sample.prompt."""
  fields = set()
  for arg in argv:
    for prefix in ("--config.", "--noconfig.", "-config.", "-noconfig."):
      if arg.startswith(prefix):
        fields.add(arg[len(prefix):].split("=", 1)[0])
    if arg == "--prompt" or arg.startswith("--prompt="):
      fields.add("sample.prompt")
  return fields


def write_config_atomically(config: Any, workdir: str | os.PathLike,
                            filename: str = CONFIG_FILE) -> str:
  """Writes the config as JSON to `<workdir>/<filename>` (temp file, fsync, rename); returns the
  path. Readers see the old file or the new one, never a torn one.

  Raises:
    DiskFullError / StorageError: the write failed (the old file is untouched).
  """
  path = os.path.join(os.fspath(workdir), filename)
  text = (config.to_json(indent=2) if isinstance(config, ml_collections.ConfigDict)
          else json.dumps(config, indent=2))
  tmp = os.path.join(os.fspath(workdir), f".{filename}.{os.getpid()}.tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise os_error_to_user_error(e, f"writing {path}") from None
  return path
