"""Trainable groups: coverage errors, no state for frozen params, lr multipliers, counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgeinfinite_jax import configs
from edgeinfinite_jax.train import optim, trainer as train
from edgeinfinite_jax.model import transformer as model_lib
from edgeinfinite_jax.model.config import ConfigError, ModelConfig

TOY = {"params": {"embed": {"embedding": jnp.ones((5, 4))},
                  "layer": {"attn": {"q_proj": {"kernel": jnp.ones((4, 4))},
                                     "memory_gate": {"bias": jnp.zeros((2,))}},
                            "norm": {"scale": jnp.ones((4,))}}}}


def _optim_config(**kw):
  c = configs.base_config().optim
  c.update({"warmup_steps": 0, "min_lr_ratio": 1.0, "clip_norm": 0.0, "weight_decay": 0.0,
            **kw})
  return c


def test_every_param_must_match_exactly_one_group():
  with pytest.raises(ConfigError) as e:
    optim.assign(TOY, optim.parse_groups([(r".*/attn/.*", 1.0), (r".*/memory_gate/.*", 1.0)]))
  msg = str(e.value)
  assert "2 unmatched" in msg and "params/embed/embedding" in msg
  assert "params/layer/norm/scale" in msg
  assert "1 matched more than once: params/layer/attn/memory_gate/bias" in msg
  with pytest.raises(ConfigError, match=r"optim.groups\[0\].*lr multiplier"):
    optim.parse_groups([(".*", "fast")])
  with pytest.raises(ConfigError, match="regex does not compile"):
    optim.parse_groups([("(", 1.0)])


def test_presets_partition_a_real_model():
  config = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2).with_memory(attention_type="edgeinfinite",
                                                   segment_len=16, n_window=16, n_sink=2)
  shapes = model_lib.abstract_params(config)
  paths = optim.flat_paths(shapes)
  for name in optim.TRAINABLE_SETS:
    optim.assign(shapes, optim.parse_groups(name))  # raises on gaps/overlaps
  gate = optim.trainable_paths(shapes, optim.parse_groups("gate"))
  assert gate == {p for p in paths if "/memory_gate/" in p} and len(gate) == 2
  ga = optim.trainable_paths(shapes, optim.parse_groups("gate+attention"))
  assert ga == gate | {p for p in paths if re_attn(p)}
  s = optim.summary(shapes, optim.parse_groups("gate"))
  assert s["trainable"] == 2 * 4  # per_head_scalar: one bias per head per layer
  assert s["total"] == sum(x.size for x in jax.tree.leaves(shapes))
  assert s["share"] == pytest.approx(8 / s["total"])


def re_attn(path):
  return "/attn/" in path and path.rsplit("/", 2)[-2].endswith("_proj")


def test_optimizer_state_only_for_trainables_and_frozen_unchanged():
  groups = optim.parse_groups([(r".*/memory_gate/.*", 1.0), (r".*/q_proj/.*", 1.0),
                               (r"(?!.*/memory_gate/)(?!.*/q_proj/).*", "frozen")])
  trainable = optim.trainable_paths(TOY, groups)
  tx = optim.make_optimizer(_optim_config(lr=0.1), groups, TOY, 10)
  t, f = optim.split(TOY, trainable)
  state = tx.init(t)
  n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim)
  assert n_state == 2 * (16 + 2)  # Adam mu and nu for q_proj and the gate only
  grads = jax.tree.map(jnp.ones_like, t)
  updates, _ = tx.update(grads, state, t)
  new = optim.merge(jax.tree.map(lambda p, u: p + u, t, updates), f)
  for path in optim.flat_paths(TOY):
    old_leaf, new_leaf = _leaf(TOY, path), _leaf(new, path)
    if path in trainable:
      assert not np.array_equal(old_leaf, new_leaf), path
    else:
      np.testing.assert_array_equal(old_leaf, new_leaf)


def _leaf(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return np.asarray(tree)


def test_lr_multiplier_and_weight_decay_groups():
  def first_update(groups, **kw):
    tx = optim.make_optimizer(_optim_config(lr=0.1, **kw), optim.parse_groups(groups), TOY, 10)
    grads = jax.tree.map(jnp.ones_like, TOY)
    updates, _ = tx.update(grads, tx.init(TOY), TOY)
    return updates
  rest = r"(?!.*/q_proj/).*"
  u1 = first_update([(r".*/q_proj/.*", 1.0), (rest, 1.0)])
  u3 = first_update([(r".*/q_proj/.*", 3.0), (rest, 1.0)])
  q = lambda u: np.asarray(u["params"]["layer"]["attn"]["q_proj"]["kernel"])
  e = lambda u: np.asarray(u["params"]["embed"]["embedding"])
  np.testing.assert_allclose(q(u3), 3 * q(u1), rtol=1e-6)
  np.testing.assert_allclose(e(u3), e(u1), rtol=1e-6)
  # default weight decay: matrices decay, norms/gates do not; a group can opt out
  wd = first_update([(r".*/q_proj/.*", 1.0, 0.0), (rest, 1.0)], weight_decay=0.5)
  no = first_update([(r".*/q_proj/.*", 1.0), (rest, 1.0)])
  np.testing.assert_allclose(q(wd), q(no), rtol=1e-6)  # opted out
  np.testing.assert_allclose(e(wd), e(no) - 0.1 * 0.5 * 1.0, rtol=1e-6)  # decayed
  scale = lambda u: np.asarray(u["params"]["layer"]["norm"]["scale"])
  np.testing.assert_allclose(scale(wd), scale(no), rtol=1e-6)


@pytest.mark.slow
def test_gate_preset_train_step_changes_only_the_gate():
  config = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                       num_kv_heads=2).with_memory(attention_type="edgeinfinite",
                                                   segment_len=8, n_window=8, n_sink=2)
  groups = optim.parse_groups("gate")
  shapes = model_lib.abstract_params(config)
  trainable = optim.trainable_paths(shapes, groups)
  tx = optim.make_optimizer(_optim_config(lr=0.01), groups, shapes, 10)
  state = train.make_train_state(config, tx, trainable, jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * 4
  step = jax.jit(functools.partial(train.train_step, model_config=config, tx=tx,
                                   trainable=trainable, rng=jax.random.key(1)))
  tokens = jax.random.randint(jax.random.key(2), (2, 40), 0, 256)
  new, metrics = step(state, {"tokens": tokens})
  assert np.isfinite(float(metrics["loss"]))
  for path in optim.flat_paths(state.params):
    changed = not np.array_equal(_leaf(state.params, path), _leaf(new.params, path))
    assert changed == (path in trainable), path
