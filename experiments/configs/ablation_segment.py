"""Ablation: the segment length L (``model.memory.segment_len``), window fixed.

  python -m edgeinfinite_jax.cli.sweep --config=experiments/configs/ablation_segment.py:tiny \\
      --workdir=sweeps/segment

Shorter segments write the memory more often and keep less raw context per step;
the window (a multiple of every L tried) and the sink stay fixed. Baseline,
arguments and metrics: see ``ablation_base.py``.
"""

import os

from edgeinfinite_jax import configs

base = configs.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "ablation_base.py"))


def get_config(arg=None):
  return base.get_config(arg)


def sweep(add, arg=None):
  add = base.checked(add, arg)
  a = base.parse(arg)
  if a.tiny:
    segments, window = (16, 32, 64), 64
  elif a.job == "demo":
    segments, window = (32, 64, 128), 128
  else:
    segments, window = (64, 128, 256), 256
  for seg in segments:
    add({base.memory_key(arg, "segment_len"): seg, base.memory_key(arg, "n_window"): window})


def metrics(arg=None):
  return base.metrics(arg)
