"""Quantizer math: specs, scales, fake quantization with a straight-through estimator.

Pure functions over arrays; nothing here holds state. Conventions (shared with
``intsim.py`` so fake-quant and integer paths agree bit for bit: the rounding
(``round_int``, ``ROUNDINGS``) and the quantize / dequantize arithmetic
(``to_codes`` / ``to_real``) are intsim's, imported):

* ``real = (q - zero_point) * scale``; ``q`` integer, ``scale`` float32 > 0,
  ``zero_point`` an integer (int32) inside the integer range.
* Integer range: signed ``[-2^(b-1), 2^(b-1)-1]``, unsigned ``[0, 2^b-1]``;
  ``narrow_range`` (signed only) drops the lowest code: the NPU / TFLite weight
  range ``[-(2^(b-1)-1), 2^(b-1)-1]`` (int8: [-127, 127]). It defaults to
  ``symmetric and signed`` (weights narrow, asymmetric activations full).
* Symmetric: ``zero_point = 0``, ``scale = absmax / qmax`` (``max(x, 0) / qmax``
  when unsigned). Asymmetric: the range is widened to contain 0 (so 0.0 is exact:
  padding, ReLU zeros), ``scale = (hi - lo) / (qmax - qmin)``,
  ``zero_point = clip(round(qmin - lo / scale))``.
* ``q = clip(round(x / scale) + zero_point, qmin, qmax)`` with the rounding named
  in the spec (``half_to_even`` = ONNX / ``jnp.round``; ``half_away_from_zero`` =
  TFLite ``std::round``). The division is correctly rounded (``intsim.exact_div``:
  XLA would otherwise compile ``x / broadcast(s)`` as ``x * (1/s)``, which flips ties).
* Scale shapes (what ``compute_qparams`` returns, broadcastable against x except
  per_group): ``per_tensor`` -> ``()``; ``per_channel`` (``axis`` = kept channel
  axis/axes, default -1, the output axis of an ``[in, out]`` kernel) -> keepdims;
  ``per_token`` (``axis`` = reduced feature axis/axes, default -1) -> keepdims;
  ``per_group`` (``axis`` split into groups of ``group_size``, default 0, the
  input axis of an ``[in, out]`` kernel; one scale per group and per index of
  every other axis) -> x's shape with ``shape[axis] // group_size`` at ``axis``;
  ``expand_qparams`` repeats it to broadcast against x.
* Learned scales (LSQ / LSQ+) are in ``lsq.py``; calibration observers
  (min/max, EMA, percentile, MSE search) in ``observers.py``.
* Values passed by the caller (scale, zero point) are checked on the host when
  concrete; traced values (inside the caller's jit) skip the value checks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from edgeinfinite_jax.quant.intsim import ROUNDINGS, exact_div, round_int, to_codes, to_real

GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")
STE_MODES = ("plain", "clipped")
_TINY = float(np.finfo(np.float32).tiny)  # smaller scales could be flushed to 0 (FTZ)


def _fail(key, value, rule):
  raise ValueError(f"{key}={value!r}: {rule}")


def _is_int(v):
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one tensor is quantized. Frozen and hashable: usable as a static jit arg."""
  bits: int = 8
  symmetric: bool = True
  granularity: str = "per_tensor"
  axis: Any = None  # int or tuple of ints; None = the granularity's default (see module doc)
  group_size: int | None = None
  rounding: str = "half_to_even"
  narrow_range: bool | None = None  # None: = symmetric and signed
  signed: bool = True

  def __post_init__(self):
    if not (_is_int(self.bits) and 2 <= self.bits <= 16):
      _fail("bits", self.bits, "must be an integer in 2..16")
    if self.granularity not in GRANULARITIES:
      _fail("granularity", self.granularity, f"must be one of {GRANULARITIES}")
    if self.rounding not in ROUNDINGS:
      _fail("rounding", self.rounding, f"must be one of {ROUNDINGS}")
    for key in ("symmetric", "signed"):
      if not isinstance(getattr(self, key), bool):
        _fail(key, getattr(self, key), "must be a bool")
    if self.narrow_range is None:
      object.__setattr__(self, "narrow_range", self.symmetric and self.signed)
    elif not isinstance(self.narrow_range, bool):
      _fail("narrow_range", self.narrow_range, "must be a bool or None")
    elif self.narrow_range and not self.signed:
      # Dropping code 0 of an unsigned range would make 0.0 unrepresentable.
      _fail("narrow_range", self.narrow_range, "applies to signed ranges only (signed=False)")
    axis = self.axis
    if axis is None:
      axis = {"per_tensor": None, "per_group": 0}.get(self.granularity, -1)
    elif isinstance(axis, (list, tuple)):
      axis = tuple(axis)
      if not axis or not all(_is_int(a) for a in axis) or len(set(axis)) != len(axis):
        _fail("axis", self.axis, "must be an int or a non-empty tuple of distinct ints")
    elif not _is_int(axis):
      _fail("axis", self.axis, "must be an int, a tuple of ints or None")
    if self.granularity == "per_tensor" and axis is not None:
      _fail("axis", self.axis, "must be None for granularity='per_tensor'")
    if self.granularity == "per_group":
      if isinstance(axis, tuple):
        _fail("axis", self.axis, "per_group splits a single axis; give an int")
      if not (_is_int(self.group_size) and self.group_size > 0):
        _fail("group_size", self.group_size, "per_group needs a positive integer group_size")
    elif self.group_size is not None:
      _fail("group_size", self.group_size, "is only used with granularity='per_group'")
    object.__setattr__(self, "axis", int(axis) if _is_int(axis) else axis)

  @property
  def qmin(self) -> int:
    lo = -(2 ** (self.bits - 1)) if self.signed else 0
    return lo + 1 if self.narrow_range else lo

  @property
  def qmax(self) -> int:
    return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

  @property
  def int_dtype(self):
    """Storage dtype: int4 values live in int8, 9..16-bit values in int16."""
    if self.bits <= 8:
      return jnp.int8 if self.signed else jnp.uint8
    return jnp.int16 if self.signed else jnp.uint16

  def replace(self, **changes) -> "QuantSpec":
    if ("symmetric" in changes or "signed" in changes) and "narrow_range" not in changes:
      changes["narrow_range"] = None  # re-derive the default from the new symmetry
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["axis"] = list(d["axis"]) if isinstance(d["axis"], tuple) else d["axis"]
    return d


