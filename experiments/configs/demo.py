"""The demo job (README's first command): pretrain -> S-SFT -> passkey -> PTQ -> results.

  python -m edgeinfinite_jax.cli.main --config=experiments/configs/demo.py --workdir=results/demo

Stages and outputs: see ``edgeinfinite_jax/pipeline.py``. The settings below are
what worked best in the passkey experiments logged in
``experiments/NOTES_passkey.md``.

Arguments (after ``:``, comma-separated, see ``configs.parse_arg``):
  tiny          a CI-sized run (< 90 s on a 2-core CPU): every stage, tiny sizes
  steps=INT     pretraining steps (0 = the variant's default)
  sft_steps=INT S-SFT steps per trainable set (0 = the variant's default)

Sweep (``sweep(add, arg)``, the one sweep convention): gate form, update rule,
pre/post-RoPE memory and the S-SFT trainable set, each against the default.
"""

from edgeinfinite_jax import configs


def _arg(arg):
  return configs.parse_arg(arg, tiny=False, steps=0, sft_steps=0)


def get_config(arg=None):
  a = _arg(arg)
  config = configs.base_config()
  config.job = "demo"
  d = config.demo
  if a.tiny:
    config.model.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                        num_kv_heads=1, max_position_embeddings=4096)
    config.data.update(seq_len=128, batch_size=4, max_bytes=100_000)
    config.train.update(steps=a.steps or 6, log_every=3, eval_every=0, eval_batches=1)
    config.optim.update(lr=3e-3, warmup_steps=2)
    config.checkpoint.update(every=100, keep=1)
    d.memory.update(segment_len=32, n_window=32, n_sink=4)
    d.update(sft_len=320, sft_samples=16, sft_steps=a.sft_steps or 3, sft_batch=2, sft_warmup=1,
             eval_mults="1,2", eval_depths="0.0,0.3", eval_samples=2, eval_batch=1,
             ttft_mults="1,2", quant_eval_batches=1, digits=3)
    return config
  config.model.update(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                      num_kv_heads=2, max_position_embeddings=16384)
  config.data.update(seq_len=512, batch_size=8, max_bytes=2_000_000)
  config.train.update(steps=a.steps or 400, log_every=20, eval_every=0, eval_batches=4)
  config.optim.update(lr=3e-3, warmup_steps=30, weight_decay=0.0)
  config.checkpoint.update(every=200, keep=1)
  # A quarter of the pretraining rows are passkey-style samples (full loss) so the
  # backbone can learn in-context copying before the memory is fine-tuned.
  d.update(pretrain_task_mix=0.25, sft_steps=a.sft_steps or 300)
  return config


def sweep(add, arg=None):
  """One-factor ablations around the demo default."""
  del arg
  add({})
  add({"demo.memory.gate": "mlp"})
  add({"demo.memory.update_rule": "linear"})
  add({"demo.memory.mem_uses_rope": True})
  add({"demo.sft_runs": "gate+attention"})


def metrics():
  return ["eval.passkey.edgeinfinite.mean", "eval.passkey.streaming.mean"]
