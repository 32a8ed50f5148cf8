"""LSQ / LSQ+ learned step sizes (and zero points) for quantization-aware training.

EdgeQAT's quantizers (edgeqat.md §3): weights with a learned per-tensor (or
per-channel) step size and no zero point; activations with a learned step size
and a learned float zero point (LSQ+), rounded on use. The step-size gradient is
scaled by g = 1/sqrt(n·Qp) (LSQ). Same integer grid and rounding as
``quantizers.fake_quant``, so a learned (scale, round(zero point)) pair gives
the same forward values there and in the integer path.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from edgeinfinite_jax.quant.quantizers import (_TINY, _clamp, _div, _fail, _jit, _reduce,
                                               check_scale, compute_qparams, expand_qparams,
                                               round_int)


def _round_pass(v, rounding):
  # Forward value exactly round(v); gradient identity (the stop-gradient pair cancels).
  return lax.stop_gradient(round_int(v, rounding)) + (v - lax.stop_gradient(v))


def _grad_scale(a, g):
  # Forward value exactly a; gradient multiplied by g.
  return lax.stop_gradient(a) + (a * g - lax.stop_gradient(a * g))


def lsq_grad_factor(x_shape, scale_shape, spec):
  """LSQ step-size gradient scale g = 1/sqrt(n · Qp), n = elements per scale
  (numel(x) per tensor, including the batch, as in the EdgeQAT code)."""
  n = int(np.prod(x_shape)) // max(int(np.prod(scale_shape)), 1)
  return 1.0 / float(np.sqrt(n * spec.qmax))


def lsq_fake_quant(x, scale, zero_point, spec):
  """LSQ (``zero_point=None``) / LSQ+ (learnable float zero point) fake quantization.

  x̂ = (round_pass(clamp(x/s' + z', qmin, qmax)) - z')·s', s' = grad_scale(s, g),
  z' = grad_scale(round_pass(z), g). Gradients (per element, before g and the sum
  over elements sharing a scale): dx̂/dx = 1 inside [qmin, qmax] else 0;
  dx̂/ds = round(v) - v inside, qmin - z or qmax - z outside; dx̂/dz = 0 inside,
  -s outside. The learned zero point is not range-checked (it drifts freely).
  """
  check_scale(scale)
  return _lsq(x, scale, zero_point, spec)


@_jit
def _lsq(x, scale, zero_point, spec):
  scale = jnp.asarray(scale, jnp.float32)
  g = lsq_grad_factor(x.shape, scale.shape, spec)
  s = expand_qparams(_grad_scale(scale, g), x.shape, spec, "scale")
  z = 0.0
  if zero_point is not None:
    zp = jnp.asarray(zero_point, jnp.float32)
    z = expand_qparams(_grad_scale(_round_pass(zp, spec.rounding), g), x.shape, spec,
                       "zero_point")
  v = _div(x.astype(jnp.float32), s) + z
  q = _round_pass(_clamp(v, float(spec.qmin), float(spec.qmax)), spec.rounding)
  return ((q - z) * s).astype(x.dtype)


@_jit
def lsq_init_scale(x, spec):
  """LSQ init 2·mean|x|/sqrt(Qp), at the spec's granularity (1.0 if x is all zero)."""
  m = _reduce(jnp.abs(jnp.asarray(x, jnp.float32)), spec, jnp.mean)
  s = 2.0 * m / np.float32(np.sqrt(spec.qmax))
  return jnp.where(jnp.isfinite(s) & (s >= _TINY), s, 1.0).astype(jnp.float32)


def lsq_plus_init(x, spec, method="edgeqat"):
  """(scale, float zero point) for LSQ+ activations.

  ``edgeqat``: the released code's first-batch init, s = 2·mean|x|/sqrt(Qp) and
  z = 0.1·(min(x) - s·qmin) (mixes real and integer units; a heuristic, then
  learned). ``minmax``: the unit-consistent asymmetric min/max qparams (z float).
  """
  x = jnp.asarray(x, jnp.float32)
  if method == "edgeqat":
    s = lsq_init_scale(x, spec)
    return s, 0.1 * (_reduce(x, spec, jnp.min) - s * spec.qmin)
  if method == "minmax":
    s, z = compute_qparams(x, spec)
    return s, z.astype(jnp.float32)
  _fail("method", method, "must be 'edgeqat' or 'minmax'")


def infer_signed(x, threshold=1e-5) -> bool:
  """EdgeQAT's signedness rule (fixed on the first batch): signed if min(x) < -threshold."""
  return bool(np.min(np.asarray(x)) < -threshold)
