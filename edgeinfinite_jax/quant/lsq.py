"""LSQ / LSQ+ learned step sizes (and zero points) for quantization-aware training.

EdgeQAT's quantizers (edgeqat.md §3): weights with a learned per-tensor (or
per-channel) step size and no zero point; activations with a learned step size
and a learned float zero point (LSQ+), rounded on use. The step-size gradient is
scaled by g = 1/sqrt(n·Qp) (LSQ). Same integer grid and rounding as
``quantizers.fake_quant``, so a learned (scale, round(zero point)) pair gives
the same forward values there and in the integer path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from edgeinfinite_jax.quant.intsim import exact_div, round_int, to_real
from edgeinfinite_jax.quant.quantizers import _TINY, _fail, _jit, _reduce, check_scale, compute_qparams, expand_qparams


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
  s = expand_qparams(scale, x.shape, spec, "scale")
  z = jnp.zeros((), jnp.float32)
  if zero_point is not None:
    z = expand_qparams(jnp.asarray(zero_point, jnp.float32), x.shape, spec, "zero_point")
  return _lsq_quant(x, s, z, spec, g)


# A hand-written VJP: autodiff of the straight-through expression (stop-gradient
# pairs for the rounding and LSQ's gradient scale) compiles to about ten passes over
# a weight matrix on XLA:CPU; this is one fused pass forward and one backward. XLA
# fuses a division only into a consumer that reads it once, hence min/max rather
# than where() in the forward's clamp (no autodiff goes through it here), and a
# reciprocal in the backward: exact rounding matters for the forward values only.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lsq_quant(x, s, z, spec, g):
  zr = round_int(z, spec.rounding)
  v = exact_div(x.astype(jnp.float32), s) + zr
  q = round_int(jnp.minimum(jnp.maximum(v, float(spec.qmin)), float(spec.qmax)), spec.rounding)
  return to_real(q, s, zr, x.dtype)


def _lsq_fwd(x, s, z, spec, g):
  return _lsq_quant(x, s, z, spec, g), (x, s, z)


def _lsq_bwd(spec, g, res, dy):
  x, s, z = res
  zr = round_int(z, spec.rounding)
  u = x.astype(jnp.float32) * (1.0 / s)
  v = u + zr
  dy = dy.astype(jnp.float32)
  low, high = v < spec.qmin, v > spec.qmax  # the bounds count as inside
  inside = ~(low | high)
  dx = jnp.where(inside, dy, 0.0).astype(x.dtype)
  ds = jnp.where(inside, round_int(v, spec.rounding) - v,
                 jnp.where(low, spec.qmin - zr, spec.qmax - zr)) * dy
  dz = jnp.where(inside, 0.0, -s * dy)
  return dx, g * _sum_to(ds, jnp.shape(s)), g * _sum_to(dz, jnp.shape(z))


_lsq_quant.defvjp(_lsq_fwd, _lsq_bwd)


def _sum_to(t, shape):
  """Sum ``t`` down to ``shape``, a shape that broadcasts against it."""
  lead = t.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape)
                                    if n == 1 and t.shape[lead + i] != 1)
  return jnp.sum(t, axis=axes).reshape(shape)


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
