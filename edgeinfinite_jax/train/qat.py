"""Quantization-aware training (plain QAT and EdgeQAT): recipes, the loss, the run.

The job that runs one method end to end is ``jobs/quant.py``.

QAT reuses ``train.run`` whole (linear loop, checkpoints, resume, metrics, held-out
eval): the student is ``model.quantized(config, quant)`` with its learned scales
(LSQ+ under ``.../quant/...``, initialised by ``quant.calib.calibrate``), and
``make_loss`` replaces the trainer's loss:

  loss = ce_w·CE + kd_w·T²·KL(teacher ‖ student) + entropy_w·L_E + dist_w·L_D

* CE: next-token cross entropy of the fake-quantized student (``train.cross_entropy``).
* KD: the frozen full-precision teacher's logits, temperature T, mean over the
  counted tokens (the released recipe's ``batchmean`` is ~T_len x larger; its
  weights were tuned for that, ours for the per-token mean).
* L_E = -log Σ_l [Σ log(1+Var_d Q̂_l) + Σ log(1+Var_d K̂_l)] on the quantized,
  post-RoPE Q̂/K̂ of every layer (edgeqat.md §4, code form).
* L_D = -log Σ_{l,b,h} cos(S_student, S_teacher) over pre-mask, pre-softmax
  logits (intended direction; ``edgeqat.published_sign`` gives the released
  code's +log, which pushes the maps apart, edgeqat.md §5).
A weight of 0 switches a term off (it is then not computed); the unweighted value
of every active term is logged next to the total (``ce``, ``kd``, ``entropy``,
``dist``). Token-adaptive bits need no loss: the student applies them in its
forward (``quant.edgeqat.adaptive_fraction``). The quantizer parameters form their
own trainable group (``.*/quant/.*``, lr x ``quant_job.quant_lr_mult``, no weight
decay) unless ``optim.groups`` is set.

The ``quant`` job (``run``): a float base model (``init.hf_path`` / ``init.gguf``, or a short
pretraining run on the configured data, reused from ``quant_job.base_workdir``),
then one method of ``QUANT_METHODS`` at ``quant.preset``, then held-out perplexity and
the integer-vs-fake-quant agreement written to ``quant_metrics.json``.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from edgeinfinite_jax.data import corpus as data_lib
from edgeinfinite_jax import configs
from edgeinfinite_jax.checkpoints import models
from edgeinfinite_jax.train import optim, trainer as train
from edgeinfinite_jax.model import transformer as model_lib
from edgeinfinite_jax.model.config import ConfigError
from edgeinfinite_jax.train import calib
from edgeinfinite_jax.quant import losses
from edgeinfinite_jax.quant import qconfig as qc
from edgeinfinite_jax.quant.qconfig import EdgeQATOptions, QuantConfig
from edgeinfinite_jax.model.config import quant_of, quantized

# method -> what it does at the preset's bit widths (``recipe``)
QUANT_METHODS = {
    "fp": "full precision (no quantization)",
    "ptq_rtn": "PTQ, round to nearest, per-tensor weights, calibrated per-tensor activations",
    "ptq_fine": "PTQ, per-group weights, dynamic per-token activations, int8 per-token KV",
    "qat": "QAT with LSQ+ scales, 0.5 CE + 0.5 KD (T=2)",
    "edgeqat_e": "qat + entropy loss L_E (0.5)",
    "edgeqat_ed": "qat + L_E + attention-distribution loss L_D (1.0, intended sign)",
    "edgeqat_all": "edgeqat_ed + token-adaptive bits: the least important half of the "
                   "tokens at half the preset's activation bits (w8a8/w4a8: 4, w4a4: 2)",
}
TRAINED = ("qat", "edgeqat_e", "edgeqat_ed", "edgeqat_all")




def recipe(method: str, preset: str, group_size: int = 32) -> QuantConfig | None:
  """The QuantConfig of one (method, preset) point of the results table."""
  if method not in QUANT_METHODS:
    raise ConfigError(f"quant_job.method={method!r}: must be one of {sorted(QUANT_METHODS)}")
  if method == "fp":
    return None
  base = qc.preset(preset)
  if method == "ptq_rtn":
    return base.replace(linear_weights=base.linear_weights.replace(granularity="per_tensor",
                                                                   axis=None))
  if method == "ptq_fine":
    return qc.fine_grained(preset, group_size=group_size)
  e = EdgeQATOptions(ce_weight=0.5, kd_weight=0.5, kd_temperature=2.0)
  if method in ("edgeqat_e", "edgeqat_ed", "edgeqat_all"):
    e = dataclasses.replace(e, entropy_weight=0.5)
  if method in ("edgeqat_ed", "edgeqat_all"):
    e = dataclasses.replace(e, distribution_weight=1.0)
  if method == "edgeqat_all":
    bits = base.linear_inputs.bits  # w8a8/w4a8: tokens at 8 or 4 bits; w4a4: 4 or 2
    e = dataclasses.replace(e, adaptive_fraction=0.5, adaptive_bits=(bits, max(2, bits // 2)))
  return base.replace(activation_scales="learned", weight_scales="learned", edgeqat=e)


def method_quant(config) -> QuantConfig | None:
  """The job's QuantConfig: the method's recipe at ``quant.preset``, then every other
  key of the ``quant`` section on top (e.g. ``quant.edgeqat.published_sign``)."""
  q = config.quant_job
  preset = config.quant.preset or "w8a8"
  base = recipe(q.method, preset, q.group_size)
  if base is None:
    return None
  d = config.quant.to_dict()
  extra = {k: v for k, v in d.items() if k not in ("preset", "preset_args", "mode")}
  edge = extra.pop("edgeqat", None) or {}
  if edge:
    extra["edgeqat"] = {**dataclasses.asdict(base.edgeqat), **edge}
  out = QuantConfig.from_dict({**base.to_dict(), **extra})
  return out.replace(mode=d.get("mode") or out.mode)


# ----------------------------------------------------------------------------- loss
def _captured(state, name):
  inter = state["intermediates"]
  return [inter[f"layers_{i}"]["attn"][name][0] for i in range(len(inter))]


def make_loss(teacher_config, teacher_params, options: EdgeQATOptions):
  """A ``train.loss_fn`` replacement for the student (see the module doc).

  The teacher's parameters are closed over (constants of the compiled step: fine
  for the small models QAT targets here; a large teacher would be an argument).
  """
  e = options
  capture = e.entropy_weight > 0 or e.distribution_weight > 0
  teacher = model_lib.Transformer(quantized(teacher_config, None))

  def loss(trainable, frozen, student_config, batch, rng):
    del rng
    params = optim.merge(trainable, frozen)
    tokens = batch["tokens"]
    student = model_lib.Transformer(student_config)
    if capture:
      logits, state = student.apply(params, tokens, mutable=["intermediates"])
    else:
      logits = student.apply(params, tokens)
    total, count = train.cross_entropy(logits, tokens, batch.get("loss_mask"))
    ce = total / jnp.maximum(count, 1.0)
    metrics = {"tokens": count, "ce": ce}
    value = e.ce_weight * ce
    t_logits = t_state = None
    if e.kd_weight > 0 or e.distribution_weight > 0:
      if e.distribution_weight > 0:
        t_logits, t_state = teacher.apply(teacher_params, tokens, mutable=["intermediates"])
      else:
        t_logits = teacher.apply(teacher_params, tokens)
      t_logits = jax.lax.stop_gradient(t_logits)
    if e.kd_weight > 0:
      lm = batch.get("loss_mask")
      mask = None if lm is None else lm[:, 1:].astype(bool)
      kd = losses.kd_loss(logits[:, :-1], t_logits[:, :-1], e.kd_temperature, mask=mask)
      metrics["kd"] = kd
      value = value + e.kd_weight * kd
    if e.entropy_weight > 0:
      e_sum = sum(losses.entropy_term(q, k) for q, k in
                  zip(_captured(state, "q_hat"), _captured(state, "k_hat")))
      ent = losses.entropy_loss_from_sum(e_sum, 1.0)
      metrics["entropy"] = ent
      value = value + e.entropy_weight * ent
    if e.distribution_weight > 0:
      dist = losses.attention_distribution_loss(
          _captured(state, "logits"), [jax.lax.stop_gradient(x) for x in
                                       _captured(t_state, "logits")],
          published_sign=e.published_sign, weight=1.0)
      metrics["dist"] = dist
      value = value + e.distribution_weight * dist
    return value, metrics

  return loss


def qat_config(config):
  """``config`` for QAT's ``train.run``: quantizer group (own lr, no decay), QAT lr."""
  c = ml_collections.ConfigDict(config.to_dict())
  if not c.optim.groups:
    mult = float(config.quant_job.quant_lr_mult)
    c.optim.groups = optim.partition([(optim.QUANT, mult, 0.0)], 1.0)
  if config.quant_job.qat_lr:
    c.optim.lr = float(config.quant_job.qat_lr)
  return c


