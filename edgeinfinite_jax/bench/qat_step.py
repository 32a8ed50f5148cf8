"""QAT's step cost: one QAT/EdgeQAT training step against one full-precision step.

The benchmark's ``qat`` row (target: at most 1.5x). Both steps are compiled as
``train.run`` compiles them (donated state), and alternate so that machine load
hits both alike. ``run_job`` is that row's worker, in a process of its own
(``python -m edgeinfinite_jax.bench.qat_step JOB_JSON``, see ``probes``): the
training stack it imports stays out of the engine workers' memory.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from edgeinfinite_jax import configs
from edgeinfinite_jax.bench import measure
from edgeinfinite_jax.model import transformer as model_lib
from edgeinfinite_jax.model.config import quantized
from edgeinfinite_jax.train import calib, optim, qat
from edgeinfinite_jax.train import trainer as train


# ----------------------------------------------------------------------------- benchmark
def qat_step_cost(config, n: int = 10, warmup: int = 2) -> dict:
  """Median wall time of one QAT training step vs one full-precision step.

  Same model (``config.model``), batch (``data.batch_size`` x ``data.seq_len``
  random tokens) and optimizer; the QAT step is ``quant_job.method``'s recipe at
  ``quant.preset`` (a training method; "edgeqat_ed" when the method is fp/PTQ),
  student and teacher both evaluated. After ``warmup`` calls of each (the first
  compiles), the two steps alternate for ``n`` rounds, so a change in machine
  load hits both alike. Returns the median milliseconds of each and the median of
  the per-round ratios. Both steps donate their state, as ``train.run``'s does.
  """
  model_config = configs.model_config(config)
  method = config.quant_job.method if config.quant_job.method in qat.TRAINED else "edgeqat_ed"
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.quant_job.method = method
  quant = qat.method_quant(sub)
  student_cfg = quantized(model_config, quant)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, model_config.vocab_size,
                        (config.data.batch_size, config.data.seq_len)).astype(np.int32)
  batch = {"tokens": jnp.asarray(tokens)}
  params = model_lib.init_params(model_config, jax.random.key(config.seed))
  student_params = calib.calibrate(student_cfg, params, [tokens])
  c = qat.qat_config(sub)

  def stepper(cfg, p, loss):
    groups = optim.groups_from_config(c.optim)
    trainable = optim.trainable_paths(p, groups)
    tx = optim.make_optimizer(c.optim, groups, p, 1000)
    p = jax.tree.map(jnp.copy, p)  # the step donates its state; the teacher keeps `params`
    box = [train.TrainState(jnp.zeros((), jnp.int32), p, tx.init(optim.split(p, trainable)[0]))]
    step = jax.jit(functools.partial(train.train_step, model_config=cfg, tx=tx,
                                     trainable=trainable, rng=jax.random.key(0), loss=loss),
                   donate_argnums=0)  # as train.run compiles it

    def once():
      t = time.perf_counter()
      box[0], m = step(box[0], batch)
      jax.block_until_ready(m["loss"])
      return time.perf_counter() - t
    return once

  fp = stepper(model_config, params, None)
  q = stepper(student_cfg, student_params, qat.make_loss(model_config, params, quant.edgeqat))
  for _ in range(warmup):
    fp(), q()
  times = [(fp(), q()) for _ in range(n)]
  fp_ms = 1e3 * statistics.median(t[0] for t in times)
  qat_ms = 1e3 * statistics.median(t[1] for t in times)
  # Each round's two steps run back to back, so its ratio is what a shared machine's
  # load changes least; the median of those is the reported ratio.
  return {"fp_step_ms": fp_ms, "qat_step_ms": qat_ms,
          "ratio": statistics.median(b / a for a, b in times),
          "ratio_of_medians": qat_ms / fp_ms, "n": n,
          "method": method, "preset": config.quant.preset or "w8a8",
          "batch": list(tokens.shape)}


def run_job(job: dict) -> dict:
  """``qat_step_cost`` on the benchmark's model (``job`` as ``probes.measure_qat`` builds it).

  The batch is small (``job["batch"]`` rows of ``job["seq_len"]`` tokens) so that
  the two compiled training steps fit the run's time budget on a CPU.
  """
  config = configs.base_config()
  config.model.update(job["model"])
  config.data.batch_size = job["batch"]
  config.data.seq_len = job["seq_len"]
  config.seed = job.get("seed", 0)
  return {"method": "qat", "raw": qat_step_cost(config, n=job["n"], warmup=job["warmup"])}


if __name__ == "__main__":
  sys.exit(measure.serve(sys.argv[1], {"qat": run_job}))
