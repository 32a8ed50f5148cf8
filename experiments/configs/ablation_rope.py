"""Ablation: pre- or post-RoPE memory (``model.memory.mem_uses_rope``).

  python -m edgeinfinite_jax.cli.sweep --config=experiments/configs/ablation_rope.py:tiny \\
      --workdir=sweeps/rope

False (the default): the memory stores and is queried with Q/K before the rotary
embedding (position-free, as EdgeInfinite argues); True: with the RoPE'd Q/K the
local attention uses. Baseline, arguments and metrics: see ``ablation_base.py``.
"""

import os

from edgeinfinite_jax import configs

base = configs.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "ablation_base.py"))


def get_config(arg=None):
  return base.get_config(arg)


def sweep(add, arg=None):
  add = base.checked(add, arg)
  for post_rope in (False, True):
    add({base.memory_key(arg, "mem_uses_rope"): post_rope})


def metrics(arg=None):
  return base.metrics(arg)
