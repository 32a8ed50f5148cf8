"""Ablation: the memory update rule (``model.memory.update_rule``).

  python -m edgeinfinite_jax.cli.sweep --config=experiments/configs/ablation_update_rule.py:tiny \\
      --workdir=sweeps/update_rule

linear (Infini-attention Eq. 8: M += sigma(K)^T V) against delta (Eq. 9: only what
the memory does not already retrieve is written). Baseline, arguments and metrics:
see ``ablation_base.py``.
"""

import os

from edgeinfinite_jax import configs

base = configs.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "ablation_base.py"))


def get_config(arg=None):
  return base.get_config(arg)


def sweep(add, arg=None):
  add = base.checked(add, arg)
  for rule in ("linear", "delta"):
    add({base.memory_key(arg, "update_rule"): rule})


def metrics(arg=None):
  return base.metrics(arg)
