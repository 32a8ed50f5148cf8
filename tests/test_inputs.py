"""Bad inputs are named before any work: ``forward``'s token rule (the Engine's too), and
the opt-in in-graph checks (``checked=True``: jax.experimental.checkify) for what a
caller's jit hides from the host checks: token ids, intsim scales and zero points."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from edgeinfinite_jax import Engine, Scenario
from edgeinfinite_jax.model import transformer as model
from edgeinfinite_jax.model.config import ModelConfig
from edgeinfinite_jax.quant import intsim

VOCAB = 64


@pytest.fixture(scope="module")
def tiny():
  config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=4, num_kv_heads=2)
  return config, model.init_params(config, jax.random.key(0))


@pytest.mark.parametrize("tokens, message", [
    (np.array([[3, VOCAB]]), r"tokens: ids must lie in \[0, 64\), got \[3, 64\]"),
    (np.array([[-1, 3]]), r"tokens: ids must lie in \[0, 64\), got \[-1, 3\]"),
    (np.zeros((1, 0), np.int32), r"tokens: shape \[1, 0\] is empty"),
    (np.zeros((0, 4), np.int32), r"tokens: shape \[0, 4\] is empty"),
    (np.zeros((1, 4), np.float32), r"integer array of rank 2 \[batch, time\], got float32\[1, 4\]"),
    (np.zeros((1, 4), bool), r"got bool\[1, 4\]"),
    (np.zeros((4,), np.int32), r"rank 2 \[batch, time\], got int32\[4\]"),
])
def test_forward_refuses_bad_tokens_by_name(tiny, tokens, message):
  """They used to give NaN logits (id >= vocab), wrap around (id -1 == id 63) or raise
  ZeroDivisionError from inside JAX (an empty sequence)."""
  config, params = tiny
  with pytest.raises(ValueError, match=message):
    model.forward(config, params, tokens)


def test_forward_and_engine_share_one_token_rule(tiny):
  config, params = tiny
  engine = Engine(config, params, Scenario(segment_len=8, n_window=8, n_sink=2, batch_size=1,
                                           max_new_tokens=4, short_threshold=4, max_context=32))
  bad = np.array([[5, VOCAB + 2]])
  with pytest.raises(ValueError) as from_forward:
    model.forward(config, params, bad)
  with pytest.raises(ValueError) as from_engine:
    engine.prefill(bad)
  rule = "ids must lie in [0, 64), got [5, 66]"
  assert str(from_forward.value) == "tokens: " + rule
  assert str(from_engine.value) == "prefill tokens: " + rule
  np.testing.assert_array_equal(  # python lists and int64 are fine: cast to int32
      model.forward(config, params, [[1, 2, 3]]),
      model.forward(config, params, np.array([[1, 2, 3]], np.int64)))


def test_under_jit_the_range_is_unchecked_unless_asked(tiny):
  """What forward's docstring says: traced ids get the shape rule only (a NaN row for an
  id past the vocabulary); checked=True under checkify turns them into an error."""
  config, params = tiny
  tokens = np.array([[1, 2, VOCAB]], np.int32)
  logits = jax.jit(lambda p, t: model.forward(config, p, t))(params, tokens)
  assert not np.all(np.isfinite(np.asarray(logits)))
  with pytest.raises(ValueError, match="rank 2"):
    jax.jit(lambda p, t: model.forward(config, p, t))(params, tokens[0])

  checked = jax.jit(checkify.checkify(lambda p, t: model.forward(config, p, t, checked=True)))
  err, _ = checked(params, tokens)
  with pytest.raises(checkify.JaxRuntimeError, match=r"ids must lie in \[0, 64\), got \[1, 64\]"):
    err.throw()
  err, _ = checked(params, np.array([[-3, 2, 4]], np.int32))
  assert "got [-3, 4]" in err.get()
  good = np.array([[1, 2, 3]], np.int32)
  err, got = checked(params, good)
  err.throw()  # nothing to throw
  np.testing.assert_array_equal(got, model.forward(config, params, good))
  with pytest.raises(ValueError, match="not functionalized"):  # checks need checkify
    jax.jit(lambda p, t: model.forward(config, p, t, checked=True))(params, good)


def test_intsim_checked_mode_names_a_traced_bad_scale():
  """Concrete scales were always checked; a traced zero scale saturated silently."""
  x = jnp.linspace(-1.0, 1.0, 8)
  plain = jax.jit(lambda x, s: intsim.quantize(x, s, 0, jnp.int8))
  np.testing.assert_array_equal(plain(x, jnp.float32(0.0)), [-128] * 4 + [127] * 4)
  with pytest.raises(ValueError, match=r"scale must be finite and > 0 in float32; got \[0.0\]"):
    intsim.quantize(x, 0.0, 0, jnp.int8, checked=True)

  q = jax.jit(checkify.checkify(lambda x, s, z: intsim.quantize(x, s, z, jnp.int8, checked=True)))
  for s, z, message in ((0.0, 0, r"scale must be finite and > 0 .* got values in \[0.0, 0.0\]"),
                        (np.nan, 0, r"scale must be finite and > 0 .* \[nan, nan\]"),
                        (-0.5, 0, r"scale must be finite and > 0 .* \[-0.5, -0.5\]"),
                        (0.01, 300, r"zero_point must be integers in the int8 range "
                                    r"\[-128, 127\]; got values in \[300, 300\]")):
    err, _ = q(x, jnp.float32(s), jnp.int32(z))
    with pytest.raises(checkify.JaxRuntimeError, match=message):
      err.throw()
  err, got = q(x, jnp.float32(0.01), jnp.int32(3))
  err.throw()
  np.testing.assert_array_equal(got, intsim.quantize(x, 0.01, 3, jnp.int8))
  deq = jax.jit(checkify.checkify(lambda v, s: intsim.dequantize(v, s, 0, checked=True)))
  err, _ = deq(jnp.int8([1, 2]), jnp.float32(np.inf))
  with pytest.raises(checkify.JaxRuntimeError, match=r"scale must be finite .* \[inf, inf\]"):
    err.throw()
