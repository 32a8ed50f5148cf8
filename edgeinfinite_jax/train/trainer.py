"""The training loop: one linear, top-to-bottom ``run`` (big_vision style).

lock the workdir -> check its record -> mesh -> data -> ``eval_shape`` of init ->
shardings -> ``jit(init, out_shardings)`` -> ``jit(train_step, donate)`` -> resume
from the newest intact orbax checkpoint -> loop (progress bar, JSON-lines metrics,
held-out eval, checkpoints with checksum manifests).

Reusable building blocks for later stages: ``make_train_state``,
``train_step``, ``loss_fn`` / ``cross_entropy``, ``evaluate`` and
``model_and_base_params``.

Determinism: the batch of step s is a pure function of (seed, s)
(``data.batch_at``), the step rng is ``fold_in(rng, step)`` and the state is
checkpointed whole, so the same seed and config give identical losses, and a
run resumed from a checkpoint reaches the same final loss as an uninterrupted
one.

Workdir contract (``workdir.py``): one trainer per workdir (``<workdir>/.lock``);
``config.json`` records the run its checkpoints and metrics belong to, and a
config that would change that run stops before anything is written
(``train.fresh`` moves the old run to ``previous/<timestamp>/`` instead); a
checkpoint whose files fail their sha256 manifest, or that orbax cannot read, is
moved to ``checkpoints/corrupt-<step>`` and the one before it is restored.
Multi-process runs decide all of this on process 0, which alone writes files
other than orbax's (``resume.py``; the files themselves: ``workdir.py``).

(Just over 400 lines: the linear loop reads top to bottom in one function; workdir and resume helpers are resume.py.)
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from edgeinfinite_jax.data import corpus as data_lib
from edgeinfinite_jax import configs
from edgeinfinite_jax.configs import validate as config_rules
from edgeinfinite_jax.model import transformer as model_lib
from edgeinfinite_jax.train import optim
from edgeinfinite_jax.train import resume
from edgeinfinite_jax.train import sharding
from edgeinfinite_jax.train import workdir as workdir_lib
from edgeinfinite_jax.model.config import ConfigError, ModelConfig, require
from edgeinfinite_jax.checkpoints import models

class TrainState(NamedTuple):
  step: jax.Array   # int32 scalar: optimizer updates done so far
  params: Any       # {"params": ...}, trainable and frozen leaves
  opt_state: Any    # optimizer state of the *trainable* subtree only


# ----------------------------------------------------------------------------- loss


def cross_entropy(logits, tokens, loss_mask=None):
  """Next-token cross entropy: (sum of losses, number of target tokens).

  ``logits[:, t]`` predicts ``tokens[:, t+1]``; ``loss_mask[:, t]`` (1 = count)
  selects which *target* tokens count, so answer-only losses mark the answer
  tokens. Without a mask every target counts: padding is the data's business
  (``data.MaskedRows``), never guessed from a token id, because in a real
  vocabulary the pad id is often a real token (SmolLM2 pads with ``<|endoftext|>``).
  """
  targets = tokens[:, 1:]
  mask = jnp.ones(targets.shape, bool) if loss_mask is None else loss_mask[:, 1:].astype(bool)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def loss_fn(trainable, frozen, model_config: ModelConfig, batch, rng):
  """Mean next-token loss of ``batch``; differentiable w.r.t. ``trainable``."""
  params = optim.merge(trainable, frozen)
  logits = model_lib.Transformer(model_config).apply(params, batch["tokens"],
                                                     rngs={"dropout": rng})
  total, count = cross_entropy(logits, batch["tokens"], batch.get("loss_mask"))
  return total / jnp.maximum(count, 1.0), count


# ----------------------------------------------------------------------------- state & step


def make_train_state(model_config: ModelConfig, tx: optax.GradientTransformation,
                     trainable: frozenset[str], rng, base_params=None) -> TrainState:
  """Step 0 state: random init, overwritten by ``base_params`` where given.

  ``base_params`` (e.g. from a Hugging Face checkpoint) may lack parameters the
  model adds (memory gates); those keep their fresh initialisation.
  """
  params = model_lib.init_params(model_config, rng)
  if base_params is not None:
    params = optim.merge(base_params, params)
  opt_state = tx.init(optim.split(params, trainable)[0])
  return TrainState(jnp.zeros((), jnp.int32), params, opt_state)


def train_step(state: TrainState, batch, *, model_config: ModelConfig,
               tx: optax.GradientTransformation, trainable: frozenset[str], rng, loss=None):
  """One AdamW update of the trainable subtree; frozen leaves pass through.

  ``loss`` replaces ``loss_fn`` (same signature); its aux may be the token count
  or a dict of scalar metrics with a ``"tokens"`` entry (e.g. QAT's loss terms).
  """
  step_rng = jax.random.fold_in(rng, state.step)
  t, f = optim.split(state.params, trainable)
  (value, aux), grads = jax.value_and_grad(loss or loss_fn, has_aux=True)(
      t, f, model_config, batch, step_rng)
  updates, opt_state = tx.update(grads, state.opt_state, t)
  t = optax.apply_updates(t, updates)
  extra = dict(aux) if isinstance(aux, dict) else {"tokens": aux}
  metrics = {**extra, "loss": value, "grad_norm": optim.global_norm(grads),
             "update_norm": optim.global_norm(updates)}
  return TrainState(state.step + 1, optim.merge(t, f), opt_state), metrics


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(model_config, params, batch):
  logits = model_lib.Transformer(model_config).apply(params, batch["tokens"])
  return cross_entropy(logits, batch["tokens"], batch.get("loss_mask"))


def _trim_metrics(path: str, start: int) -> None:
  """Drops what a killed run logged after its last checkpoint (the resumed run logs
  those steps again) and a line cut short by the kill; rewritten atomically."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line).get("step", 0) <= start:
          keep.append(line if line.endswith("\n") else line + "\n")
      except json.JSONDecodeError:
        pass
  workdir_lib.write_atomic(path, "".join(keep))


def evaluate(model_config: ModelConfig, params, batches, batch_sharding=None) -> dict:
  """Token-weighted held-out loss and perplexity over ``batches``."""
  total, count = 0.0, 0.0
  for batch in batches:
    if batch_sharding is not None:
      batch = sharding.global_batch(batch, batch_sharding)
    s, n = jax.device_get(_eval_sums(model_config, params, batch))
    total, count = total + float(s), count + float(n)
  loss = total / max(count, 1.0)
  return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0))), "eval_tokens": count}


