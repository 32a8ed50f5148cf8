"""The one place for logical-axis rules, mesh construction and shardings.

The model names every parameter dimension and the main activations with logical
axes (``model.py``); this module maps them onto a 3-axis device mesh:

* ``data``: pure data parallelism (the batch is split, parameters replicated);
* ``fsdp``: the batch is split *and* parameters are sharded along ``embed``
  (ZeRO-3 style: gathered by XLA when a layer needs them);
* ``tensor``: Megatron-style model parallelism over heads / mlp / vocab.

A rule that does not divide a dimension is dropped for that dimension, so every
model shape works on every mesh (e.g. MQA's single KV head over ``tensor=2`` is
simply replicated). On one device everything is replicated and the code path is
the same as on a pod.

Multi-host: ``maybe_initialize_distributed`` runs ``jax.distributed.initialize``
when ``config.distributed.initialize`` asks for it, and ``global_batch`` turns
each host's slice of the batch into one global array.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from edgeinfinite_jax.model.config import ConfigError
from edgeinfinite_jax.model import transformer as model_lib

MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes the batch is split over (``tensor`` replicates the batch).
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
# Parameters shard ``embed`` over fsdp and the "wide" dims over tensor, so a
# matmul contracts a sharded embed dim (all-gather by fsdp) and produces a
# tensor-sharded output, the usual Megatron pairing (q/k/v & up: column, o &
# down: row parallel).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)

LOGICAL_NAMES = tuple(name for name, _ in DEFAULT_RULES)
# CPU / single-device default: every logical axis replicated.
REPLICATED_RULES = tuple((name, None) for name in LOGICAL_NAMES)


def default_rules(mesh: Mesh):
  """The rules table for ``mesh``: replicated on one device, DEFAULT_RULES else."""
  return REPLICATED_RULES if mesh.size == 1 else DEFAULT_RULES


# ----------------------------------------------------------------------------- mesh


def mesh_shape(mesh_config: Mapping[str, int], n_devices: int) -> dict[str, int]:
  """Resolves ``{"data": -1, "fsdp": 2, "tensor": 1}`` (-1 = the rest) to sizes.

  Raises ConfigError naming the key and the rule when the sizes cannot tile
  ``n_devices`` exactly.
  """
  cfg = dict(mesh_config)
  unknown = sorted(set(cfg) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"unknown mesh axis {', '.join('mesh.' + k for k in unknown)}; "
                      f"valid axes: {', '.join(MESH_AXES)}")
  sizes = {a: cfg.get(a, 1) for a in MESH_AXES}
  for a, v in sizes.items():
    if not isinstance(v, int) or isinstance(v, bool) or not (v == -1 or v > 0):
      raise ConfigError(f"mesh.{a}={v!r}: must be a positive integer or -1 (= the rest)")
  rest = [a for a, v in sizes.items() if v == -1]
  if len(rest) > 1:
    raise ConfigError(f"mesh.{rest[1]}=-1: at most one mesh axis may be -1 "
                      f"(also mesh.{rest[0]}=-1)")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if rest:
    if n_devices % fixed:
      raise ConfigError(f"mesh.{rest[0]}=-1: the other axes' product {fixed} must divide "
                        f"the device count {n_devices}")
    sizes[rest[0]] = n_devices // fixed
  if math.prod(sizes.values()) != n_devices:
    raise ConfigError(f"mesh={dict(mesh_config)}: data*fsdp*tensor={math.prod(sizes.values())} "
                      f"must equal the device count {n_devices}")
  return sizes


def make_mesh(config, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh from ``config.mesh`` (or a mesh mapping).

  Axes are ``Auto``: XLA propagates shardings from the parameter / batch
  shardings and the logical constraints inside the model.
  """
  mesh_config = config.mesh if hasattr(config, "mesh") else config
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


# ----------------------------------------------------------------------------- specs


