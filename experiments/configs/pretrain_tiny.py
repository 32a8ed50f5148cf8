"""Pretrain a small Llama (full attention) on the embedded stdlib-prose corpus.

  python -m edgeinfinite_jax.cli.main --config=experiments/configs/pretrain_tiny.py:tiny \
      --workdir=workdirs/pretrain_tiny

Arguments (after ``:``, comma-separated, see ``configs.parse_arg``):
  tiny          a seconds-long CPU run: 2 layers, hidden 32, seq 64, 60 steps
  runlocal      same shrink as ``tiny`` (big_vision's name for it)
  size=NAME     model size: tiny | small (default) | medium
  lr=FLOAT      peak learning rate (default 3e-3 for tiny, 1e-3 otherwise)
  steps=INT     training steps (0 = the variant's default)

Sweep convention (shared by every config file): ``sweep(add, arg=None)`` calls
``add({...})`` once per point with a dict of dotted config keys, the same keys
as ``--config.KEY=VALUE``. ``python -m edgeinfinite_jax.cli.sweep
--config=experiments/configs/pretrain_tiny.py:tiny --workdir=DIR --dry-run`` prints
one command per point.
"""

from edgeinfinite_jax import configs

SIZES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                 num_kv_heads=2),
    "small": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                  num_kv_heads=4),
    "medium": dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                   num_kv_heads=2),
}


def _arg(arg):
  a = configs.parse_arg(arg, tiny=False, runlocal=False, size="", lr=0.0, steps=0)
  a.tiny = a.tiny or a.runlocal
  a.size = a.size or ("tiny" if a.tiny else "small")
  if a.size not in SIZES:
    raise ValueError(f"config arg size={a.size!r}: must be one of {sorted(SIZES)}")
  return a


def get_config(arg=None):
  a = _arg(arg)
  config = configs.base_config()
  config.model.update(SIZES[a.size])
  config.model.max_position_embeddings = 2048
  if a.tiny:
    config.data.update(seq_len=64, batch_size=8, max_bytes=400_000)
    config.train.update(steps=a.steps or 60, log_every=10, eval_every=30, eval_batches=2)
    config.optim.update(lr=a.lr or 3e-3, warmup_steps=10)
    config.checkpoint.update(every=30, keep=2)
  else:
    config.data.update(seq_len=256, batch_size=32)
    config.train.update(steps=a.steps or 5000, log_every=50, eval_every=500, eval_batches=8)
    config.optim.update(lr=a.lr or 1e-3, warmup_steps=200)
    config.checkpoint.update(every=1000, keep=3)
  return config


def sweep(add, arg=None):
  """Learning rate x model size (hidden 32/64 in the ``tiny`` variant)."""
  a = _arg(arg)
  if a.tiny:
    sizes = [dict(hidden_size=h, intermediate_size=2 * h) for h in (32, 64)]
  else:
    sizes = [SIZES["small"], SIZES["medium"]]
  for size in sizes:
    for lr in (1e-3, 3e-3):
      add({"optim.lr": lr, **{f"model.{k}": v for k, v in size.items()}})


def metrics():
  return ["loss", "eval_loss", "eval_ppl", "grad_norm", "tokens_per_s"]