def model_and_base_params(config) -> tuple[ModelConfig, Any]:
  """The model config and, with ``init.hf_path`` / ``init.gguf``, the weights to start from.

  With a checkpoint, the architecture comes from its file; the experiment's
  ``model.memory`` and ``model.dtype`` are applied on top.
  """
  model_config = configs.model_config(config)
  source = models.init_source(config.init)
  if not source:
    return model_config, None
  base_config, base, _ = models.load(source, model_config.dtype, tokenizer=False)
  model_config = base_config.replace(memory=model_config.memory, dtype=model_config.dtype,
                                    lora_rank=model_config.lora_rank)
  return model_config, base


def check_trainable(config, m: ModelConfig) -> None:
  """The trainable groups cover the model's parameters and select at least one."""
  shapes = model_lib.abstract_params(m)  # shapes only: traced, never compiled
  groups = optim.groups_from_config(config.optim)
  if not optim.trainable_paths(shapes, groups):
    spec = config.optim.groups or config.optim.trainable
    raise ConfigError(f"optim.{'groups' if config.optim.groups else 'trainable'}={spec!r}: "
                      "selects 0 trainable parameters of this model (model.memory."
                      f"attention_type={m.memory.attention_type!r})")


def validate(config, n_devices: int | None = None, check_paths: bool = True) -> None:
  """The rules of a training run: the schema, then optimizer, mesh, data, init, model.

  ``n_devices`` (default: ``jax.device_count()``) resolves the mesh so batch
  divisibility can be checked. ``check_paths=False`` skips the existence of data
  files and checkpoints (shape-only tests of config files). Nothing is traced or
  compiled. Each job's own section is checked by ``jobs.registry.validate``.
  """
  config_rules.check(config)
  m = configs.model_config(config)
  optim.validate(config.optim)
  if n_devices is None:
    n_devices = jax.device_count()
  sizes = sharding.mesh_shape(config.mesh, n_devices)
  data_lib.validate(config.data, n_batch_shards=sizes["data"] * sizes["fsdp"],
                    check_paths=check_paths)
  pretrained = bool(models.init_source(config.init))
  if config.data.tokenizer == "byte" and not pretrained:
    require(m.vocab_size >= 259, "model.vocab_size", m.vocab_size,
            "must be >= 259, the byte tokenizer's vocabulary (data.tokenizer='byte')")
  if not pretrained:  # (with a checkpoint the architecture comes from its file)
    check_trainable(config, m)
    m.check_sequence_length(config.data.seq_len)
  if check_paths:
    models.validate_init(config.init)


