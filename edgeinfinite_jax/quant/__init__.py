"""Quantization: specs and fake quantization, PTQ, EdgeQAT, and NPU-exact integer arithmetic.

* ``quantizers``: QuantSpec, scales, fake quantization with a straight-through estimator.
* ``lsq``: learned step sizes / zero points (LSQ, LSQ+).  ``observers``: calibration.
* ``qconfig``: QuantConfig (placements, modes, presets, EdgeQAT options).
* ``intsim``: integer kernels bit-exact against onnxruntime and LiteRT.
* ``apply``: the config applied inside the model's layers (fake_quant and integer
  modes, capture hooks); ``modules``: the scale parameters the layers declare.
* ``calib``: model-level calibration; ``ptq``: quantized parameter sets, save /
  restore; ``losses``: EdgeQAT losses and adaptive bits.
QAT training and the ``quant`` job are in ``edgeinfinite_jax/qat.py``.
"""
