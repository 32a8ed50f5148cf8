"""The memory gate: how much of each head's output comes from the memory.

EdgeInfinite's exact gate is not public, so its form is a config choice:

* ``per_head_scalar``: one logit per head (Infini-attention's β).
* ``per_head_vector``: one logit per head and value channel.
* ``mlp``: per head, sigmoid(W2·silu(W1[A_mem; A_loc] + b1) + b2), conditioned on
  both branches. W2 starts at zero, so at init every form is the constant
  ``gate_init_bias``: memory (almost) off, and switched fully off until the
  memory holds something.

The gate's parameters sit under ``.../attn/memory_gate/`` (``PATTERN``) so
trainable-group regexes can select them alone.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edgeinfinite_jax.model import lora
from edgeinfinite_jax.model.config import ConfigError, ModelConfig

# The gate's parameter paths (``layers_3/attn/memory_gate/bias``).
PATTERN = r".*/memory_gate/.*"


class MemoryGate(nn.Module):
  """Declares the gate's parameters and returns them as a dict."""
  config: ModelConfig

  @nn.compact
  def __call__(self):
    c, m = self.config, self.config.memory
    h, d = c.num_heads, c.head_dim
    const = lambda v: (lambda key, shape, dtype=jnp.float32: jnp.full(shape, v, dtype))
    p = lambda name, init, shape, axes: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
    if m.gate == "per_head_scalar":
      return {"bias": p("bias", const(m.gate_init_bias), (h,), ("q_heads",))}
    if m.gate == "per_head_vector":
      return {"bias": p("bias", const(m.gate_init_bias), (h, d), ("q_heads", "head_dim"))}
    hid = m.gate_mlp_hidden
    return {
        "w1": p("w1", nn.initializers.normal(0.02), (h, 2 * d, hid), ("q_heads", None, None)),
        "b1": p("b1", nn.initializers.zeros, (h, hid), ("q_heads", None)),
        "w2": p("w2", nn.initializers.zeros, (h, hid), ("q_heads", None)),
        "bias": p("bias", const(m.gate_init_bias), (h,), ("q_heads",)),
    }


def logits(config: ModelConfig, params, read, local):
  """Gate logits broadcastable to [B, T, H, D]."""
  if config.memory.gate == "per_head_scalar":
    return params["bias"][:, None]
  if config.memory.gate == "per_head_vector":
    return params["bias"]
  x = jnp.concatenate([read, local], axis=-1).astype(jnp.float32)
  hidden = jax.nn.silu(jnp.einsum("bthi,hio->btho", x, params["w1"]) + params["b1"])
  return (jnp.einsum("btho,ho->bth", hidden, params["w2"]) + params["bias"])[..., None]


def blend(config: ModelConfig, params, read, local, has_content):
  """g·read + (1-g)·local in float32; g = 0 for heads whose memory is empty.

  has_content is [B, K] (per KV head); ``force_gate`` overrides g for knockout
  ablations and equivalence tests.
  """
  m = config.memory
  read, local = read.astype(jnp.float32), local.astype(jnp.float32)
  g = jax.nn.sigmoid(logits(config, params, read, local))
  if m.force_gate == "local":
    g = jnp.zeros_like(g)
  elif m.force_gate == "memory":
    g = jnp.ones_like(g)
  filled = jnp.repeat(has_content, config.num_groups, axis=1)[:, None, :, None]
  g = jnp.where(filled, g, 0.0)
  return g * read + (1.0 - g) * local


def declare_params(module: nn.Module, config: ModelConfig):
  return MemoryGate(config, name="memory_gate")()


def with_memory(config: ModelConfig, params, *, rng, **memory_options):
  """Turns a base model into a memory model: (config, params) -> (config, params).

  ``memory_options`` are ``MemoryConfig`` fields (attention_type defaults to
  ``edgeinfinite``; gate, update_rule, mem_uses_rope, rope_positions, sizes...).
  Gate parameters are added under ``layers_i/attn/memory_gate`` and start with
  the memory switched off; the backbone parameters are shared, not copied. An
  unknown option, or one of the wrong type (``segment_len='16'``, a bool for a size,
  a NaN bias), raises ConfigError naming the option and the expected type before
  anything is initialised.
  """
  memory_options.setdefault("attention_type", "edgeinfinite")
  new_config = config.with_memory(**memory_options)
  inner = dict(params["params"])
  if new_config.memory.uses_memory:
    for i in range(new_config.num_layers):
      layer = f"layers_{i}"
      gate_params = nn.unbox(MemoryGate(new_config).init(jax.random.fold_in(rng, i)))
      attn = dict(inner[layer]["attn"], memory_gate=gate_params["params"])
      inner[layer] = dict(inner[layer], attn=attn)
  return new_config, {**params, "params": inner}


