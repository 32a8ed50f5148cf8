"""The ``quant`` job: one (method, preset) point of the quantization results.

base model (pretrained here, or ``init.*``) -> the method's QuantConfig at
``quant.preset`` -> PTQ (calibrate) or QAT/EdgeQAT (``train/qat.py``) -> held-out
loss and perplexity -> the integer path's agreement where the config can run in
integer mode -> ``<workdir>/quant_metrics.json``. Its settings are the
``quant_job`` section (``configs/schema.py``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax

from edgeinfinite_jax import configs
from edgeinfinite_jax.configs import schema
from edgeinfinite_jax.data import corpus as data_lib
from edgeinfinite_jax.model.config import ConfigError, quantized
from edgeinfinite_jax.quant import qconfig as qc
from edgeinfinite_jax.train import calib, qat, trainer


def validate(config) -> None:
  """Rules of the ``quant_job`` / ``quant`` sections (job ``quant``), before any work."""
  known = schema.QUANT_JOB
  extra = sorted(set(config.quant_job.keys()) - set(known))
  if extra:
    raise ConfigError(f"unknown key(s) {', '.join('quant_job.' + k for k in extra)}; valid "
                      f"keys: {', '.join(sorted(known))}")
  q = config.quant_job
  if q.observer not in calib.OBSERVERS:
    raise ConfigError(f"quant_job.observer={q.observer!r}: must be one of "
                      f"{sorted(calib.OBSERVERS)}")
  for key in ("base_steps", "calib_batches", "group_size"):
    v = q[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise ConfigError(f"quant_job.{key}={v!r}: must be a positive integer")
  if q.requant_mode not in qc.REQUANT_MODES:
    raise ConfigError(f"quant_job.requant_mode={q.requant_mode!r}: must be one of "
                      f"{qc.REQUANT_MODES}")
  if q.qat_lr < 0 or q.quant_lr_mult < 0:
    raise ConfigError(f"quant_job.qat_lr={q.qat_lr!r} / quant_lr_mult={q.quant_lr_mult!r}: "
                      "must be >= 0")
  quantized(configs.model_config(config), qat.method_quant(config))  # model rules


def run(config, workdir: str) -> dict:
  """The ``quant`` job: base model, method at the preset, metrics JSON (module doc)."""
  trainer.validate(config)
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  q = config.quant_job
  teacher_cfg, teacher_params = qat.base_model(config, workdir)
  quant = qat.method_quant(config)
  split = data_lib.load(config.data)
  bs = config.data.batch_size
  calib_set = qat.batches(split.train, bs, q.calib_batches, seed=config.seed + 1)
  heldout = [b["tokens"] for b in data_lib.eval_batches(split.heldout, bs,
                                                        max(config.train.eval_batches, 1))]
  fp = trainer.evaluate(teacher_cfg, teacher_params, [{"tokens": t} for t in heldout])
  metrics: dict[str, Any] = {"method": q.method, "preset": config.quant.preset or "w8a8",
                             "fp_eval_loss": fp["eval_loss"], "fp_eval_ppl": fp["eval_ppl"]}
  if quant is None:
    student_cfg, params = teacher_cfg, teacher_params
  else:
    student_cfg = quantized(teacher_cfg, quant)
    metrics["quant"] = quant.to_dict()
    if q.method in qat.TRAINED:
      init = calib.calibrate(student_cfg, teacher_params, calib_set, q.observer)
      out = qat.train_qat(config, os.path.join(workdir, "qat"), student_cfg, init, teacher_cfg,
                      teacher_params)
      params = jax.device_get(out["state"].params)
      metrics["qat_losses"] = [out["losses"][0], out["losses"][-1]] if out["losses"] else []
    else:
      params = calib.quantize_model(student_cfg, teacher_params, calib_set, q.observer)
  ev = trainer.evaluate(student_cfg, params, [{"tokens": t} for t in heldout])
  metrics.update(eval_loss=ev["eval_loss"], eval_ppl=ev["eval_ppl"], eval_tokens=ev["eval_tokens"])
  blocker = qat.integer_blocker(quant)
  if blocker is None:
    try:
      metrics.update(qat.integer_agreement(student_cfg, params, heldout, calib_set, q.output_bits,
                                       q.requant_mode))
    except ValueError as e:  # e.g. learned zero points that drifted out of range
      metrics["integer"] = f"not run: {e}"
  else:
    metrics["integer"] = f"not run: {blocker}"
  metrics["seconds"] = time.perf_counter() - t0
  with open(os.path.join(workdir, "quant_metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2, default=float)
  return metrics
