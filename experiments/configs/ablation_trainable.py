"""Ablation: the trainable set of the memory fine-tune (gate / gate+lora / gate+attention / all).

  python -m edgeinfinite_jax.cli.sweep --config=experiments/configs/ablation_trainable.py:tiny \\
      --workdir=sweeps/trainable

``job=demo`` (default): the S-SFT stage's trainable set (``demo.sft_runs``): the
gate alone (EdgeInfinite's recipe: a few hundred parameters), the gate plus low-rank
adapters on q/k/v (``model/lora.py``), the gate plus the attention projections, or
everything; the gate keeps its own learning rate.
``job=train``: ``optim.trainable`` of the trainer. Gate-only training only makes
sense on a pretrained backbone, so give one with ``hf=DIR`` (e.g. the
``pretrain/hf`` directory of a demo run); without it the model starts random.
Baseline, arguments and metrics: see ``ablation_base.py``.
"""

import os

from edgeinfinite_jax import configs

base = configs.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "ablation_base.py"))
SETS = ("gate", "gate+lora", "gate+attention", "all")


def get_config(arg=None):
  return base.get_config(arg)


def sweep(add, arg=None):
  add = base.checked(add, arg)
  for trainable in SETS:
    point = {base.trainable_key(arg): trainable}
    if trainable == "gate+lora" and base.parse(arg).job == "train":
      point["model.lora_rank"] = 8  # job=demo sets it from demo.lora_rank
    add(point)


def metrics(arg=None):
  return base.metrics(arg)
