"""QAT / EdgeQAT: loss terms (switchable, summed, logged), LSQ gradients, the ``quant``
job end to end (QAT through train.run, PTQ with the integer check), the step-cost hook."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from edgeinfinite_jax import configs
from edgeinfinite_jax.jobs import registry
from edgeinfinite_jax.model import transformer as model
from edgeinfinite_jax.bench import qat_step
from edgeinfinite_jax.jobs import quant as quant_job
from edgeinfinite_jax.train import qat
from edgeinfinite_jax.train import calib
from edgeinfinite_jax.model.config import quantized
from quant_fixtures import fast_compiles, tiny, tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _fast():
  with fast_compiles():
    yield


@pytest.mark.slow
def test_loss_terms_switch_on_and_off_and_sum_to_the_total():
  base = tiny()
  params = model.init_params(base, jax.random.key(0))
  quant = qat.recipe("edgeqat_ed", "w4a8")
  scfg = quantized(base, quant)
  student = calib.calibrate(scfg, params, [tokens(16)])
  batch = {"tokens": jnp.asarray(tokens(16, seed=2))}

  def run(**options):
    e = dataclasses.replace(quant.edgeqat, **options)
    fn = jax.jit(jax.value_and_grad(qat.make_loss(base, params, e), has_aux=True),
                 static_argnums=2)
    (value, metrics), grads = fn(student, {}, scfg, batch, jax.random.key(0))
    return float(value), {k: float(v) for k, v in metrics.items()}, e, grads

  value, m, e, grads = run()
  assert set(m) == {"tokens", "ce", "kd", "entropy", "dist"}
  total = (e.ce_weight * m["ce"] + e.kd_weight * m["kd"] + e.entropy_weight * m["entropy"]
           + e.distribution_weight * m["dist"])
  np.testing.assert_allclose(value, total, rtol=1e-5)
  assert m["dist"] < 0 and m["entropy"] < 0 and m["kd"] > 0  # -log Σcos, -log Σlog(1+var)
  # LSQ step sizes and zero points get gradients (their own trainable group).
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(grads["params"]).items()}
  for name in ("layers_0/attn/quant/q/scale", "layers_1/mlp/quant/mlp_input/zero_point",
               "layers_0/attn/k_proj/quant/scale"):
    assert float(jnp.abs(flat[name]).max()) > 0, name
  # The released code's sign flips L_D; terms with weight 0 are neither computed nor logged.
  value, m2, _, _ = run(kd_weight=0.0, entropy_weight=0.0, published_sign=True)
  assert set(m2) == {"tokens", "ce", "dist"}
  np.testing.assert_allclose(m2["dist"], -m["dist"], rtol=1e-5)
  np.testing.assert_allclose(value, 0.5 * m2["ce"] + m2["dist"], rtol=1e-5)


def _job_config(tmp_path, method, preset):
  module = configs.load_module(os.path.join(ROOT, "experiments/configs/quant_tiny.py"))
  config = module.get_config(f"tiny,method={method},preset={preset},base={tmp_path}/base")
  config.data.update(seq_len=32, max_bytes=200_000)
  config.quant_job.update(base_steps=20, calib_batches=2)
  config.train.update(steps=12, log_every=1, eval_batches=2)
  return config


@pytest.mark.slow
def test_quant_job_runs_edgeqat_with_every_term_and_writes_metrics(tmp_path):
  got = quant_job.run(_job_config(tmp_path, "edgeqat_all", "w4a4"), str(tmp_path / "all"))
  saved = json.loads((tmp_path / "all" / "quant_metrics.json").read_text())
  assert saved["method"] == "edgeqat_all" and saved["preset"] == "w4a4"
  assert saved["quant"]["edgeqat"]["adaptive_fraction"] == 0.5
  assert np.isfinite(saved["eval_ppl"]) and np.isfinite(saved["fp_eval_ppl"])
  assert saved["integer"].startswith("not run: quant.edgeqat.adaptive_fraction")
  logs = [json.loads(x) for x in (tmp_path / "all" / "qat" / "metrics.jsonl").read_text()
          .splitlines() if '"loss"' in x]
  assert len(logs) == 12 and all({"ce", "kd", "entropy", "dist"} <= set(r) for r in logs)
  loss = [r["loss"] for r in logs]
  assert np.mean(loss[-3:]) < np.mean(loss[:3]), loss
  assert got["eval_ppl"] == saved["eval_ppl"]


@pytest.mark.slow
def test_qat_step_cost_reports_both_steps():
  module = configs.load_module(os.path.join(ROOT, "experiments/configs/quant_tiny.py"))
  config = module.get_config("tiny,method=qat")
  config.data.update(seq_len=16, batch_size=2)
  config.model.num_layers = 1
  got = qat_step.qat_step_cost(config, n=2, warmup=1)
  assert got["method"] == "qat" and got["batch"] == [2, 16]
  assert got["fp_step_ms"] > 0 and got["qat_step_ms"] > 0
  assert got["ratio_of_medians"] == pytest.approx(got["qat_step_ms"] / got["fp_step_ms"])
  assert got["ratio"] > 0  # the median of the per-round ratios


def test_quant_job_config_errors_name_key_and_rule(tmp_path):
  cases = [({"quant_job.method": "gptq"}, r"quant_job.method='gptq': must be one of"),
           ({"quant_job.observer": "max"}, r"quant_job.observer='max'"),
           ({"quant_job.group_size": 24, "quant_job.method": "ptq_fine"},
            r"group_size=24: does not divide"),
           ({"quant.preset": "w3a3", "quant_job.method": "qat"}, r"preset='w3a3'")]
  for overrides, needle in cases:
    config = configs.apply_overrides(_job_config(tmp_path, "fp", "w8a8"), overrides)
    with pytest.raises(ValueError, match=needle):
      registry.validate(config, n_devices=1)
