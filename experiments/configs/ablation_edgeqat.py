"""Ablation: each EdgeQAT loss term, left out one at a time (job ``quant``).

  python -m edgeinfinite_jax.cli.sweep --config=experiments/configs/ablation_edgeqat.py:tiny \\
      --workdir=sweeps/edgeqat

The full recipe (``qat`` method ``edgeqat_all`` at ``preset``, default W4A8): LSQ+
scales, loss = 0.5 CE + 0.5 KD (T=2) + 0.5 L_E (entropy of the quantized Q/K) +
1.0 L_D (attention-distribution cosine against the float teacher) and
token-adaptive bits for half the tokens. The points: everything; each of L_E, L_D,
KD and the adaptive bits switched off (weight / fraction 0); all four off (plain
QAT, CE only); and L_D with the released code's sign (``published_sign``, which
pushes the attention maps apart). Model and the shared float base run as in
``quant_tiny.py`` (keep ``--parallel 1`` until the base run exists).

Arguments (after ``:``): ``tiny``; ``preset=NAME`` (w8a8 | w4a8 | w4a4); ``base=DIR``
(default ``workdirs/quant_tiny/base``).
"""

import os

from edgeinfinite_jax import configs

quant_tiny = configs.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "quant_tiny.py"))
# quant.edgeqat.<key>: the value that switches the term off
TERMS = {"entropy_weight": 0.0, "distribution_weight": 0.0, "kd_weight": 0.0,
         "adaptive_fraction": 0.0}


def _arg(arg):
  return configs.parse_arg(arg, tiny=False, preset="w4a8", base="workdirs/quant_tiny/base")


def get_config(arg=None):
  a = _arg(arg)
  config = quant_tiny.get_config(f"tiny={a.tiny},method=edgeqat_all,preset={a.preset},"
                                 f"base={a.base}")
  # Every swept term is a key of quant.edgeqat (overrides of the recipe's values),
  # so that --config.quant.edgeqat.KEY=VALUE can set it.
  from edgeinfinite_jax.train import qat
  options = qat.recipe("edgeqat_all", a.preset).edgeqat
  config.quant.edgeqat = {k: getattr(options, k) for k in (*TERMS, "published_sign")}
  return config


def sweep(add, arg=None):
  del arg
  key = lambda k: f"quant.edgeqat.{k}"
  add({})  # the full recipe
  for term, off in TERMS.items():
    add({key(term): off})
  add({key(t): off for t, off in TERMS.items()})  # plain QAT: CE only
  add({key("published_sign"): True})


def metrics():
  return ["fp_eval_ppl", "eval_ppl", "int_eval_ppl", "int_greedy_agree_pct"]
