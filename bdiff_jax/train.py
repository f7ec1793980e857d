"""Training: `TrainState`, the pure loss and train step, and the training loop.

The step is a pure function `(state, batch) -> (state, metrics)`, jitted with the state donated.
Data parallelism: the batch is sharded over all local devices along a `data` mesh axis and the
state is replicated (`jax.device_put` of the whole state); XLA inserts the gradient all-reduce.
Randomness: the per-step key is `fold_in(state.rng, state.step)`, split into a noise key (times,
masks) and a dropout key, so a resumed run draws exactly what an uninterrupted run would.
"""

import json
import os
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bdiff_jax import objectives
from bdiff_jax.errors import CheckpointError, ConfigError, NonFiniteLossError


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jnp.ndarray  # raw uint32[2] key; per-step keys are fold_in(rng, step)


def learning_rate_schedule(train_config) -> optax.Schedule:
  lr = train_config.learning_rate
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=train_config.warmup_steps,
      decay_steps=max(train_config.num_steps, train_config.warmup_steps + 1),
      end_value=lr * train_config.end_learning_rate_fraction)


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW with warmup + cosine decay and global-norm clipping; no decay on vectors."""
  decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
  # The clip slot is always present (identity when grad_clip=0) so that the optimizer state has
  # the same structure whatever the value: a run can be resumed with clipping changed.
  parts = [optax.clip_by_global_norm(train_config.grad_clip) if train_config.grad_clip > 0
           else optax.identity()]
  parts.append(optax.adamw(learning_rate_schedule(train_config), b1=train_config.b1,
                           b2=train_config.b2, weight_decay=train_config.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)


def create_train_state(params, optimizer, key) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.copy, params),
                    opt_state=optimizer.init(params), rng=key)


def loss_fn(params, network, tokens, key, config, *, train: bool = True):
  """Training objective of `config.model.objective` for one batch -> (loss, aux).

  diffusion: the continuous-time ELBO of absorbing masked diffusion (nats per token).
  autoregressive: next-token cross-entropy (nats per token).
  """
  noise_key, dropout_key = jax.random.split(key)
  apply = lambda *a, **kw: network.apply({"params": params}, *a, train=train,
                                        rngs={"dropout": dropout_key}, **kw)
  return objectives.training_loss(apply, tokens, noise_key, config,
                                  vocab_size=network.spec.vocab_size)


def make_mesh(devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.local_devices())
  return Mesh(devices, ("data",))


def make_train_step(config, network, optimizer, mesh: Optional[Mesh] = None) -> Callable:
  """Returns a jitted `step(state, batch) -> (state, metrics)` with the state donated."""
  ema_decay = float(config.train.ema_decay)
  lr_schedule = learning_rate_schedule(config.train)

  def step(state: TrainState, batch):
    key = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, aux), grads = grad_fn(state.params, network, batch, key, config)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if ema_decay > 0:
      ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                   state.ema_params, params)
    else:
      ema = params
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=lr_schedule(state.step))
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                              opt_state=opt_state)
    return new_state, metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  replicated = NamedSharding(mesh, P())
  return jax.jit(step, donate_argnums=0,
                 in_shardings=(replicated, NamedSharding(mesh, P("data"))),
                 out_shardings=(replicated, replicated))


def shard_batch(batch: np.ndarray, mesh: Mesh):
  return jax.device_put(batch, NamedSharding(mesh, P("data")))


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ConfigError(
        f"config.{what}={batch_size} is not divisible by the {n} local devices.",
        f"pass --config.{what}=<a multiple of {n}>.")


def _log_line(step, m):
  return (f"step {step}: loss {m['loss']:.4f} | grad_norm {m['grad_norm']:.3f} | "
          f"lr {m['learning_rate']:.2e} | {m['tokens_per_sec']:.0f} tok/s")


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (resuming from the workdir's latest checkpoint), then evaluates and plots.

  Returns the final evaluation results (what `--mode=eval` reproduces from the checkpoint).
  """
  # Imported here: experiment imports this module for TrainState / make_optimizer.
  from bdiff_jax import checkpointing, evaluation, experiment, metrics_log, plotting  # pylint: disable=g-import-not-at-top
  from bdiff_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top

  exp = experiment.build(config, workdir)
  tc = config.train
  mesh = make_mesh()
  check_batch_divisible(tc.batch_size, mesh)
  batches = pipeline.TrainBatches(exp.splits.train, config.data.seq_len, tc.batch_size,
                                  config.seed)
  log = metrics_log.MetricsLog(workdir)
  ckpt = checkpointing.Checkpointer(workdir, keep=tc.keep_checkpoints)
  num_params = exp.num_params()
  print(f"model: {config.model.backbone} backbone, {config.model.block} block, "
        f"{config.model.objective}; {num_params:,} parameters; "
        f"{mesh.devices.size} {jax.default_backend()} device(s)", flush=True)

  start = ckpt.latest_step()
  if start is not None:
    state, meta, desc = ckpt.restore("latest", exp.abstract_state())
    position = {k: int(v) for k, v in batches.position(start).items()}
    if int(state.step) != start or meta.get("position") != position:
      raise CheckpointError(  # never silently continue from an inconsistent checkpoint
          f"checkpoint {desc} in {workdir} is inconsistent (step/data position).",
          "restore another step or train in a new --workdir; nothing was deleted.")
    print(f"resuming from {desc} (data epoch {meta['position']['epoch']}, batch "
          f"{meta['position']['batch_in_epoch']})", flush=True)
  else:
    start = 0
    state = exp.init_state()
  experiment.save_config(config, workdir, "config.json")
  state = replicate(state, mesh)
  step_fn = make_train_step(config, exp.network, exp.optimizer, mesh)
  stop = min(tc.stop_at_step or tc.num_steps, tc.num_steps)
  tokens_per_step = tc.batch_size * config.data.seq_len

  pending = []  # (step, device metrics) not yet checked for finiteness
  t_last, step_last = time.time(), start
  t_begin = time.time()

  def flush(step_now):
    """Fetches pending metrics, stops on a non-finite loss, logs the latest."""
    nonlocal pending, t_last, step_last
    if not pending:
      return None
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      if not np.isfinite(m["loss"]):
        ckpt.wait()
        good = ckpt.latest_step()
        raise NonFiniteLossError(
            f"the training loss became {m['loss']} at step {s}; the run stopped. The last good "
            f"checkpoint (step {good}) in {ckpt.latest_dir} is untouched.",
            "lower --config.train.learning_rate (or raise warmup_steps / enable grad_clip) and "
            "rerun; training resumes from that checkpoint.")
    now = time.time()
    # Means over the interval (one batch's diffusion loss is very noisy); lr at its end.
    last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
    last["learning_rate"] = float(fetched[-1]["learning_rate"])
    last["tokens_per_sec"] = (step_now - step_last) * tokens_per_step / max(now - t_last, 1e-9)
    log.write("train", step_now, **last)
    t_last, step_last = now, step_now
    pending = []
    return last

  def save(step_now, best_metrics=None, force=False):
    position = {k: int(v) for k, v in batches.position(step_now).items()}
    ckpt.save(step_now, state, {"step": step_now, "position": position},
              best_metrics=best_metrics, force=force)

  def periodic_eval(step_now):
    params = state.ema_params if config.eval.use_ema else state.params
    res = evaluation.evaluate(exp.network, params, exp.splits, config,
                              max_tokens=config.eval.during_training_max_tokens,
                              seeds=tuple(config.eval.seeds)[:1], split_names=("valid",))
    v = res["valid"]
    log.write("eval", step_now, valid_nll_per_token=v["nll_per_token"],
              valid_word_ppl=v["word_ppl"], valid_tokens=v["num_tokens"])
    return {checkpointing.BEST_METRIC: v["nll_per_token"]}, v

  bar = tqdm.tqdm(total=stop, initial=start, disable=not tc.progress_bar, unit="step",
                  dynamic_ncols=True, desc="train")
  step = start
  stopped_early = False
  try:
    while step < stop:
      batch = shard_batch(batches.batch(step), mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      pending.append((step, metrics))
      if len(pending) >= 2:  # keep one step in flight, but let the bar show finished steps
        pending[-2][1]["loss"].block_until_ready()
      bar.update(1)
      boundary = step == stop
      if step % tc.log_every == 0 or boundary:
        last = flush(step)
        bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_sec']:.0f}")
        if not tc.progress_bar:
          print(_log_line(step, last), flush=True)
      out_of_time = tc.max_wall_seconds and time.time() - t_begin > tc.max_wall_seconds
      if step % tc.eval_every == 0 or step == tc.num_steps:
        flush(step)
        best, v = periodic_eval(step)
        bar.write(f"step {step}: valid word ppl {v['word_ppl']:.2f} "
                  f"({'bound, ' if config.model.objective == 'diffusion' else ''}"
                  f"{v['num_tokens']} tokens)")
        save(step, best_metrics=best, force=True)
      elif step % tc.checkpoint_every == 0 or boundary or out_of_time:
        flush(step)
        save(step, force=True)
      if out_of_time:
        bar.write(f"stopping at step {step}: train.max_wall_seconds={tc.max_wall_seconds} "
                  "reached (checkpoint saved; rerun to resume)")
        stopped_early = True
        break
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()
  wall = time.time() - t_begin
  trained = step - start
  print(f"trained steps {start}..{step} ({trained} steps, {trained * tokens_per_step:,} tokens)"
        f" in {wall:.1f}s", flush=True)
  if step < tc.num_steps and not stopped_early:
    print(f"stopped at train.stop_at_step={stop}; rerun with the same config to continue.")
    return {}
  # Finished, or out of wall-clock budget: evaluate what we have.
  results = final_evaluation(exp, samples=True)
  plotting.plot_training_curves(workdir)
  return results


def final_evaluation(exp, *, samples: bool = False) -> dict:
  """Evaluates the checkpoint named by config.eval.checkpoint, exactly as --mode=eval does.

  With `samples`, also writes unconditional samples from that checkpoint (end of training).
  """
  from bdiff_jax import evaluation, experiment, generate  # pylint: disable=g-import-not-at-top
  config = exp.config
  params, meta, desc = experiment.restore_params(exp)
  results = evaluation.evaluate(exp.network, params, exp.splits, config,
                                max_tokens=config.eval.max_tokens)
  text = evaluation.format_results(results, config)
  print(f"checkpoint: {desc}\n{text}", flush=True)
  out = {"checkpoint": desc, "step": meta.get("step"), "results": results}
  name = f"eval_{str(config.eval.checkpoint)}.json"
  with open(os.path.join(exp.workdir, name), "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)
  if samples:
    generate.write_samples(exp, params, meta, desc)
  return out
