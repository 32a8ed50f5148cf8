"""Calibration observers: statistics of activations (or weights) -> (scale, zero point).

``init(spec, shape=None) -> state``; ``update(state, x) -> state``;
``qparams(state, spec=None) -> (scale, zero_point)``. States are pytrees (a
``flax.struct`` dataclass holding arrays plus the static spec), so calibration
loops can run under ``jit`` / ``lax.scan``. Observers themselves are frozen,
hashable dataclasses (their settings are static).

* ``MinMaxObserver``: running min and max.
* ``MovingAverageMinMaxObserver``: EMA of per-batch min / max.
* ``PercentileObserver``: mean of per-batch percentiles (clips outliers).
* ``MseObserver``: search over clipping ratios of the min/max range for the
  least quantization MSE (per channel / group when the spec has several scales).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from edgeinfinite_jax.quant.quantizers import QuantSpec, _fail, _fq_forward, _host, _reduce, expand_qparams, qparams_from_range


@flax.struct.dataclass
class ObserverState:
  """Observer statistics (arrays; None until the first update when the shape was not
  given) and the spec they are collected for (static)."""
  stats: Any
  spec: QuantSpec = flax.struct.field(pytree_node=False)


def _stat_shape(spec, shape):
  return jax.eval_shape(lambda x: _reduce(x, spec, jnp.min),
                        jax.ShapeDtypeStruct(tuple(shape), jnp.float32)).shape


class _Observer:
  """init(spec, shape=None) -> state; update(state, x) -> state; qparams(state, spec=None).

  Pass ``shape`` (the activation's shape) to fix the state's structure up front
  (needed inside ``lax.scan``); otherwise it is allocated on the first update.
  """

  def init(self, spec, shape=None):
    if spec.granularity == "per_token":
      _fail("granularity", spec.granularity,
            "per-token scales are computed at run time (dynamic); there is nothing to calibrate")
    if shape is None and spec.granularity != "per_tensor":
      return ObserverState(None, spec)
    return ObserverState(self._empty(_stat_shape(spec, shape or ())), spec)

  def update(self, state, x):
    x = jnp.asarray(x, jnp.float32)
    if state.stats is None:
      state = self.init(state.spec, x.shape)
    return ObserverState(_observer_update(self, state.stats, x, state.spec), state.spec)

  def qparams(self, state, spec=None):
    spec = state.spec if spec is None else spec
    if spec.granularity != state.spec.granularity or spec.axis != state.spec.axis:
      _fail("spec", spec, f"granularity/axis differ from the observed {state.spec}")
    if state.stats is None or _host(state.stats["count"]) == 0:
      raise ValueError("observer has seen no data: call update() before qparams()")
    return self._qparams(state.stats, spec, state.spec)

  def _empty(self, shape):
    return {"min": jnp.full(shape, jnp.inf), "max": jnp.full(shape, -jnp.inf),
            "count": jnp.zeros((), jnp.int32)}

  def _qparams(self, st, spec, observed):
    return qparams_from_range(st["min"], st["max"], spec)


@dataclasses.dataclass(frozen=True)
class MinMaxObserver(_Observer):
  """Running min and max over every batch seen."""

  def _update(self, st, x, spec):
    return {"min": jnp.minimum(st["min"], _reduce(x, spec, jnp.min)),
            "max": jnp.maximum(st["max"], _reduce(x, spec, jnp.max)), "count": st["count"] + 1}


@dataclasses.dataclass(frozen=True)
class MovingAverageMinMaxObserver(_Observer):
  """EMA of per-batch min/max: m <- momentum·m + (1 - momentum)·batch (first batch copied)."""
  momentum: float = 0.9

  def _update(self, st, x, spec):
    first, m = st["count"] == 0, self.momentum
    ema = lambda old, new: jnp.where(first, new, m * old + (1 - m) * new)
    return {"min": ema(st["min"], _reduce(x, spec, jnp.min)),
            "max": ema(st["max"], _reduce(x, spec, jnp.max)), "count": st["count"] + 1}


@dataclasses.dataclass(frozen=True)
class PercentileObserver(_Observer):
  """Mean over batches of the per-batch percentile: of |x| (symmetric), or the
  (100 - p, p) percentiles of x (asymmetric)."""
  percentile: float = 99.99

  def _update(self, st, x, spec):
    p = self.percentile
    pct = lambda q: (lambda v, axis, keepdims: jnp.percentile(v, q, axis=axis, keepdims=keepdims))
    if spec.symmetric:
      hi = _reduce(jnp.abs(x) if spec.signed else x, spec, pct(p))
      lo = -hi
    else:
      lo, hi = _reduce(x, spec, pct(100.0 - p)), _reduce(x, spec, pct(p))
    n = st["count"].astype(jnp.float32)
    mean = lambda old, new: jnp.where(n == 0, new, (old * n + new) / (n + 1))
    return {"min": mean(st["min"], lo), "max": mean(st["max"], hi), "count": st["count"] + 1}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _observer_update(observer, stats, x, spec):
  return observer._update(stats, x, spec)  # observers are frozen (hashable) dataclasses


def _default_ratios():
  # Fine steps (0.01) where Gaussian-like data is best clipped, geometric below for
  # heavy tails (t-distributed data can want 1-5 % of its absmax).
  r = np.concatenate([np.geomspace(0.01, 0.3, 30, endpoint=False), np.linspace(0.3, 1.0, 71)])
  return tuple(float(v) for v in np.round(r, 5))


@dataclasses.dataclass(frozen=True)
class MseObserver(_Observer):
  """Clip-ratio search: running min/max plus, per candidate ratio r, the summed
  quantization MSE of each batch with the range scaled by r; picks the argmin
  (per channel / group when the spec has several scales)."""
  ratios: tuple = dataclasses.field(default_factory=_default_ratios)

  def _empty(self, shape):
    st = super()._empty(shape)
    st["sse"] = jnp.zeros((len(self.ratios),) + tuple(shape), jnp.float32)
    return st

  def _update(self, st, x, spec):
    lo = jnp.minimum(st["min"], _reduce(x, spec, jnp.min))
    hi = jnp.maximum(st["max"], _reduce(x, spec, jnp.max))

    def err(r):  # one ratio at a time keeps memory at one copy of x
      s, z = qparams_from_range(lo * r, hi * r, spec)
      s, z = expand_qparams(s, x.shape, spec), expand_qparams(z, x.shape, spec)
      d = _fq_forward(x, s, z.astype(jnp.float32), spec) - x
      return _reduce(d * d, spec, jnp.mean)

    sse = st["sse"] + lax.map(err, jnp.asarray(self.ratios, jnp.float32))
    return {"min": lo, "max": hi, "sse": sse, "count": st["count"] + 1}

  def _qparams(self, st, spec, observed):
    if spec != observed:
      _fail("spec", spec, f"MSE errors were collected for {observed}; bits/range must match")
    r = jnp.asarray(self.ratios, jnp.float32)[jnp.argmin(st["sse"], axis=0)]
    return qparams_from_range(st["min"] * r, st["max"] * r, spec)
