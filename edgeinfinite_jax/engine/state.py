"""The engine's state pytree, its size, and how exported step functions serialise it.

Its own module so that ``export.load_exported`` in a fresh process registers the
tree types (``jax.export`` stores them by name) without building an Engine.
"""

from __future__ import annotations

import json
import math
from typing import Any

import flax.struct
import jax

from edgeinfinite_jax.model import eviction
from edgeinfinite_jax.model import kv_cache as cache_lib
from edgeinfinite_jax.model import memory as memory_lib
from edgeinfinite_jax.quant import ptq


@flax.struct.dataclass
class EngineState:
  caches: Any          # list of cache_lib.LayerCache, one per layer
  length: jax.Array    # int32 scalar: tokens read so far
  route: str = flax.struct.field(pytree_node=False, default="long")


# Exported step functions carry the state's tree structure in their signature.
jax.export.register_namedtuple_serialization(
    cache_lib.LayerCache, serialized_name="edgeinfinite_jax.LayerCache")
jax.export.register_namedtuple_serialization(
    memory_lib.Memory, serialized_name="edgeinfinite_jax.Memory")
jax.export.register_namedtuple_serialization(
    eviction.Kept, serialized_name="edgeinfinite_jax.Kept")
jax.export.register_pytree_node_serialization(
    EngineState, serialized_name="edgeinfinite_jax.EngineState",
    serialize_auxdata=lambda aux: json.dumps(list(aux)).encode(),
    deserialize_auxdata=lambda b: tuple(json.loads(b.decode())))


def _qt_aux_to_json(aux):
  spec, shape, dtype = aux
  return json.dumps([spec.to_dict(), list(shape), dtype]).encode()


def _qt_aux_from_json(blob):
  spec, shape, dtype = json.loads(blob.decode())
  return (ptq.QuantSpec(**spec), tuple(shape), dtype)


# Integer-mode params hold PTQ kernels (int values + scales) as QuantizedTensor nodes.
jax.export.register_pytree_node_serialization(
    ptq.QuantizedTensor, serialized_name="edgeinfinite_jax.QuantizedTensor",
    serialize_auxdata=_qt_aux_to_json, deserialize_auxdata=_qt_aux_from_json)


def state_nbytes(state) -> int:
  """Bytes held by an engine state (every array leaf: for h2o / snapkv, the kept
  tokens' keys, values, positions and scores and the window's scores too)."""
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)))
