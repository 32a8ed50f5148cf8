"""Declarative trainable groups and the optimizer (AdamW, clipping, schedule).

A *group* is ``(regex, lr_multiplier | "frozen"[, weight_decay_multiplier])``.
The regex is ``re.fullmatch``-ed against the "/"-joined parameter path, e.g.
``params/layers_0/attn/q_proj/kernel`` or ``params/layers_1/attn/memory_gate/bias``.
Every parameter must match exactly one group; anything else is an error that
lists the unmatched and the doubly-matched paths.

Frozen parameters are not merely masked: the parameter tree is *split* into a
trainable and a frozen subtree, gradients are taken w.r.t. the trainable one
only, and the optimizer state exists only for it. So a "gate" fine-tune of a
large model carries Adam moments for a few hundred numbers, not for every
weight.

Weight decay is decoupled (AdamW) and per leaf: ``optim.weight_decay`` times
the group's multiplier; the default multiplier (None) is 1 for matrices
(``kernel``, ``embedding``) and 0 for everything else (norm scales, biases,
gate parameters), the usual "no decay on norms and biases" rule.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from edgeinfinite_jax.model import gate as gate_lib
from edgeinfinite_jax.model import lora
from edgeinfinite_jax.model.config import ConfigError

FROZEN = "frozen"
DECAYED_LEAVES = ("kernel", "embedding")

# The parameter families trainable groups select; every regex over parameter
# paths in the package is one of these (``layers_3/attn/memory_gate/bias``).
GATE = gate_lib.PATTERN               # the memory gate (EdgeInfinite's only trained part)
LORA = lora.PATTERN                   # low-rank adapters on q/k/v (model.lora_rank > 0)
ATTN_PROJ = r".*/attn/.*_proj/.*"     # q/k/v/o projections (and their quantizer scales)
QUANT = r".*/quant/.*"                # quantizer scales and zero points (QAT)


def partition(selected: Sequence[Sequence[Any]], rest: Any) -> list[tuple]:
  """Groups for ``selected`` ``(regex, lr_mult[, wd_mult])`` plus one for everything else.

  ``rest`` is the remaining parameters' lr multiplier or ``"frozen"``. The rest's
  regex excludes every selected one (negative lookaheads), because each parameter
  must match exactly one group.
  """
  others = "".join(f"(?!{g[0]}$)" for g in selected)
  return [tuple(g) for g in selected] + [(others + ".*", rest)]


# Named trainable sets (``optim.trainable``).
TRAINABLE_SETS: dict[str, list[tuple]] = {
    "all": [(r".*", 1.0)],
    "gate": partition([(GATE, 1.0)], FROZEN),
    "gate+attention": partition([(GATE, 1.0), (ATTN_PROJ, 1.0)], FROZEN),
    "gate+lora": partition([(GATE, 1.0), (LORA, 1.0)], FROZEN),
}


class Group(NamedTuple):
  pattern: str
  lr_mult: float | None  # None = frozen
  wd_mult: float | None  # None = default rule (1 for kernel/embedding, else 0)

  @property
  def frozen(self) -> bool:
    return self.lr_mult is None


def parse_groups(spec: str | Sequence[Sequence[Any]]) -> list[Group]:
  """A preset name or a list of group tuples -> validated ``Group`` list."""
  if isinstance(spec, str):
    if spec not in TRAINABLE_SETS:
      raise ConfigError(f"optim.trainable={spec!r}: must be one of {sorted(TRAINABLE_SETS)}")
    spec = TRAINABLE_SETS[spec]
  groups = []
  for i, g in enumerate(spec):
    where = f"optim.groups[{i}]={tuple(g)!r}"
    if not isinstance(g, (tuple, list)) or len(g) not in (2, 3):
      raise ConfigError(f"{where}: must be (regex, lr_mult|'frozen'[, wd_mult])")
    pattern, lr = g[0], g[1]
    wd = g[2] if len(g) == 3 else None
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ConfigError(f"{where}: regex does not compile ({e})") from None
    if lr == FROZEN:
      lr = None
    elif isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
      raise ConfigError(f"{where}: lr multiplier must be a number >= 0 or 'frozen'")
    if wd is not None and (isinstance(wd, bool) or not isinstance(wd, (int, float)) or wd < 0):
      raise ConfigError(f"{where}: weight-decay multiplier must be a number >= 0 or None")
    groups.append(Group(pattern, None if lr is None else float(lr),
                        None if wd is None else float(wd)))
  if not groups:
    raise ConfigError("optim.groups=[]: at least one group is needed")
  return groups


def groups_from_config(optim_config) -> list[Group]:
  """``optim.groups`` if set, else the ``optim.trainable`` preset."""
  groups = optim_config.get("groups")
  return parse_groups(groups if groups else optim_config.get("trainable", "all"))


def flat_paths(params) -> list[str]:
  return ["/".join(k) for k in traverse_util.flatten_dict(params)]


def flat_paths_and_leaves(params) -> list[tuple[str, Any]]:
  return [("/".join(k), v) for k, v in traverse_util.flatten_dict(params).items()]


def assign(params, groups: Sequence[Group]) -> dict[str, Group]:
  """Maps every parameter path to its one group; raises on gaps and overlaps."""
  compiled = [re.compile(g.pattern) for g in groups]
  out, unmatched, doubled = {}, [], []
  for path in flat_paths(params):
    hits = [g for g, rx in zip(groups, compiled) if rx.fullmatch(path)]
    if not hits:
      unmatched.append(path)
    elif len(hits) > 1:
      doubled.append(f"{path} (by {', '.join(repr(h.pattern) for h in hits)})")
    else:
      out[path] = hits[0]
  if unmatched or doubled:
    msg = ["every parameter must match exactly one trainable group "
           f"(groups: {[g.pattern for g in groups]})"]
    if unmatched:
      msg.append(f"{len(unmatched)} unmatched: {', '.join(unmatched)}")
    if doubled:
      msg.append(f"{len(doubled)} matched more than once: {', '.join(doubled)}")
    raise ConfigError("; ".join(msg))
  return out


def trainable_paths(params, groups: Sequence[Group]) -> frozenset[str]:
  return frozenset(p for p, g in assign(params, groups).items() if not g.frozen)


def split(params, trainable: frozenset[str]):
  """params -> (trainable subtree, frozen subtree); each holds only its leaves."""
  flat = traverse_util.flatten_dict(params)
  t = {k: v for k, v in flat.items() if "/".join(k) in trainable}
  f = {k: v for k, v in flat.items() if "/".join(k) not in trainable}
  return traverse_util.unflatten_dict(t), traverse_util.unflatten_dict(f)


def merge(trainable, frozen):
  """Inverse of ``split``."""
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


def summary(params, groups: Sequence[Group]) -> dict[str, Any]:
  """Trainable parameter count, total count and the trainable share."""
  trainable = trainable_paths(params, groups)
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
  total = sum(int(v.size) for v in flat.values())
  n = sum(int(v.size) for p, v in flat.items() if p in trainable)
  return {"trainable": n, "total": total, "share": n / total if total else 0.0,
          "trainable_tensors": len(trainable), "total_tensors": len(flat)}


# ----------------------------------------------------------------------------- optimizer


def schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio``."""
  lr = float(optim_config.lr)
  warmup = min(int(optim_config.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=lr * float(optim_config.min_lr_ratio))


def _per_leaf(fn_of_path):
  """Evaluates ``fn_of_path`` once per leaf path of a tree (static floats)."""
  return lambda tree: jax.tree_util.tree_map_with_path(
      lambda kp, _: fn_of_path("/".join(str(k.key) for k in kp)), tree)


def _scale_per_leaf(mult_of_path) -> optax.GradientTransformation:
  """Multiplies each update by a static per-parameter factor (lr multiplier)."""
  def update(updates, state, params=None):
    del params
    mults = _per_leaf(mult_of_path)(updates)
    return jax.tree.map(lambda u, m: u * m if m != 1.0 else u, updates, mults), state
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def _decay_per_leaf(wd_of_path) -> optax.GradientTransformation:
  """Adds ``wd * param`` per leaf (decoupled weight decay, AdamW-style)."""
  def update(updates, state, params):
    wds = _per_leaf(wd_of_path)(updates)
    return jax.tree.map(lambda u, p, wd: u + wd * p if wd else u, updates, params, wds), state
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def make_optimizer(optim_config, groups: Sequence[Group], params,
                   total_steps: int) -> optax.GradientTransformation:
  """AdamW over the *trainable subtree* of ``params``.

  Chain: global-norm clip -> Adam moments -> per-leaf decoupled weight decay ->
  per-group lr multiplier -> scheduled lr. Apply it to ``split(...)[0]`` only.
  """
  by_path = assign(params, groups)
  wd = float(optim_config.weight_decay)

  def wd_of(path):
    g = by_path[path]
    default = 1.0 if path.rsplit("/", 1)[-1] in DECAYED_LEAVES else 0.0
    return wd * (default if g.wd_mult is None else g.wd_mult)

  parts = []
  if optim_config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(optim_config.clip_norm)))
  parts += [
      optax.scale_by_adam(b1=float(optim_config.b1), b2=float(optim_config.b2),
                          eps=float(optim_config.eps)),
      _decay_per_leaf(wd_of),
      _scale_per_leaf(lambda path: by_path[path].lr_mult),
      optax.scale_by_learning_rate(schedule(optim_config, total_steps)),
  ]
  return optax.chain(*parts)


def global_norm(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return optax.tree.norm(tree)


def validate(optim_config) -> None:
  """Value rules of ``config.optim`` (the group spec is checked by parse)."""
  c = optim_config
  rules = [
      ("lr", c.lr > 0, "must be > 0"),
      ("warmup_steps", c.warmup_steps >= 0, "must be >= 0"),
      ("min_lr_ratio", 0 <= c.min_lr_ratio <= 1, "must be in [0, 1]"),
      ("b1", 0 <= c.b1 < 1, "must be in [0, 1)"),
      ("b2", 0 <= c.b2 < 1, "must be in [0, 1)"),
      ("eps", c.eps > 0, "must be > 0"),
      ("weight_decay", c.weight_decay >= 0, "must be >= 0"),
      ("clip_norm", c.clip_norm >= 0, "must be >= 0 (0 = no clipping)"),
  ]
  for key, ok, rule in rules:
    if not ok:
      raise ConfigError(f"optim.{key}={c[key]!r}: {rule}")
  groups_from_config(c)

