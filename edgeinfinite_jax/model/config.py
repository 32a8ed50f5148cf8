"""Model configuration: one frozen, hashable dataclass per model, validated once.

Experiment files (``experiments/configs/*.py``) describe a model as an
``ml_collections.ConfigDict`` under ``config.model``; ``ModelConfig.from_dict``
turns it into the frozen dataclass the model code uses. Being frozen and
hashable, the dataclass can be a Flax module attribute and a static jit argument
without silent recompiles.

Every rule is checked in ``validate`` before anything is traced or compiled, and
every error names the offending key, its value and the rule it breaks.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping
from edgeinfinite_jax.quant import layer_quant as qapply
from edgeinfinite_jax.quant.qconfig import QuantConfig

ATTENTION_TYPES = ("full", "streaming", "edgeinfinite", "h2o", "snapkv")
EVICTING_TYPES = ("h2o", "snapkv")  # sink + window + a store of kept tokens (eviction.py)
POOLINGS = ("avg", "max")
GATE_FORMS = ("per_head_scalar", "per_head_vector", "mlp")
UPDATE_RULES = ("linear", "delta")
ROPE_POSITIONS = ("absolute", "cache_relative")
FORCE_GATE = ("none", "local", "memory")
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A configuration value breaks a rule; the message names key, value and rule."""


def require(ok: bool, key: str, value: Any, rule: str) -> None:
  """Raises ConfigError naming the key, its value and the rule, unless ``ok``."""
  if not ok:
    raise ConfigError(f"{key}={value!r}: {rule}")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)  # True is no size


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Annotation (a string: ``from __future__ import annotations``) -> (test, expected type).
_TYPE_RULES = {
    "int": (_is_int, "must be an int"),
    "float": (_is_number, "must be a finite number (float or int)"),
    "bool": (lambda v: isinstance(v, bool), "must be a bool"),
    "str": (lambda v: isinstance(v, str), "must be a str"),
    "RopeScaling": (lambda v: isinstance(v, RopeScaling), "must be a RopeScaling"),
    "MemoryConfig": (lambda v: isinstance(v, MemoryConfig), "must be a MemoryConfig"),
}