def _as_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=None) -> P:
  """PartitionSpec for one array from its logical axis names and its shape.

  A mesh axis is kept for a dimension only if the product of the kept axes
  divides the dimension, and never used twice in one spec (a later dimension
  loses it). Unknown logical names are replicated.
  """
  rules = dict(default_rules(mesh) if rules is None else rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical, shape):
    kept: list[str] = []
    for axis in _as_tuple(rules.get(name)) if name is not None else ():
      size = math.prod(mesh.shape[a] for a in kept + [axis])
      if axis not in used and mesh.shape[axis] > 1 and dim % size == 0:
        kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def param_shardings(model_config, mesh: Mesh, rules=None):
  """NamedShardings for the ``{"params": ...}`` tree of ``model_config``."""
  shapes = model_lib.abstract_params(model_config)
  logical = model_lib.logical_axes(model_config)
  return jax.tree.map(
      lambda spec, s: NamedSharding(mesh, logical_to_spec(tuple(spec), s.shape, mesh, rules)),
      logical, shapes, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
  """Sharding of a ``[batch, length]`` input: batch over the data-parallel axes."""
  rules = dict(default_rules(mesh) if rules is None else rules)
  axes = tuple(a for a in _as_tuple(rules.get("batch")) if mesh.shape[a] > 1)
  return NamedSharding(mesh, P(axes or None, None))


def path_str(keypath) -> str:
  """'/'-joined dict keys of a tree path: ``params/layers_0/attn/q_proj/kernel``."""
  return "/".join(str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey))


def like_params_shardings(abstract_tree, params_shardings, mesh: Mesh):
  """Shardings for a tree whose leaves mirror parameters (optimizer moments).

  A leaf whose dict-key path equals a parameter path and whose rank matches
  takes that parameter's sharding; everything else (step counters, scalars) is
  replicated. Works for any optax state since optax nests the param tree
  inside NamedTuples, which contribute no dict keys.
  """
  by_path = {path_str(kp): s for kp, s in
             jax.tree_util.tree_flatten_with_path(params_shardings)[0]}

  def pick(kp, leaf):
    s = by_path.get(path_str(kp))
    if s is not None and len(s.spec) == len(getattr(leaf, "shape", ())):
      return s
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, abstract_tree)


@contextlib.contextmanager
def activation_context(mesh: Mesh, rules=None, constrain_activations: bool = True):
  """Binds ``mesh`` and the logical-axis rules while tracing model code.

  With the rules bound, the model's ``with_logical_constraint`` calls pin the
  activations' shardings; ``constrain_activations=False`` binds only the mesh
  and leaves XLA to propagate shardings from the parameters and the batch.
  """
  rules = default_rules(mesh) if rules is None else rules
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.set_mesh(mesh))
    if constrain_activations:
      stack.enter_context(nn.logical_axis_rules(rules))
    yield


# ----------------------------------------------------------------------------- hosts


def maybe_initialize_distributed(config) -> bool:
  """Calls ``jax.distributed.initialize`` if ``config.distributed.initialize``.

  Must run before anything touches the JAX backend. Empty / -1 / 0 values are
  left for JAX to auto-detect (SLURM, TPU pods, Open MPI, ...). Returns whether
  it initialised.

  CPU processes need a cross-process collectives library or every collective
  across hosts fails, so ``jax_cpu_collectives_implementation`` is set to
  ``gloo`` (bundled with jaxlib) unless it already names one (e.g. ``mpi``);
  accelerator backends ignore it. That is what makes a run of several CPU
  processes on one machine (README: two processes on 127.0.0.1) work.
  """
  d = config.get("distributed") if hasattr(config, "get") else None
  if not d or not d.get("initialize", False):
    return False
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=d.get("coordinator_address") or None,
      num_processes=d.get("num_processes") or None,
      process_id=None if d.get("process_id", -1) < 0 else d.get("process_id"))
  return True


def host_slice(global_batch_size: int) -> slice:
  """The rows of the global batch this process loads."""
  n, i = jax.process_count(), jax.process_index()
  if global_batch_size % n:
    raise ConfigError(f"data.batch_size={global_batch_size}: must be divisible by the "
                      f"process count {n}")
  per = global_batch_size // n
  return slice(i * per, (i + 1) * per)


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
  """Host-local numpy rows -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
