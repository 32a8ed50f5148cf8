"""Low-rank adapters (LoRA) on the attention's q/k/v projections, and the files
that carry a small trained subset of parameters (a gate, adapters) on its own.

EdgeInfinite trains only the memory gate. The comparison the method needs is a
larger trainable set that can change how the frozen model writes to and reads
from the memory: the memory's keys, values and queries are the layer's own k, v
and q, so a rank-r term on those kernels reshapes both branches,
``W' = W + A B`` with ``A: [hidden, r]`` and ``B: [r, heads, head_dim]``. ``B``
starts at zero, so a fresh adapter is exactly the base model (and ``A`` gets
``N(0, 1/hidden)`` so its gradient is not zero).

The term is added to the *kernel*, not to the projection's output: every
quantization mode then sees the adapted kernel as its weight, and ``merge`` folds
adapters into plain kernels (what the engine's exported graphs and Hugging Face
checkpoints take) with no change in the function.
"""

from __future__ import annotations

import json
import os
import re
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edgeinfinite_jax.model.config import ModelConfig
from edgeinfinite_jax.quant import ptq

TARGETS = ("q_proj", "k_proj", "v_proj")
# Their parameter paths (``layers_3/attn/k_proj/lora_b``): trainable-group regexes.
PATTERN = r".*/attn/[qkv]_proj/lora_[ab]"


def _a_init(fan_in: int):
  return nn.initializers.normal(stddev=1.0 / np.sqrt(fan_in))


def _adapted(kernel, a, b):
  return kernel + jnp.tensordot(a, b, axes=1).astype(kernel.dtype)


def adapted_kernel(module: nn.Module, kernel, n_contract: int, rank: int):
  """``kernel + A B`` for a ``Projection`` with ``lora_rank``; declares ``lora_a`` /
  ``lora_b`` next to its kernel (logical axes: the kernel's, unnamed for the rank)."""
  if isinstance(kernel, ptq.QuantizedTensor):
    raise ValueError(f"{module.name}: a PTQ-quantized kernel cannot take a low-rank "
                     "adapter; merge the adapters first (model.lora.merge), then quantize")
  shape, axes = tuple(kernel.shape), tuple(module.axes)
  fan_in = int(np.prod(shape[:n_contract]))
  a = module.param("lora_a", nn.with_logical_partitioning(
      _a_init(fan_in), axes[:n_contract] + (None,)), shape[:n_contract] + (rank,), jnp.float32)
  b = module.param("lora_b", nn.with_logical_partitioning(
      nn.initializers.zeros, (None,) + axes[n_contract:]), (rank,) + shape[n_contract:],
      jnp.float32)
  return _adapted(kernel, a, b)


def _attn(params, i):
  return params["params"][f"layers_{i}"]["attn"]


def with_lora(config: ModelConfig, params, *, rank: int, rng):
  """Adds rank-``rank`` adapters to a model's q/k/v: (config, params) -> (config, params).

  The backbone is shared, not copied; the new model computes the same function
  until ``lora_b`` moves from zero.
  """
  if config.lora_rank:
    raise ValueError(f"with_lora: the model already has adapters (lora_rank={config.lora_rank})")
  new_config = config.replace(lora_rank=rank)  # validates the rank
  inner = dict(params["params"])
  for i in range(config.num_layers):
    attn = dict(_attn(params, i))
    for j, name in enumerate(TARGETS):
      kernel = attn[name]["kernel"]
      a = _a_init(kernel.shape[0])(jax.random.fold_in(rng, 3 * i + j),
                                   (kernel.shape[0], rank), jnp.float32)
      attn[name] = dict(attn[name], lora_a=a,
                        lora_b=jnp.zeros((rank,) + kernel.shape[1:], jnp.float32))
    inner[f"layers_{i}"] = dict(inner[f"layers_{i}"], attn=attn)
  return new_config, {**params, "params": inner}


def merge(config: ModelConfig, params):
  """Folds the adapters into the kernels: (config, params) -> (config without adapters,
  params without ``lora_*`` leaves), the same function to float32 rounding."""
  if not config.lora_rank:
    return config, params
  inner = dict(params["params"])
  for i in range(config.num_layers):
    attn = dict(_attn(params, i))
    for name in TARGETS:
      p = attn[name]
      kernel = _adapted(p["kernel"], p["lora_a"], p["lora_b"])
      attn[name] = {k: v for k, v in p.items() if not k.startswith("lora_")} | {"kernel": kernel}
    inner[f"layers_{i}"] = dict(inner[f"layers_{i}"], attn=attn)
  return config.replace(lora_rank=0), {**params, "params": inner}


