"""Ablation: the quantization presets (``quant.preset``), one quantization method.

  python -m edgeinfinite_jax.cli.sweep --config=experiments/configs/ablation_quant.py:tiny \\
      --workdir=sweeps/quant

Job ``quant`` (``jobs/quant.py``) on the model and base run of ``quant_tiny.py``: the
float base model is trained once in ``quant_job.base_workdir`` and reused by every
point (run the first point alone, or keep ``--parallel 1``, so that two points do
not train it at the same time). Each point quantizes it with ``method`` at one of
the presets W8A8, W4A8, W4A16 (weight-only), A16W8 and W4A4 and reports held-out
perplexity against float, and, where the recipe can run in integer mode, the
integer-vs-fake-quant agreement.

Arguments (after ``:``): ``tiny``; ``method=NAME`` (``qat.QUANT_METHODS``, default
``ptq_fine``: per-group weights, dynamic per-token activations; ``ptq_rtn`` is the
round-to-nearest baseline; the QAT methods train); ``base=DIR`` (the shared base
run, default ``workdirs/quant_tiny/base``, the one ``quant_tiny.py`` uses).
"""

import os

from edgeinfinite_jax import configs

quant_tiny = configs.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "quant_tiny.py"))
PRESETS = ("w8a8", "w4a8", "w4a16", "a16w8", "w4a4")


def _arg(arg):
  return configs.parse_arg(arg, tiny=False, method="ptq_fine",
                              base="workdirs/quant_tiny/base")


def get_config(arg=None):
  a = _arg(arg)
  config = quant_tiny.get_config(f"tiny={a.tiny},method={a.method},preset=w8a8,base={a.base}")
  return config


def sweep(add, arg=None):
  del arg
  for preset in PRESETS:
    add({"quant.preset": preset})


def metrics():
  return ["fp_eval_ppl", "eval_ppl", "int_eval_ppl", "int_greedy_agree_pct"]