# ----------------------------------------------------------------------------- helpers
def _norm_axes(axis, ndim, spec):
  axes = axis if isinstance(axis, tuple) else (axis,)
  for a in axes:
    if not -ndim <= a < ndim:
      _fail("axis", spec.axis, f"is out of range for a {ndim}-d tensor ({spec.granularity})")
  return tuple(sorted(a % ndim for a in axes))


def _group_view(shape, spec):
  """(grouped shape, group axis a): axis a of size D -> (D // g, g) at a, a + 1."""
  a = _norm_axes(spec.axis, len(shape), spec)[0]
  d, g = shape[a], spec.group_size
  if d % g:
    _fail("group_size", g, f"does not divide dimension {d} (axis {a} of shape {tuple(shape)})")
  return tuple(shape[:a]) + (d // g, g) + tuple(shape[a + 1:]), a


def _reduce(x, spec, fn):
  """fn(x, axis=..., keepdims=True) over the axes that share one scale, in qparam shape."""
  if spec.granularity == "per_tensor":
    return fn(x, axis=None, keepdims=False)
  if spec.granularity == "per_group":
    gshape, a = _group_view(x.shape, spec)
    return jnp.squeeze(fn(x.reshape(gshape), axis=a + 1, keepdims=True), a + 1)
  axes = _norm_axes(spec.axis, x.ndim, spec)
  if spec.granularity == "per_channel":
    axes = tuple(i for i in range(x.ndim) if i not in axes)
  return fn(x, axis=axes, keepdims=True)


def expand_qparams(p, shape, spec, name="qparams"):
  """Scale / zero point in a shape that broadcasts against a tensor of ``shape``."""
  p = jnp.asarray(p)
  if spec.granularity == "per_group" and p.ndim == len(shape):
    _, a = _group_view(shape, spec)
    p = jnp.repeat(p, spec.group_size, axis=a)
  try:
    ok = np.broadcast_shapes(p.shape, tuple(shape)) == tuple(shape)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"{name} shape {tuple(p.shape)} does not fit a tensor of shape "
                     f"{tuple(shape)} with granularity={spec.granularity!r}, axis={spec.axis}")
  return p


def _host(v):
  if v is None or isinstance(v, jax.core.Tracer):
    return None
  return np.asarray(v)


def check_scale(scale, name="scale"):
  """Host-side: scale finite and > 0 in float32 (skipped when traced)."""
  s = _host(scale)
  if s is None:
    return
  with np.errstate(over="ignore", under="ignore", invalid="ignore"):
    f = s.astype(np.float32)
  bad = ~np.isfinite(f) | ~(f > 0)
  if bad.any():
    raise ValueError(f"{name}={s[bad].ravel()[:4].tolist()}: must be finite and > 0 (float32)")


def check_zero_point(zp, spec, name="zero_point"):
  """Host-side: integer-valued, inside [qmin, qmax], 0 when symmetric."""
  z = _host(zp)
  if z is None:
    return
  if z.dtype.kind == "f" and not np.all(np.floor(z) == z):
    raise ValueError(f"{name}={z.ravel()[:4].tolist()}: must be integer-valued")
  bad = (z < spec.qmin) | (z > spec.qmax)
  if bad.any():
    raise ValueError(f"{name}={z[bad].ravel()[:4].tolist()}: outside the {spec.bits}-bit "
                     f"integer range [{spec.qmin}, {spec.qmax}]")
  if spec.symmetric and np.any(z != 0):
    raise ValueError(f"{name}={z[z != 0].ravel()[:4].tolist()}: must be 0 for a symmetric spec")


# ----------------------------------------------------------------------------- qparams
# Each entry point compiles once per (spec, shapes): much cheaper than eager op-by-op
# dispatch, and inlined when called under the caller's jit. Host checks stay outside.
_jit = functools.partial(jax.jit, static_argnames=("spec",))