def train_qat(config, workdir, student_config, student_params, teacher_config,
              teacher_params, *, stop_after=None) -> dict:
  """QAT of ``student_params`` (calibrated) with ``train.run`` in ``workdir``."""
  quant = quant_of(student_config)
  return train.run(qat_config(config), workdir, stop_after=stop_after,
                   model=(student_config, student_params),
                   loss=make_loss(teacher_config, teacher_params, quant.edgeqat))


# ----------------------------------------------------------------------------- job
def batches(rows, batch_size, n, seed=0):
  return [data_lib.batch_at(rows, s, batch_size, seed)["tokens"] for s in range(n)]


def base_model(config, workdir):
  """(float model config, params): ``init.hf_path`` / ``init.gguf``, or a pretraining run of
  ``quant_job.base_steps`` steps in ``quant_job.base_workdir`` (resumed / reused)."""
  if models.init_source(config.init):
    return train.model_and_base_params(config)
  base_dir = config.quant_job.base_workdir or os.path.join(workdir, "base")
  pre = ml_collections.ConfigDict(config.to_dict())
  steps = int(config.quant_job.base_steps)
  pre.train.steps = steps
  pre.checkpoint.update(every=steps, enabled=True)
  out = train.run(pre, base_dir)
  return configs.model_config(config), jax.device_get(out["state"].params)