def gate_params(params) -> dict[str, jax.Array]:
  """The gate's leaves of ``params`` as ``{"layers_i/attn/memory_gate/name": array}``."""
  return lora.subset(params, PATTERN)


def save_gate(params, path: str, config: ModelConfig | None = None) -> None:
  """Writes the gate's parameters (the only trained part of an EdgeInfinite model) to
  ``.npz``, with the memory settings of ``config`` it was trained with (``lora.save_subset``)."""
  lora.save_subset(params, path, PATTERN, "gate", config)


def saved_form(path: str) -> dict:
  """The ``MemoryConfig`` options that give a model the gate form saved at ``path``
  (``{"gate": "mlp", "gate_mlp_hidden": 32}``), read from its arrays' names and shapes,
  so that a trained gate loads without the user restating how it was configured."""
  return _form(lora.read_subset(path, "gate")[0], path)


def _form(leaves: dict, path: str) -> dict:
  shapes = {k.rsplit("/", 1)[-1]: v.shape for k, v in leaves.items()
            if k.startswith("layers_0/") and "/memory_gate/" in k}
  if "w1" in shapes:
    return {"gate": "mlp", "gate_mlp_hidden": int(shapes["w1"][-1])}
  if "bias" not in shapes:
    raise ValueError(f"{path}: no gate parameters of layer 0 (layers_0/.../memory_gate/bias); "
                     f"names: {sorted(shapes)}")
  return {"gate": "per_head_vector" if len(shapes["bias"]) == 2 else "per_head_scalar"}


def load_gate(params, path: str):
  """``params`` with the gate leaves replaced by those saved at ``path`` (names and shapes checked)."""
  return lora.load_subset(params, path, PATTERN, "gate")


class TrainedSet(NamedTuple):
  """What a trained-set file (``lora.save_subset``) says about itself."""
  memory: dict      # MemoryConfig options it was trained with (``lora.SERVING_KEYS``)
  lora_rank: int    # 0 = the gate alone; else the gate + rank-r q/k/v adapters
  recorded: bool    # False: an older file without settings; ``memory`` has the form only


def trained_set(path: str) -> TrainedSet:
  """The serving settings of the set at ``path``: recorded ones, or, for a file written
  before they were recorded, the gate form and adapter rank read from its arrays."""
  return _trained_set(path, *lora.read_subset(path, "trained set"))


def _trained_set(path: str, leaves: dict, settings: dict | None) -> TrainedSet:
  if settings is not None:
    return TrainedSet(dict(settings["memory"]), int(settings["lora_rank"]), True)
  ranks = {v.shape[-1] for k, v in leaves.items() if k.endswith("/lora_a")}
  return TrainedSet({"attention_type": "edgeinfinite", **_form(leaves, path)},
                    ranks.pop() if ranks else 0, False)


def check_trained_settings(path: str, options: dict, where: str,
                           flags: dict | None = None) -> TrainedSet:
  """The set at ``path``, after checking that every option in ``options`` that it
  recorded has its recorded value: a ConfigError names both values otherwise (a gate
  served with other sizes or positions than it was trained with reads noise).
  ``flags`` names an option as the caller's user knows it (``{"n_window": "--window"}``);
  else it is ``WHERE.KEY``."""
  info = trained_set(path)
  _check_settings(info, path, options, where, flags)
  return info


def _check_settings(info: TrainedSet, path: str, options: dict, where: str,
                    flags: dict | None = None) -> None:
  for key, value in options.items():
    if key in info.memory and info.memory[key] != value:
      name = (flags or {}).get(key, f"{where}.{key}")
      raise ConfigError(f"{name}={value!r}: the trained set {path} was trained with "
                        f"{key}={info.memory[key]!r} (serve it with that, or retrain)")


def load_trained_set(config: ModelConfig, params, path: str, *, rng, where: str = "memory",
                     **memory_options):
  """A base model with the trained set at ``path`` (read once): the memory and gate of
  the set's recorded settings, its adapters merged into the kernels when it has any ->
  (config, params, TrainedSet). ``memory_options`` (the engine's Scenario sizes and
  positions, say) must agree with what the set recorded (``check_trained_settings``,
  named ``WHERE.KEY``); they fill in what an older file did not record."""
  leaves, settings = lora.read_subset(path, "trained set")
  info = _trained_set(path, leaves, settings)
  _check_settings(info, path, memory_options, where)
  config, params = with_memory(config, params, rng=rng, **{**info.memory, **memory_options})
  pattern = PATTERN
  if info.lora_rank:
    config, params = lora.with_lora(config, params, rank=info.lora_rank, rng=rng)
    pattern = f"(?:{PATTERN})|(?:{lora.PATTERN})"
  params = lora.set_subset(params, leaves, pattern, "trained set", path)
  config, params = lora.merge(config, params)
  return config, params, info
