"""Post-training quantization: weights of a params tree, save/restore, activation calibration.

Weights. ``quantize_params(params, config)`` replaces every kernel that the config
quantizes with a ``QuantizedTensor``; all other leaves (norm scales, biases, gate
parameters) stay float. Kernels are stored in a 2-D ``[K, N]`` layout (K = the
contraction axes of the model's kernel flattened, N = the rest), the layout of
``intsim.qlinear_matmul``'s ``b``; ``shape`` keeps the original shape:

  layers_i/attn/{q,k,v}_proj/kernel  [hidden, heads, hd] -> [hidden, heads*hd]
  layers_i/attn/o_proj/kernel        [heads, hd, hidden] -> [heads*hd, hidden]
  layers_i/mlp/*_proj/kernel, lm_head/kernel             (already [K, N])
  embed/embedding                    [vocab, hidden]     (a table: rows are channels)

The spec's axis is resolved from that layout (the config's axis is ignored):
per_channel = one scale per output column (per row for the embedding), per_group
= groups along K (along hidden for the embedding). int4 values are held in int8.

Learned weight scales (``weight_scales="learned"``, LSQ) sit next to their kernel at
``.../{name}_proj/quant/scale``; ``quantize_params`` uses them instead of min/max.

Activations: observer states per activation name, ``layers_{i}/{site}`` with the
sites of ``ACTIVATION_SITES`` (``activation_specs`` lists the ones a config
calibrates): ``init_calibration``, then ``update_calibration`` with a dict
``name -> activation`` per batch, then ``calibrated_qparams``. The model-level
``calibrate`` (``train/calib.py``) runs the model with its capture hooks to produce
those dicts, feeds them through these functions and writes the resulting scales
into the params tree.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edgeinfinite_jax.quant import observers as obs
from edgeinfinite_jax.quant import quantizers as qz
from edgeinfinite_jax.quant.qconfig import QuantConfig
from edgeinfinite_jax.quant.quantizers import QuantSpec
import orbax.checkpoint as ocp

FORMAT_VERSION = 1

# activation site -> QuantConfig placement
ACTIVATION_SITES = {
    "attn_input": "linear_inputs", "o_input": "linear_inputs", "mlp_input": "linear_inputs",
    "down_input": "linear_inputs", "q_out": "linear_outputs", "k_out": "linear_outputs",
    "v_out": "linear_outputs", "o_out": "linear_outputs", "gate_out": "linear_outputs",
    "up_out": "linear_outputs", "down_out": "linear_outputs", "q": "q", "k": "k", "v": "v",
    "attn_probs": "attn_probs", "kv_cache_k": "kv_cache", "kv_cache_v": "kv_cache",
    "memory": "memory_state"}


@flax.struct.dataclass
class QuantizedTensor:
  """Integer values (layout 2-D for kernels), float32 scale, int32 zero point."""
  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  spec: QuantSpec = flax.struct.field(pytree_node=False)
  shape: tuple = flax.struct.field(pytree_node=False)  # the float tensor's shape
  dtype: str = flax.struct.field(pytree_node=False, default="float32")

  def dequantize(self) -> jax.Array:
    x = qz.dequantize(self.values, self.scale, self.zero_point, self.spec)
    return x.reshape(self.shape).astype(self.dtype)


def _role(path):
  """(placement, number of leading contraction axes) of a parameter, or None."""
  *parents, leaf = path
  parent = parents[-1] if parents else ""
  if leaf == "kernel" and parent in ("q_proj", "k_proj", "v_proj") and "attn" in parents:
    return "linear_weights", 1
  if leaf == "kernel" and parent == "o_proj" and "attn" in parents:
    return "linear_weights", 2
  if leaf == "kernel" and parent in ("gate_proj", "up_proj", "down_proj") and "mlp" in parents:
    return "linear_weights", 1
  if path[-2:] == ("lm_head", "kernel"):
    return "lm_head", 1
  if path[-2:] == ("embed", "embedding"):
    return "embeddings", None  # a table, not a kernel
  return None


def resolve_weight_spec(spec: QuantSpec, table: bool = False) -> QuantSpec:
  """The spec with axes for the 2-D [K, N] layout (``table``: [rows, features])."""
  if spec.granularity == "per_channel":
    return spec.replace(axis=0 if table else 1)
  if spec.granularity == "per_group":
    return spec.replace(axis=1 if table else 0)
  if spec.granularity == "per_token":
    raise ValueError(f"granularity={spec.granularity!r}: not valid for weights")
  return spec


def quantize_tensor(w, spec: QuantSpec, n_contract: int | None = 1, observer=None,
                    name: str = "tensor", scale=None) -> QuantizedTensor:
  """Quantize one weight (round to nearest; scales from min/max, or ``observer``,
  e.g. ``MseObserver()`` for a clipping search, or a given symmetric ``scale`` in
  the 2-D layout's qparam shape, e.g. a learned LSQ step). ``n_contract=None``: a table."""
  w = jnp.asarray(w)
  shape = tuple(w.shape)
  if n_contract is not None:
    k = int(np.prod(shape[:n_contract]))
    w2 = w.reshape(k, -1) if w.ndim > 1 else w.reshape(k, 1)
  else:
    w2 = w
  try:
    spec = resolve_weight_spec(spec, table=n_contract is None)
    if scale is not None:
      scale = jnp.asarray(scale, jnp.float32)
      if spec.granularity == "per_channel":
        scale = scale.reshape((-1, 1) if n_contract is None else (1, -1))
      zp = jnp.zeros(scale.shape, jnp.int32)
    elif observer is None:
      scale, zp = qz.compute_qparams(w2, spec)
    else:
      scale, zp = observer.qparams(observer.update(observer.init(spec, w2.shape), w2))
  except ValueError as e:
    raise ValueError(f"{name} {shape}: {e}") from None
  return QuantizedTensor(qz.quantize_int(w2, scale, zp, spec), scale, zp, spec, shape,
                         jnp.dtype(w.dtype).name)


def _flat(params):
  return traverse_util.flatten_dict(flax.core.unfreeze(params))


def quantize_params(params, config: QuantConfig, observer=None):
  """Same tree as ``params`` with ``QuantizedTensor`` at the kernels the config
  quantizes (``linear_weights``, ``lm_head``; ``embeddings`` for the table, which
  also serves a tied lm_head). Accepts ``{"params": ...}`` or the inner dict."""
  flat = _flat(params)
  out = {}
  for path, leaf in flat.items():
    role = _role(path)
    spec = None if role is None else getattr(config, role[0])
    if spec is None or _is_qt(leaf):
      out[path] = leaf
    else:
      learned = flat.get(path[:-1] + ("quant", "scale")) if role[0] == "linear_weights" else None
      out[path] = quantize_tensor(leaf, spec, role[1], observer, "/".join(path), scale=learned)
  return traverse_util.unflatten_dict(out)


def _is_qt(x):
  return isinstance(x, QuantizedTensor)


def dequantize_params(qparams):
  """Float params (original shapes and dtypes) from a quantized set."""
  return jax.tree.map(lambda x: x.dequantize() if _is_qt(x) else x, qparams, is_leaf=_is_qt)


# ----------------------------------------------------------------------------- save / restore
def save_quantized(path, qparams, overwrite: bool = False) -> None:
  """Orbax checkpoint (atomic: written to a temporary directory, then renamed).

  Arrays go through StandardSave; each QuantizedTensor's static metadata (spec,
  shape, dtype) goes in a JSON item of the same composite checkpoint.
  """
  arrays, meta = {}, {}
  for p, leaf in traverse_util.flatten_dict(qparams, is_leaf=lambda _, x: _is_qt(x)).items():
    if _is_qt(leaf):
      meta["/".join(p)] = {"spec": leaf.spec.to_dict(), "shape": list(leaf.shape),
                           "dtype": leaf.dtype}
      leaf = {"values": leaf.values, "scale": leaf.scale, "zero_point": leaf.zero_point}
    arrays[p] = leaf
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(os.path.abspath(os.fspath(path)), ocp.args.Composite(
        arrays=ocp.args.StandardSave(traverse_util.unflatten_dict(arrays)),
        meta=ocp.args.JsonSave({"format": FORMAT_VERSION, "tensors": meta})), force=overwrite)


def restore_quantized(path):
  """The quantized set saved by ``save_quantized`` (ints, scales, specs identical)."""
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    got = ckptr.restore(os.path.abspath(os.fspath(path)), ocp.args.Composite(
        arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  meta = got["meta"]
  if meta.get("format") != FORMAT_VERSION:
    raise ValueError(f"format={meta.get('format')!r}: expected {FORMAT_VERSION} in {path}")
  flat = _flat(got["arrays"])
  out = {p: jnp.asarray(v) for p, v in flat.items()}
  for name, m in meta["tensors"].items():
    p = tuple(name.split("/"))
    arrs = {k: jnp.asarray(flat.pop(p + (k,))) for k in ("values", "scale", "zero_point")}
    for k in ("values", "scale", "zero_point"):
      out.pop(p + (k,))
    out[p] = QuantizedTensor(**arrs, spec=QuantSpec(**m["spec"]), shape=tuple(m["shape"]),
                             dtype=m["dtype"])
  return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------- calibration
@flax.struct.dataclass
class CalibrationState:
  """One activation's observer (static) and its statistics."""
  observer: Any = flax.struct.field(pytree_node=False)
  state: obs.ObserverState


def activation_specs(config: QuantConfig, num_layers: int) -> dict[str, QuantSpec]:
  """``layers_{i}/{site}`` -> spec for the activations with static (calibrated)
  scales: placements that are set and not per_token; ``o_input`` only when
  ``quantize_o_input``."""
  out = {}
  for i in range(num_layers):
    for site, placement in ACTIVATION_SITES.items():
      spec = getattr(config, placement)
      if spec is None or spec.granularity == "per_token" or site == "memory":
        continue  # per-token and memory-state scales are always dynamic
      if site == "o_input" and not config.quantize_o_input:
        continue
      out[f"layers_{i}/{site}"] = spec
  return out


def init_calibration(specs: Mapping[str, QuantSpec], observer=None) -> dict:
  """Observer states for ``specs`` (name -> spec); ``observer`` defaults to min/max and
  may also be a dict name -> observer."""
  get = (lambda n: observer.get(n, obs.MinMaxObserver())) if isinstance(observer, Mapping) \
      else (lambda n: observer or obs.MinMaxObserver())
  return {n: CalibrationState(get(n), get(n).init(s)) for n, s in specs.items()}


def update_calibration(observer_states: Mapping[str, CalibrationState],
                       named_activations: Mapping[str, Any]) -> dict:
  """One calibration batch: update each named observer with its activation.

  Names absent from ``named_activations`` keep their state; unknown names raise.
  """
  unknown = sorted(set(named_activations) - set(observer_states))
  if unknown:
    raise ValueError(f"activations {unknown[:5]} have no observer; known names start with "
                     f"{sorted(observer_states)[:5]}")
  out = dict(observer_states)
  for name, x in named_activations.items():
    c = out[name]
    out[name] = CalibrationState(c.observer, c.observer.update(c.state, x))
  return out


def calibrated_qparams(observer_states: Mapping[str, CalibrationState]) -> dict:
  """name -> (scale, zero_point) from the collected statistics."""
  out = {}
  for name, c in observer_states.items():
    try:
      out[name] = c.observer.qparams(c.state)
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from None
  return out