def integer_agreement(config, params, batches, calib_batches, output_bits=16,
                      requant_mode="tflite_optimized", headroom=2.0) -> dict:
  """Integer path vs the fake-quantized model with the same output grid, on ``batches``.

  All three run ``qconfig.integer_mode(quant)``'s placements (the linear-output grid
  is calibrated on ``calib_batches`` where missing, its range widened ``headroom``
  times so held-out values beyond the calibration batches do not clip: one of an
  int16 grid's 15 bits for 2x). The reference is fake_quant with exact dots
  (``fake_quant_dots='exact'``: the quantized function itself, so the difference
  is the integer path's fixed-point requantization); ``int_vs_float_dots_*`` repeat
  the comparison against fake_quant's default float32 dots, whose accumulation
  error adds its own rounding flips. Reports the largest logit difference in output
  quantization steps (an int8 per-tensor grid over the reference logits' range:
  (max - min)/255), the greedy next-token agreement and the integer model's
  held-out loss.
  """
  quant = quant_of(config)
  int_q = qc.integer_mode(quant, output_bits, requant_mode)
  # fake_quant never reads requant_mode: one value for the references keeps their
  # compilations (and the calibration's) shared by the calls for each mode.
  fake_q = int_q.replace(mode="fake_quant", requant_mode=qc.REQUANT_MODES[0])
  ref_cfg = quantized(config, fake_q.replace(fake_quant_dots="exact"))
  float_cfg = quantized(config, fake_q)
  int_cfg = quantized(config, int_q)
  before = set(_paths(params))
  params = calib.calibrate(float_cfg, params, calib_batches, only_missing=True)
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v * headroom if _key(p) not in before and _key(p).endswith("_out/scale")
      else v, params)
  ref, flt, got, total, count = [], [], [], 0.0, 0.0
  for tokens in batches:
    ref.append(np.asarray(model_lib.forward(ref_cfg, params, tokens)))
    flt.append(np.asarray(model_lib.forward(float_cfg, params, tokens)))
    got.append(np.asarray(model_lib.forward(int_cfg, params, tokens)))
    s, n = train.cross_entropy(jnp.asarray(got[-1]), jnp.asarray(tokens))
    total, count = total + float(s), count + float(n)
  ref, flt, got = (np.concatenate([x.reshape(-1, x.shape[-1]) for x in v])
                   for v in (ref, flt, got))
  step = float(ref.max() - ref.min()) / 255.0

  def compare(a, b):
    diff = float(np.abs(a - b).max())
    return diff, diff / step, 100 * float(np.mean(a.argmax(-1) == b.argmax(-1)))

  diff, steps, agree = compare(ref, got)
  _, f_steps, f_agree = compare(flt, got)
  # The two fake-quant references against each other: how far float32 rounding alone
  # moves this quantized model (the floor the integer path's agreement is read against;
  # a model whose codes sit near rounding ties cascades flips through its layers).
  _, floor_steps, floor_agree = compare(ref, flt)
  return {"int_max_logit_diff": diff, "output_step": step, "int_max_diff_steps": steps,
          "int_greedy_agree_pct": agree, "int_positions": int(ref.shape[0]),
          "int_vs_float_dots_max_diff_steps": f_steps,
          "int_vs_float_dots_greedy_agree_pct": f_agree,
          "float_dots_vs_exact_max_diff_steps": floor_steps,
          "float_dots_vs_exact_greedy_agree_pct": floor_agree,
          "int_eval_loss": total / max(count, 1.0),
          "int_eval_ppl": float(np.exp(min(total / max(count, 1.0), 50.0))),
          "int_requant_mode": requant_mode, "int_output_bits": output_bits}


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _paths(params):
  return [_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def integer_blocker(quant) -> str | None:
  """Why a config cannot run in integer mode (None if it can)."""
  if quant is None:
    return "full precision"
  try:
    qc.integer_mode(quant)
  except qc.QuantConfigError as e:
    return str(e)
  return None


