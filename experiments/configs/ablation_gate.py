"""Ablation: the form of the memory gate (``model.memory.gate``, see ``gate.py``).

  python -m edgeinfinite_jax.cli.sweep --config=experiments/configs/ablation_gate.py:tiny \\
      --workdir=sweeps/gate

per_head_scalar (Infini-attention's one logit per head), per_head_vector (one per
head and value channel) and mlp (conditioned on both branches' outputs). Baseline,
arguments (``tiny``, ``job=demo|train``, ``steps=``, ``hf=``) and metrics: see
``ablation_base.py``.
"""

import os

from edgeinfinite_jax import configs

base = configs.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "ablation_base.py"))
GATES = ("per_head_scalar", "per_head_vector", "mlp")


def get_config(arg=None):
  return base.get_config(arg)


def sweep(add, arg=None):
  add = base.checked(add, arg)
  for gate in GATES:
    add({base.memory_key(arg, "gate"): gate})


def metrics(arg=None):
  return base.metrics(arg)
