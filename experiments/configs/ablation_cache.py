"""Ablation: sink and window sizes (``model.memory.n_sink`` / ``n_window``).

  python -m edgeinfinite_jax.cli.sweep --config=experiments/configs/ablation_cache.py:tiny \\
      --workdir=sweeps/cache

One factor at a time around the baseline: the window (raw KV kept besides the
current segment; a multiple of the segment length) with the default sink, then the
sink (leading tokens always kept) with the default window. Baseline, arguments and
metrics: see ``ablation_base.py``.
"""

import os

from edgeinfinite_jax import configs

base = configs.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "ablation_base.py"))


def get_config(arg=None):
  return base.get_config(arg)


def sweep(add, arg=None):
  add = base.checked(add, arg)
  config = base.get_config(arg)
  memory = config.demo.memory if base.parse(arg).job == "demo" else config.model.memory
  seg, sink, window = memory.segment_len, memory.n_sink, memory.n_window
  sink_key, window_key = base.memory_key(arg, "n_sink"), base.memory_key(arg, "n_window")
  for w in (seg, 2 * seg, 4 * seg):
    add({sink_key: sink, window_key: w})
  for s in sorted({0, 1, min(4 * sink, seg)} - {sink}):
    add({sink_key: s, window_key: window})


def metrics(arg=None):
  return base.metrics(arg)
