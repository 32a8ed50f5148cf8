"""Quantization results on a tiny Llama: PTQ, QAT and EdgeQAT at W8A8 / W4A8 / W4A4.

  python -m edgeinfinite_jax.cli.main --config=experiments/configs/quant_tiny.py:tiny \
      --config.quant_job.method=edgeqat_ed --config.quant.preset=w4a8 \
      --workdir=workdirs/quant_tiny/edgeqat_ed_w4a8

One run = one point (job ``quant``, ``jobs/quant.py``): a float base model (pretrained
on the embedded corpus for ``quant_job.base_steps`` steps in
``quant_job.base_workdir``, shared by every point and reused once trained), then
the method at the preset, then ``quant_metrics.json`` in the workdir: held-out
perplexity (float base and quantized), and for methods that can run in integer
mode the integer-vs-fake-quant agreement (max logit difference in output
quantization steps, greedy next-token agreement, integer perplexity).

Arguments (after ``:``, comma-separated, see ``configs.parse_arg``):
  tiny            a CPU run well under a minute per point: 2 layers, hidden 32,
                  seq 64, 150 base steps (trained once), 30 QAT steps
  method=NAME     one of qat.QUANT_METHODS (default edgeqat_ed)
  preset=NAME     w8a8 | w4a8 | w4a4 (default w4a8)
  base=DIR        the shared base-model workdir (default workdirs/quant_tiny/base)

Sweep: fp once, then every other method x {w8a8, w4a8, w4a4} (19 points).
"""

from edgeinfinite_jax import configs

METHODS = ("ptq_rtn", "ptq_fine", "qat", "edgeqat_e", "edgeqat_ed", "edgeqat_all")
PRESETS = ("w8a8", "w4a8", "w4a4")


def _arg(arg):
  return configs.parse_arg(arg, tiny=False, method="edgeqat_ed", preset="w4a8",
                              base="workdirs/quant_tiny/base")


def get_config(arg=None):
  a = _arg(arg)
  config = configs.base_config()
  config.job = "quant"
  config.quant_job.update(method=a.method, base_workdir=a.base, calib_batches=4,
                         group_size=32, observer="minmax")
  config.quant.preset = a.preset
  config.model.max_position_embeddings = 2048
  if a.tiny:
    config.model.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2)
    config.data.update(seq_len=64, batch_size=8, max_bytes=400_000)
    config.quant_job.update(base_steps=150)
    config.train.update(steps=30, log_every=10, eval_every=0, eval_batches=4, progress=False)
    config.optim.update(lr=3e-3, warmup_steps=10)
    config.quant_job.qat_lr = 1e-3
    config.checkpoint.update(every=30, keep=1)
  else:
    config.model.update(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                        num_kv_heads=4)
    config.data.update(seq_len=256, batch_size=32)
    config.quant_job.update(base_steps=3000, group_size=64)
    config.train.update(steps=500, log_every=50, eval_every=0, eval_batches=8)
    config.optim.update(lr=1e-3, warmup_steps=200)
    config.quant_job.qat_lr = 2.5e-4
    config.checkpoint.update(every=500, keep=1)
  return config


def sweep(add, arg=None):
  """Full precision once, then method x preset."""
  add({"quant_job.method": "fp"})
  for method in METHODS:
    for preset in PRESETS:
      add({"quant_job.method": method, "quant.preset": preset})


def metrics():
  return ["fp_eval_ppl", "eval_ppl", "int_eval_ppl", "int_max_diff_steps",
          "int_greedy_agree_pct"]