# ----------------------------------------------------------------- trained subsets on disk


def subset(params, pattern: str) -> dict[str, jax.Array]:
  """The leaves of ``params["params"]`` whose path matches ``pattern`` (full match),
  as ``{"layers_i/attn/memory_gate/bias": array}``."""
  rx = re.compile(pattern)
  flat = traverse_util.flatten_dict(params["params"])
  return {"/".join(k): v for k, v in flat.items() if rx.fullmatch("/".join(k))}


# The memory settings a trained set is served with: what the frozen model's memory and
# cache looked like while the set was trained. A gate trained with a 128-token window and
# absolute positions reads a 1024-token window or cache-relative positions as noise (it
# decoded an empty answer), so they travel with the set.
SERVING_KEYS = ("attention_type", "segment_len", "n_sink", "n_window", "gate",
                "gate_mlp_hidden", "update_rule", "mem_uses_rope", "rope_positions")
_SETTINGS = "__settings__"  # the .npz entry that holds them, as JSON


def serving_settings(config: ModelConfig) -> dict:
  """What ``save_subset`` records of ``config``: its memory's ``SERVING_KEYS`` and the
  adapters' rank."""
  return {"memory": {k: getattr(config.memory, k) for k in SERVING_KEYS},
          "lora_rank": int(config.lora_rank)}


def save_subset(params, path: str, pattern: str, what: str, config: ModelConfig | None = None
                ) -> None:
  """Writes the leaves ``pattern`` selects to ``.npz`` (atomic: a killed writer leaves
  an earlier file intact), with ``serving_settings(config)`` when a config is given. A
  trained gate or adapter set is a few MB at most: small enough to commit next to the
  command that trained it."""
  leaves = subset(params, pattern)
  if not leaves:
    raise ValueError(f"save {what}: these params have none (no leaf matches {pattern!r})")
  extra = {} if config is None else {_SETTINGS: np.array(json.dumps(serving_settings(config)))}
  tmp = f"{path}.tmp.npz"
  np.savez(tmp, **{k: np.asarray(v) for k, v in leaves.items()}, **extra)
  os.replace(tmp, path)


def read_subset(path: str, what: str) -> tuple[dict[str, np.ndarray], dict | None]:
  """(leaves, serving settings or None) of a file ``save_subset`` wrote. A missing,
  truncated or foreign file, or a non-finite value (a diverged run: it decodes to an
  empty string), is a ValueError naming the path, before any model is built."""
  if not os.path.isfile(path):
    raise ValueError(f"{what} file {path!r}: no such file")
  try:
    with np.load(path, allow_pickle=False) as f:
      got = {k: f[k] for k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f"{what} file {path!r}: not a readable .npz of trained parameters "
                     f"({type(e).__name__}: {e})") from None
  settings = json.loads(str(got.pop(_SETTINGS))) if _SETTINGS in got else None
  for k, v in got.items():
    if not np.issubdtype(v.dtype, np.floating):
      raise ValueError(f"{what} file {path!r}: {k} is {v.dtype}, not floating point")
    if not np.all(np.isfinite(v)):
      raise ValueError(f"{what} file {path!r}: {k} holds {int(np.sum(~np.isfinite(v)))} "
                       "non-finite values (NaN/inf); the run that wrote it diverged")
  return got, settings


def load_subset(params, path: str, pattern: str, what: str):
  """``params`` with the leaves ``pattern`` selects replaced by those saved at ``path``;
  the file must hold exactly those names with the same shapes (ValueError otherwise)."""
  return set_subset(params, read_subset(path, what)[0], pattern, what, path)


def set_subset(params, got: dict[str, np.ndarray], pattern: str, what: str, path: str):
  """``params`` with the leaves ``pattern`` selects replaced by ``got`` (``read_subset``'s
  leaves of ``path``): exactly those names with the same shapes (ValueError otherwise)."""
  want = subset(params, pattern)
  if set(got) != set(want):
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    raise ValueError(f"{path}: {what} parameters do not match this model's (missing "
                     f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                     f"{extra[:3]}{'...' if len(extra) > 3 else ''}); same form and "
                     "layer count?")
  for k, v in want.items():
    if got[k].shape != v.shape:
      raise ValueError(f"{path}: {k} has shape {list(got[k].shape)}, this model's "
                       f"{list(v.shape)}")
  flat = traverse_util.flatten_dict(params["params"])
  for k, v in got.items():
    flat[tuple(k.split("/"))] = jnp.asarray(v, jnp.float32)
  return {**params, "params": traverse_util.unflatten_dict(flat)}