def _abstract(shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)



# ----------------------------------------------------------------------------- run


def run(config, workdir: str, *, stop_after: int | None = None, model=None,
        loss=None, fresh: bool | None = None) -> dict:
  """Trains ``config`` in ``workdir``, resuming from its latest intact checkpoint.

  ``stop_after`` ends the loop after that many total steps without a final
  save, as a preemption would (the schedule still follows ``train.steps``);
  tests use it to check that resuming is exact. Returns a summary dict with
  every step's loss run here (``losses``), the final step and eval metrics.
  Hooks for other trainers (QAT, ``qat.py``): ``model=(model_config,
  base_params)`` replaces ``model_and_base_params(config)``; ``loss`` replaces
  ``loss_fn`` (see ``train_step``); extra scalar metrics are logged too.

  The workdir holds one run (module docstring): WorkdirError when another
  process holds ``<workdir>/.lock`` (naming its PID) or when ``config`` would
  change the recorded run (naming each key: recorded -> now; a higher
  ``train.steps`` extends a run and is no change). ``fresh`` (default
  ``config.train.fresh``) moves the recorded run to
  ``<workdir>/previous/<timestamp>/`` and starts over. CheckpointError when
  checkpoints exist but none is intact.
  """
  validate(config)  # every rule of a training run, before anything is compiled
  if fresh is None:
    fresh = bool(config.train.get("fresh", False))
  # Process 0 holds the lock for the whole run; every process learns whether it got it.
  lock = resume.main_decides(lambda: workdir_lib.Lock(workdir, "trainer").acquire(), workdir)
  try:
    return _run(config, workdir, stop_after, model, loss, fresh)
  finally:
    if lock is not None:
      lock.release()


