"""Quantization: specs and fake quantization, PTQ, EdgeQAT, and NPU-exact integer arithmetic.

* ``quantizers``: QuantSpec, scales, fake quantization with a straight-through estimator.
* ``lsq``: learned step sizes / zero points (LSQ, LSQ+).  ``observers``: calibration.
* ``qconfig``: QuantConfig (placements, modes, presets, EdgeQAT options).
* ``intsim``: integer kernels bit-exact against onnxruntime and LiteRT, and the one
  definition of the shared arithmetic (``to_codes``, ``to_real``, ``round_int``,
  ``REQUANT_MODES``, the accumulator limits) that the other modules import.
* ``layer_quant``: the config applied inside the model's layers (fake_quant and
  integer modes, capture hooks); ``params``: the scale parameters the layers declare.
* ``ptq``: quantized parameter sets, save / restore, observer states per activation
  (model-level calibration is ``train/calib.py``); ``losses``: EdgeQAT losses and adaptive bits.
This package imports nothing else of edgeinfinite_jax (the lowest layer). QAT
training is ``train/qat.py``, the ``quant`` job ``jobs/quant.py``.
"""