def check_types(obj, where: str) -> None:
  """Every field of a config dataclass holds its annotated type (ConfigError naming the
  key, the value and the type). Runs before the value rules, which would otherwise fail
  with a bare TypeError (``'16' > 0``) or let NaN through (every comparison is False)."""
  for f in dataclasses.fields(obj):
    test, rule = _TYPE_RULES.get(f.type, (None, None))
    if test is not None:
      require(test(getattr(obj, f.name)), f"{where}.{f.name}", getattr(obj, f.name), rule)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Hugging Face ``rope_scaling`` / ``rope_parameters`` (types: linear, llama3)."""
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    check_types(self, "model.rope_scaling")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  """The attention family (full / streaming / edgeinfinite / h2o / snapkv) and its knobs.

  Attributes:
    attention_type: ``full`` (ordinary causal attention), ``streaming`` (sink +
      block window, nothing else), ``edgeinfinite`` (sink + block window +
      compressive memory blended by a gate), or ``h2o`` / ``snapkv`` (sink + block
      window + ``n_kept`` tokens per KV head chosen, as blocks leave the window, by
      accumulated attention or by an observation window's vote; ``eviction.py``).
    segment_len: tokens per segment L; the window moves in blocks of L.
    n_sink: leading tokens always kept as raw KV.
    n_window: raw-KV window in tokens, a multiple of ``segment_len``.
    gate: gate form, see ``edgeinfinite_jax.model.gate``.
    gate_init_bias: initial gate logit; strongly negative = memory off.
    gate_mlp_hidden: hidden width of the ``mlp`` gate.
    update_rule: ``linear`` or ``delta`` (Infini-attention Eqs. 8 and 9).
    mem_uses_rope: memory sees RoPE'd Q/K instead of pre-RoPE (the default).
    rope_positions: ``absolute`` token indices for the local branch, or
      ``cache_relative`` indices inside [sink; window; segment].
    eps: added to the retrieval denominators.
    remat: rematerialise the per-segment body during training.
    truncate_every: stop gradients through the memory every k segments
      (0 = full backpropagation through all segments).
    force_gate: ``none``, or ``local`` / ``memory`` to pin the gate (knockout
      ablations and equivalence tests).
    key_block: ``full`` attention in float: keys per step of the running-softmax
      attention (``attention.blockwise_attention``; working memory O(T x key_block)
      and an engine step visits only the filled part of its cache). 0 = one softmax
      over all keys: the form of exported graphs (edge runtimes take no loop whose
      trip count is a traced value). Numerics agree to float32 rounding.
    n_kept: ``h2o`` / ``snapkv``: tokens kept beside sink and window, per KV head
      and layer (the eviction budget; >= 1). Other types ignore it.
    obs_window: ``snapkv``: voting queries, the last ones of the block before each
      eviction (SnapKV's window_size, published default 32; <= segment_len).
    pool_kernel: ``snapkv``: width of the 1-D pooling over positions (odd; the
      published code's default 5).
    pooling: ``snapkv``: ``avg`` (the published code's default) or ``max``.
  """
  attention_type: str = "full"
  segment_len: int = 64
  n_sink: int = 4
  n_window: int = 64
  gate: str = "per_head_scalar"
  gate_init_bias: float = -6.0
  gate_mlp_hidden: int = 16
  update_rule: str = "delta"
  mem_uses_rope: bool = False
  rope_positions: str = "absolute"
  eps: float = 1e-6
  remat: bool = True
  truncate_every: int = 0
  force_gate: str = "none"
  key_block: int = 1024
  n_kept: int = 0
  obs_window: int = 32
  pool_kernel: int = 5
  pooling: str = "avg"

  def __post_init__(self):
    check_types(self, "model.memory")  # the value rules need the model: ``validate``

  @property
  def window_blocks(self) -> int:
    return self.n_window // self.segment_len

  @property
  def segmented(self) -> bool:
    return self.attention_type != "full"

  @property
  def uses_memory(self) -> bool:
    return self.attention_type == "edgeinfinite"

  @property
  def evicts(self) -> bool:
    return self.attention_type in EVICTING_TYPES


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-family decoder (Llama 2/3, Qwen2-style q/k/v bias, GQA/MQA)."""
  vocab_size: int = 259
  hidden_size: int = 128
  intermediate_size: int = 384
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 0  # 0: hidden_size // num_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  dtype: str = "float32"  # compute dtype; parameters are always float32
  memory: MemoryConfig = MemoryConfig()
  lora_rank: int = 0  # > 0: low-rank adapters on the q/k/v projections (model/lora.py)

  def __post_init__(self):
    if self.head_dim == 0 and isinstance(self.num_heads, int) and self.num_heads > 0:
      require(isinstance(self.hidden_size, int) and self.hidden_size % self.num_heads == 0,
               "model.hidden_size", self.hidden_size,
               f"must be divisible by num_heads={self.num_heads} (or set head_dim explicitly)")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    validate(self)

  @property
  def num_groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> "ModelConfig":
    _reject_unknown(type(self), changes, "model")
    return dataclasses.replace(self, **changes)

  def with_memory(self, **changes) -> "ModelConfig":
    _reject_unknown(MemoryConfig, changes, "model.memory")
    return self.replace(memory=dataclasses.replace(self.memory, **changes))

  def check_sequence_length(self, seq_len: int, key: str = "data.seq_len") -> None:
    """Training sequences of ``seq_len`` tokens against ``max_position_embeddings``.

    Full attention sees every position 0..seq_len-1: past max_position_embeddings it
    runs on RoPE angles the model was not built for, and a saved config would claim a
    shorter context than it was trained on, so that is a ConfigError (raise
    model.max_position_embeddings to train longer from scratch). A segmented model
    with ``rope_positions='absolute'`` exists to read past it, but its local branch
    sees those positions too: a warning. ``cache_relative`` positions stay below
    n_sink + n_window + segment_len whatever the length.
    """
    limit, m = self.max_position_embeddings, self.memory
    if seq_len <= limit or (m.segmented and m.rope_positions == "cache_relative"):
      return
    require(m.segmented, key, seq_len,
             f"exceeds model.max_position_embeddings={limit} with full attention; raise "
             "max_position_embeddings or shorten the sequences")
    warnings.warn(f"{key}={seq_len} exceeds model.max_position_embeddings={limit}: the "
                  f"{m.attention_type} model's local branch sees absolute positions the "
                  "base model never saw (rope_positions='cache_relative' keeps them "
                  "bounded)", stacklevel=2)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds from a (possibly nested) mapping, e.g. ``config.model``."""
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    d["rope_scaling"] = _sub(RopeScaling, d.get("rope_scaling"), "model.rope_scaling")
    d["memory"] = _sub(MemoryConfig, d.get("memory"), "model.memory")
    _reject_unknown(cls, d, "model")
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _sub(cls, value, where):
  if value is None:
    return cls()
  if isinstance(value, cls):
    return value
  value = dict(value.to_dict() if hasattr(value, "to_dict") else value)
  _reject_unknown(cls, value, where)
  return cls(**value)


def _reject_unknown(cls, d, where):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ConfigError(f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                      f"valid keys: {', '.join(sorted(known))}")


def check_cache_layout(segment_len, n_sink: int, n_window: int, where: str) -> None:
  """The rules of a segmented cache layout, shared by ``model.memory`` and the engine's
  ``Scenario`` (``where`` names the one being checked)."""
  require(segment_len > 0, f"{where}.segment_len", segment_len, "must be > 0")
  require(n_sink >= 0, f"{where}.n_sink", n_sink, "must be >= 0")
  require(n_window >= 0 and n_window % segment_len == 0, f"{where}.n_window", n_window,
           f"must be >= 0 and a multiple of segment_len={segment_len}")
  require(n_sink <= segment_len, f"{where}.n_sink", n_sink,
           f"must be <= segment_len={segment_len} (sink tokens come from the first segment)")


def check_eviction(m: MemoryConfig, n_kept, segment_len, n_kept_key: str,
                   segment_key: str) -> None:
  """The budget rules of an evicting type (``h2o``, ``snapkv``) at a given budget and
  segment length, shared by ``model.memory`` and the engine's ``Scenario`` (the keys
  name where each value came from)."""
  require(n_kept >= 1, n_kept_key, n_kept,
          f"must be >= 1 for {m.attention_type} (the kept tokens per KV head; "
          "streaming keeps none)")
  if m.attention_type == "snapkv":
    require(m.obs_window <= segment_len, "model.memory.obs_window", m.obs_window,
            f"must be <= {segment_key}={segment_len}: snapkv's voting queries are the last "
            "ones of the block before each eviction")


def validate(c: ModelConfig) -> None:
  """Checks every rule of a model config; raises ConfigError naming the key."""
  check_types(c, "model")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
              "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
    v = getattr(c, key)
    require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
             f"model.{key}", v, "must be a positive integer")
  require(c.head_dim % 2 == 0, "model.head_dim", c.head_dim, "must be even (RoPE rotates pairs)")
  require(c.num_heads % c.num_kv_heads == 0, "model.num_kv_heads", c.num_kv_heads,
           f"must divide num_heads={c.num_heads}")
  require(c.rms_norm_eps > 0, "model.rms_norm_eps", c.rms_norm_eps, "must be > 0")
  require(c.rope_theta > 0, "model.rope_theta", c.rope_theta, "must be > 0")
  require(c.dtype in DTYPES, "model.dtype", c.dtype, f"must be one of {DTYPES}")
  require(0 <= c.lora_rank <= min(c.hidden_size, c.num_kv_heads * c.head_dim),
          "model.lora_rank", c.lora_rank,
          "must be 0 (no adapters) or a rank no larger than the projections it adapts "
          f"(hidden {c.hidden_size}, k/v width {c.num_kv_heads * c.head_dim})")
  r = c.rope_scaling
  require(r.rope_type in ROPE_TYPES, "model.rope_scaling.rope_type", r.rope_type,
           f"must be one of {ROPE_TYPES}")
  require(r.factor > 0, "model.rope_scaling.factor", r.factor, "must be > 0")
  if r.rope_type == "llama3":
    require(r.high_freq_factor > r.low_freq_factor, "model.rope_scaling.high_freq_factor",
             r.high_freq_factor, f"must exceed low_freq_factor={r.low_freq_factor}")
  m = c.memory
  require(m.attention_type in ATTENTION_TYPES, "model.memory.attention_type",
           m.attention_type, f"must be one of {ATTENTION_TYPES}")
  require(m.gate in GATE_FORMS, "model.memory.gate", m.gate, f"must be one of {GATE_FORMS}")
  require(m.update_rule in UPDATE_RULES, "model.memory.update_rule", m.update_rule,
           f"must be one of {UPDATE_RULES}")
  require(m.rope_positions in ROPE_POSITIONS, "model.memory.rope_positions",
           m.rope_positions, f"must be one of {ROPE_POSITIONS}")
  check_cache_layout(m.segment_len, m.n_sink, m.n_window, "model.memory")
  require(m.gate_mlp_hidden > 0, "model.memory.gate_mlp_hidden", m.gate_mlp_hidden,
           "must be > 0")
  require(m.force_gate in FORCE_GATE, "model.memory.force_gate", m.force_gate,
           f"must be one of {FORCE_GATE}")
  require(m.eps > 0, "model.memory.eps", m.eps, "must be > 0")
  require(m.key_block >= 0, "model.memory.key_block", m.key_block,
          "must be >= 0 (0 = one softmax over all keys)")
  require(m.truncate_every >= 0, "model.memory.truncate_every", m.truncate_every,
           "must be >= 0 (0 = full backpropagation)")
  require(m.n_kept >= 0, "model.memory.n_kept", m.n_kept, "must be >= 0")
  require(m.obs_window >= 1, "model.memory.obs_window", m.obs_window, "must be >= 1")
  require(m.pool_kernel >= 1 and m.pool_kernel % 2 == 1, "model.memory.pool_kernel",
          m.pool_kernel, "must be an odd int >= 1 (pooling keeps every position)")
  require(m.pooling in POOLINGS, "model.memory.pooling", m.pooling,
          f"must be one of {POOLINGS}")
  if m.evicts:
    check_eviction(m, m.n_kept, m.segment_len, "model.memory.n_kept",
                   "model.memory.segment_len")


@dataclasses.dataclass(frozen=True)
class QuantModelConfig(ModelConfig):
  """A ModelConfig plus the ``QuantConfig`` the model runs with (None = float).

  Validated on construction: the quant config's own rules, then the rules that
  need the model's sizes (group sizes dividing dimensions, integer accumulator
  depths), so bad settings raise before anything is traced.
  """
  quant: Any = None

  def __post_init__(self):
    super().__post_init__()
    q = self.quant
    if q is not None and not isinstance(q, QuantConfig):
      if not hasattr(q, "keys"):
        raise ConfigError(f"model.quant={q!r}: must be a QuantConfig, a mapping or None")
      object.__setattr__(self, "quant", QuantConfig.from_dict(q))
    qapply.check_model(self)

  @classmethod
  def from_dict(cls, d) -> "QuantModelConfig":
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    quant = d.pop("quant", None)
    base = ModelConfig.from_dict(d)
    return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(ModelConfig)},
               quant=quant)


def quantized(config: ModelConfig, quant) -> ModelConfig:
  """``config`` running with ``quant`` (a QuantConfig or its dict); None -> plain ModelConfig."""
  fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**fields) if quant is None else QuantModelConfig(**fields, quant=quant)


def quant_of(config):
  """The QuantConfig a model config carries, or None."""
  return getattr(config, "quant", None)