def _run(config, workdir, stop_after, model, loss, fresh) -> dict:
  is_main = jax.process_index() == 0
  steps, seed = config.train.steps, config.seed

  # 0. The model, then the workdir's record: a config that changes the recorded
  # run stops here, before anything is compiled or written.
  model_config, base_params = model if model is not None else model_and_base_params(config)
  resume.main_decides(lambda: resume.prepare_workdir(workdir, config, model_config, fresh), workdir)

  # 1. Mesh.
  mesh = sharding.make_mesh(config)
  rules = sharding.default_rules(mesh)

  # 2. Data: host-local rows; the batch of step s is data.batch_at(..., s).
  split = data_lib.load(config.data)
  batch_size = config.data.batch_size
  host_rows = sharding.host_slice(batch_size)
  batch_sh = sharding.batch_sharding(mesh, rules)
  eval_set = data_lib.eval_batches(split.heldout, batch_size, config.train.eval_batches,
                                   host_rows)

  # 3. Shapes first: nothing is allocated until the shardings are known.
  groups = optim.groups_from_config(config.optim)
  abstract_params = model_lib.abstract_params(model_config)
  trainable = optim.trainable_paths(abstract_params, groups)
  if not trainable:
    raise ConfigError(f"optim.trainable={config.optim.trainable!r} / optim.groups="
                      f"{config.optim.groups!r}: selects 0 trainable parameters")
  tx = optim.make_optimizer(config.optim, groups, abstract_params, steps)
  lr_at = optim.schedule(config.optim, steps)
  init_rng, train_rng = jax.random.split(jax.random.key(seed))
  init = functools.partial(make_train_state, model_config, tx, trainable)
  state_shapes = jax.eval_shape(init, init_rng, base_params)

  # 4. Shardings: params by the logical rules, optimizer moments like params.
  params_sh = sharding.param_shardings(model_config, mesh, rules)
  state_sh = TrainState(sharding.replicated(mesh), params_sh,
                        sharding.like_params_shardings(state_shapes.opt_state, params_sh, mesh))

  # 5./6. Compiled init and step; the step donates the old state's buffers. Fixed
  # shapes: the step compiles once per run (``step_compiles`` in the result, tested).
  traces = [0]

  def counted_step(*args, **kwargs):
    traces[0] += 1  # runs only while tracing
    return train_step(*args, **kwargs)

  step_fn = jax.jit(
      functools.partial(counted_step, model_config=model_config, tx=tx, trainable=trainable,
                        rng=train_rng, loss=loss),
      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
      donate_argnums=0)

  # 7. Resume from the newest intact checkpoint, restored straight into its
  # shardings (also with checkpoint.enabled=False: that only stops saving).
  with sharding.activation_context(mesh, rules):
    mngr, state = resume.restore(workdir, config, _abstract(state_shapes, state_sh))
    if state is None:
      state = jax.jit(init, out_shardings=state_sh)(init_rng, base_params)
  if mngr is not None and not config.checkpoint.enabled:
    mngr.close()
    mngr = None
  elif mngr is None and config.checkpoint.enabled:
    mngr = resume.checkpoint_manager(workdir, config)
  start = int(jax.device_get(state.step))
  if is_main:
    share = optim.summary(abstract_params, groups)
    print(f"params: {share['total']:,} total, {share['trainable']:,} trainable "
          f"({100 * share['share']:.2f}%); mesh {dict(mesh.shape)}; "
          f"{'resuming at step ' + str(start) if start else 'starting from scratch'}")

  # 8. Loop. Metrics stay on device until a log step (no per-step host sync);
  # then every pending step is checked for NaN/inf, so the error names the step.
  end = steps if stop_after is None else min(steps, stop_after)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if is_main:
    _trim_metrics(metrics_path, start)
  metrics_file = open(metrics_path, "a") if is_main else None
  bar = tqdm(total=steps, initial=start, disable=not (is_main and config.train.progress),
             desc="train", dynamic_ncols=True)
  losses, pending, summary = [], [], {}
  last_time, last_tokens = time.perf_counter(), 0.0
  unsealed = []  # saved steps whose checksum manifest is not written yet

  def write(record):
    if metrics_file:
      metrics_file.write(json.dumps(record) + "\n")
      metrics_file.flush()

  def seal():
    """Waits for orbax to commit the pending saves, then (process 0) writes each
    one's sha256 manifest; until then a save is restorable but unverified."""
    mngr.wait_until_finished()
    if is_main:
      for s in unsealed:
        step_dir = os.path.join(str(mngr.directory), str(s))
        if os.path.isdir(step_dir):
          workdir_lib.write_manifest(step_dir)
    unsealed.clear()

  try:
    for step in range(start, end):
      batch = sharding.global_batch(
          data_lib.batch_at(split.train, step, batch_size, seed, host_rows), batch_sh)
      with sharding.activation_context(mesh, rules):
        state, metrics = step_fn(state, batch)
      pending.append((step + 1, metrics))
      done = step + 1
      if done % config.train.log_every == 0 or done == end:
        fetched = jax.device_get(pending)
        pending = []
        for s, m in fetched:
          loss, gnorm = float(m["loss"]), float(m["grad_norm"])
          if not (np.isfinite(loss) and np.isfinite(gnorm)):
            raise FloatingPointError(
                f"non-finite training value at step {s}: loss={loss}, grad_norm={gnorm} "
                f"(optim.lr={config.optim.lr}, optim.clip_norm={config.optim.clip_norm}); "
                "lower the learning rate or check the data")
          losses.append(loss)
          last_tokens += float(m["tokens"])
        now = time.perf_counter()
        tok_s = last_tokens / max(now - last_time, 1e-9)
        last_time, last_tokens = now, 0.0
        record = {"step": done, "loss": loss, "grad_norm": gnorm,
                  "update_norm": float(m["update_norm"]), "lr": float(lr_at(done - 1)),
                  "tokens_per_s": tok_s}
        record.update({k: float(v) for k, v in m.items() if k not in record and k != "tokens"})
        write(record)
        summary.update(record)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
      bar.update(1)
      is_last = done == steps
      if eval_set and ((config.train.eval_every and done % config.train.eval_every == 0)
                       or is_last):
        with sharding.activation_context(mesh, rules):
          ev = evaluate(model_config, state.params, eval_set, batch_sh)
        write({"step": done, **ev})
        summary.update(ev)
      if mngr and (done % config.checkpoint.every == 0 or is_last):
        if unsealed:
          seal()  # orbax would wait for the previous save here anyway
        mngr.save(done, args=ocp.args.StandardSave(state))
        unsealed.append(done)
  finally:
    bar.close()
    if mngr:
      seal()
      mngr.close()
    if metrics_file:
      metrics_file.close()
  summary.update(losses=losses, final_step=int(jax.device_get(state.step)),
                 step_compiles=traces[0])
  return {"state": state, **summary}