@_jit
def qparams_from_range(lo, hi, spec):
  """(scale float32, zero_point int32) covering [lo, hi]; non-positive or non-finite
  scales (all-zero tensors, empty observers) fall back to 1.0."""
  lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
  if spec.symmetric:
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) if spec.signed else jnp.maximum(hi, 0.0)
    scale = exact_div(amax, jnp.float32(spec.qmax))
  else:
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    scale = exact_div(hi - lo, jnp.float32(spec.qmax - spec.qmin))
  scale = jnp.where(jnp.isfinite(scale) & (scale >= _TINY), scale, 1.0).astype(jnp.float32)
  if spec.symmetric:
    return scale, jnp.zeros(scale.shape, jnp.int32)
  zp = round_int(spec.qmin - exact_div(lo, scale), spec.rounding)
  zp = jnp.clip(jnp.nan_to_num(zp), spec.qmin, spec.qmax)
  return scale, zp.astype(jnp.int32)


@_jit
def compute_qparams(x, spec):
  """Dynamic (scale, zero_point) from the min/max of x at the spec's granularity."""
  x = jnp.asarray(x, jnp.float32)
  return qparams_from_range(_reduce(x, spec, jnp.min), _reduce(x, spec, jnp.max), spec)


def quantize_int(x, scale, zero_point, spec):
  """q = clip(round(x / scale) + zero_point, qmin, qmax) in ``spec.int_dtype``."""
  check_scale(scale)
  check_zero_point(zero_point, spec)
  return _quantize_int(x, scale, zero_point, spec)


@_jit
def _quantize_int(x, scale, zero_point, spec):
  return _quantize(x, expand_qparams(scale, x.shape, spec, "scale").astype(jnp.float32),
                   expand_qparams(zero_point, x.shape, spec, "zero_point").astype(jnp.float32),
                   spec)


def _quantize(x, scale, zp, spec):
  return to_codes(x, scale, zp, spec.qmin, spec.qmax, spec.int_dtype, spec.rounding)


def dequantize(q, scale, zero_point, spec):
  """float32 (q - zero_point) * scale (``intsim.to_real``, ONNX DequantizeLinear order),
  with ``spec``'s checks and qparam shapes (per_group scales expanded)."""
  check_scale(scale)
  check_zero_point(zero_point, spec)
  return _dequantize(q, scale, zero_point, spec)


@_jit
def _dequantize(q, scale, zero_point, spec):
  s = expand_qparams(scale, q.shape, spec, "scale").astype(jnp.float32)
  z = expand_qparams(zero_point, q.shape, spec, "zero_point").astype(jnp.int32)
  return to_real(q.astype(jnp.int32), s, z)


# ----------------------------------------------------------------------------- fake quant
def fake_quant(x, spec, scale=None, zero_point=None, ste="plain"):
  """dequantize(quantize(x)) in x's dtype, with a straight-through gradient.

  Without ``scale`` the qparams are computed from x (dynamic; no gradient flows
  through them). ``ste="plain"``: dx = dy; ``"clipped"``: dx = dy only where x is
  inside the representable range [(qmin - zp)·s, (qmax - zp)·s], else 0. Scale and
  zero point get zero gradient here (use ``lsq.lsq_fake_quant`` to learn them).
  """
  if ste not in STE_MODES:
    _fail("ste", ste, f"must be one of {STE_MODES}")
  if scale is None and zero_point is not None:
    _fail("zero_point", "<given>", "needs an explicit scale (or pass neither)")
  if scale is not None:
    check_scale(scale)
    zero_point = np.zeros((), np.int32) if zero_point is None else zero_point
    check_zero_point(zero_point, spec)
  return _fake_quant(x, scale, zero_point, spec, ste)


@functools.partial(jax.jit, static_argnames=("spec", "ste"))
def _fake_quant(x, scale, zero_point, spec, ste):
  if scale is None:
    scale, zero_point = compute_qparams(lax.stop_gradient(x), spec)
  s = expand_qparams(scale, x.shape, spec, "scale").astype(jnp.float32)
  z = expand_qparams(zero_point, x.shape, spec, "zero_point").astype(jnp.float32)
  return _fake_quant_ste(x, s, z, spec, ste)


def _fq_forward(x, s, z, spec):
  return to_real(_quantize(x, s, z, spec).astype(jnp.float32), s, z, x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fake_quant_ste(x, s, z, spec, ste):
  return _fq_forward(x, s, z, spec)


def _fq_fwd(x, s, z, spec, ste):
  return _fq_forward(x, s, z, spec), (x, s, z)


def _fq_bwd(spec, ste, res, g):
  x, s, z = res
  dx = g
  if ste == "clipped":
    xf = x.astype(jnp.float32)
    inside = (xf >= (spec.qmin - z) * s) & (xf <= (spec.qmax - z) * s)
    dx = jnp.where(inside, g, jnp.zeros_like(g))
  return dx, jnp.zeros_like(s), jnp.zeros_like(z)


_fake_quant_ste.defvjp(_fq_fwd, _fq_bwd)
