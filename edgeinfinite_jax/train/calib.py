"""Model-level calibration: capture activations, run observers, write static scales.

``capture(config, params, tokens)`` runs the model once with its capture hooks
and returns ``{"layers_{i}/{site}": activation}`` (the names of
``ptq.ACTIVATION_SITES``, pre-quantization values) plus the attention internals
(``q_hat``, ``k_hat``, pre-mask ``logits``).

``calibrate(config, params, batches)`` is PTQ's activation step and QAT's
data-dependent init: it captures every batch under a copy of the quant config
with the activation quantizers off (weights stay quantized as configured, so the
statistics are those the quantized model will see), feeds each static site's
observer (``ptq.init_calibration`` / ``ptq.update_calibration``), and writes ``layers_i/{attn,mlp}/quant/{site}/{scale, zero_point}``
(``calibrated`` and ``learned`` alike: learned LSQ+ parameters start from the
calibrated min/max qparams, unit-consistent, rather than the released code's
first-batch heuristic, edgeqat.md §3.3). The low-bit branch of token-adaptive
bits (``{site}_lo``) gets the same observed range on its own grid. Learned weight
step sizes start at LSQ's 2·mean|W|/sqrt(Qp) (EdgeQAT's LinearQ init).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
from flax import traverse_util

from edgeinfinite_jax.quant import layer_quant as qapply
from edgeinfinite_jax.quant import lsq, ptq
from edgeinfinite_jax.quant import observers as obs
from edgeinfinite_jax.quant import quantizers as qz
from edgeinfinite_jax.quant.qconfig import ACTIVATION_PLACEMENTS
from edgeinfinite_jax.model.config import quant_of, quantized
from edgeinfinite_jax.model import transformer as model_lib

_MODULE_SITES = (("attn", qapply.ATTN_SITES), ("mlp", qapply.MLP_SITES))
_WEIGHTS = (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")))
OBSERVERS = {"minmax": obs.MinMaxObserver, "ema": obs.MovingAverageMinMaxObserver,
             "percentile": obs.PercentileObserver, "mse": obs.MseObserver}


def observer(name: str):
  if name not in OBSERVERS:
    raise ValueError(f"observer={name!r}: must be one of {sorted(OBSERVERS)}")
  return OBSERVERS[name]()


@functools.partial(jax.jit, static_argnums=0)
def _capture_jit(config, params, tokens):
  _, state = model_lib.Transformer(config).apply(params, tokens, mutable=["intermediates"])
  return state["intermediates"]


def capture(config, params, tokens) -> dict[str, jax.Array]:
  """``{"layers_{i}/{site}": value}`` of one forward pass (segmented attention:
  stacked over segments). Values are those the model computes under ``config``."""
  flat = traverse_util.flatten_dict(_capture_jit(config, params, jnp.asarray(tokens, jnp.int32)))
  out = {}
  for (layer, _, site), value in flat.items():  # sow keeps a tuple of values
    out[f"{layer}/{site}"] = value[0]
  return out


def calibration_config(config):
  """``config`` with the activation quantizers off and dynamic min/max weights: what
  the observers watch (weights as the quantized model will use them)."""
  q = quant_of(config)
  off = {p: None for p in ACTIVATION_PLACEMENTS}
  e = dataclasses.replace(q.edgeqat, adaptive_fraction=0.0)
  return quantized(config, q.replace(mode="fake_quant", activation_scales="dynamic",
                                               weight_scales="dynamic", edgeqat=e,
                                               fake_quant_dots="float", **off))


def static_site_specs(config) -> dict[tuple, Any]:
  """(layer, module, site) -> spec of every static site (``_lo`` included)."""
  quant = quant_of(config)
  out = {}
  for i in range(config.num_layers):
    for module, sites in _MODULE_SITES:
      for name, spec in qapply.static_sites(quant, sites):
        out[(f"layers_{i}", module, name)] = spec
  return out


def calibrate(config, params, batches: Iterable, observer_name: str = "minmax",
              only_missing: bool = False):
  """``params`` with every static scale of ``config`` written (see module doc).

  batches: token arrays [B, T] or dicts with "tokens". ``only_missing``: keep the
  scales already in ``params`` (e.g. learned ones) and fill only absent sites
  (e.g. the ``linear_outputs`` grid added for integer mode).
  """
  quant = quant_of(config)
  if not qapply.active(quant):
    raise ValueError(f"calibrate: config.quant={quant!r} is not an active quant config")
  inner = dict(params["params"])
  flat = traverse_util.flatten_dict(inner)
  specs = static_site_specs(config)
  path = lambda key, leaf: (key[0], key[1], "quant", key[2], leaf)
  have = lambda key: path(key, "scale") in flat
  todo = {k: s for k, s in specs.items() if not (only_missing and have(k))}
  base = lambda key: key[:2] + (key[2][:-3] if key[2].endswith("_lo") else key[2],)
  name = lambda key: f"{key[0]}/{key[2]}"  # the capture's (and ptq's) activation name
  sites = {name(base(k)): specs[base(k)] for k in todo}
  states = ptq.init_calibration(sites, observer(observer_name))
  if sites:
    calib = calibration_config(config)
    seen = False
    for batch in batches:
      tokens = batch["tokens"] if isinstance(batch, dict) else batch
      acts = capture(calib, params, tokens)
      for n in sites:
        if n not in acts:
          raise ValueError(f"calibrate: site {n} was not captured")
      states = ptq.update_calibration(states, {n: acts[n] for n in sites})
      seen = True
    if not seen:
      raise ValueError("calibrate: got no batches")
  for key, spec in todo.items():
    c = states[name(base(key))]
    o, st = c.observer, c.state
    if key[2].endswith("_lo") or isinstance(o, obs.MseObserver) and spec != st.spec:
      scale, zp = qz.qparams_from_range(st.stats["min"], st.stats["max"], spec)
    else:
      scale, zp = o.qparams(st, spec)
    flat[path(key, "scale")] = jnp.asarray(scale, jnp.float32)
    if not spec.symmetric:
      flat[path(key, "zero_point")] = jnp.asarray(zp, jnp.float32)
  _init_weight_scales(config, flat, only_missing)
  return {**params, "params": traverse_util.unflatten_dict(flat)}


def _init_weight_scales(config, flat, only_missing):
  quant = quant_of(config)
  if quant.weight_scales != "learned":
    return
  spec = quant.linear_weights
  for i in range(config.num_layers):
    for module, names in _WEIGHTS:
      for name in names:
        key = (f"layers_{i}", module, name, "quant", "scale")
        kernel = flat[(f"layers_{i}", module, name, "kernel")]
        if (only_missing and key in flat) or isinstance(kernel, ptq.QuantizedTensor):
          continue
        n_contract = 2 if name == "o_proj" else 1
        w2 = kernel.reshape(int(jnp.prod(jnp.asarray(kernel.shape[:n_contract]))), -1)
        s = lsq.lsq_init_scale(w2, ptq.resolve_weight_spec(spec))
        flat[key] = s.reshape(-1) if s.ndim else s


def quantize_model(config, params, batches, observer_name: str = "minmax",
                   weight_observer: str | None = None):
  """Post-training quantization of a float model: kernels -> ``QuantizedTensor``
  (min/max, or ``weight_observer`` e.g. "mse" for a clipping search), then the
  activations calibrated on ``batches`` with those quantized weights."""
  quant = quant_of(config)
  wobs = None if weight_observer is None else observer(weight_observer)
  qparams = ptq.quantize_params(params, quant, wobs)
  if quant.activation_scales == "dynamic":
    return qparams
  return calibrate(config, qparams, batches, observer_name)
