"""The quantization parameters the model declares, and token-adaptive bit selection.

``model.Projection`` / ``Attention`` / ``Mlp`` take every quantizer from a
``quant.apply.LayerQuant``; this module declares what they need as parameters:
static activation scales per site (``{module}/quant/{site}/{scale,zero_point}``,
placeholders until ``calib.calibrate`` writes data-dependent values) and LSQ
weight step sizes (``{name}_proj/quant/scale``). The regex ``.*/quant/.*``
selects all of them.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp



def _const(value):
  return nn.with_logical_partitioning(
      lambda key, shape, dtype=jnp.float32: jnp.full(shape, value, dtype), ())


class _Site(nn.Module):
  """One site's static scale (and zero point when asymmetric)."""
  symmetric: bool

  @nn.compact
  def __call__(self):
    p = {"scale": self.param("scale", _const(1.0), (), jnp.float32)}
    if not self.symmetric:
      p["zero_point"] = self.param("zero_point", _const(0.0), (), jnp.float32)
    return p


class QuantParams(nn.Module):
  """Static scales of a module's sites, as ``{site: {"scale", "zero_point"?}}``."""
  sites: tuple  # ((name, QuantSpec), ...)

  @nn.compact
  def __call__(self):
    return {name: _Site(spec.symmetric, name=name)() for name, spec in self.sites}


class _WeightScale(nn.Module):
  """LSQ step size of one kernel: () per tensor or [N] per output channel."""
  shape: tuple

  @nn.compact
  def __call__(self):
    return self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                            (None,) * len(self.shape)),
                      self.shape, jnp.float32)


def kernel(module, name, init, shape):
  """The kernel from the params (a float array or a ``QuantizedTensor``, whose 2-D
  layout would fail flax's shape check in ``self.param``), or a fresh one at init."""
  if module.has_variable("params", name):
    return module.get_variable("params", name)
  return module.param(name, init, shape, jnp.float32)


def learned_weight_scale(module, quant, placement, n_out):
  """The LSQ step size of ``module``'s kernel (declared under ``quant``), or None."""
  if quant is None or quant.weight_scales != "learned" or placement != "linear_weights":
    return None
  spec = quant.linear_weights
  return _WeightScale((n_out,) if spec.granularity == "per_channel" else (),
                      name="quant")()


