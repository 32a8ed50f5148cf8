"""PTQ of a params tree, orbax save/restore, activation calibration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgeinfinite_jax.model import transformer as model
from edgeinfinite_jax.model.config import ModelConfig
from edgeinfinite_jax.quant import observers as obs
from edgeinfinite_jax.quant import ptq
from edgeinfinite_jax.quant import qconfig as qc
from edgeinfinite_jax.quant import quantizers as qz
from edgeinfinite_jax.quant.quantizers import QuantSpec

RNG = None  # a generator seeded by each test's id, set by conftest before the test
KERNELS = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj",
           "mlp/up_proj", "mlp/down_proj")


@pytest.fixture(scope="module")
def params():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2)
  return model.init_params(cfg, jax.random.key(0))


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def test_w8a8_kernels_per_channel(params):
  qp = ptq.quantize_params(params, qc.preset("w8a8"))
  for i in range(2):
    for name in KERNELS:
      w = _get(params, f"params/layers_{i}/{name}/kernel")
      qt = _get(qp, f"params/layers_{i}/{name}/kernel")
      assert isinstance(qt, ptq.QuantizedTensor) and qt.shape == w.shape
      assert qt.values.dtype == jnp.int8 and qt.values.ndim == 2
      assert int(jnp.abs(qt.values).max()) == 127 and int(qt.values.min()) >= -127
      assert qt.scale.shape == (1, qt.values.shape[1])
      err = jnp.abs(qt.dequantize() - w).reshape(qt.values.shape)
      assert bool(jnp.all(err <= qt.scale * 0.5 * (1 + 1e-5)))
  # o_proj [heads, hd, hidden] flattens its two contraction axes: [heads*hd, hidden].
  assert _get(qp, "params/layers_0/attn/o_proj/kernel").values.shape == (32, 32)
  assert _get(qp, "params/layers_0/attn/k_proj/kernel").values.shape == (32, 16)
  # Norms, embeddings and lm_head (off in w8a8) stay float and untouched.
  for path in ("params/layers_0/attn_norm/scale", "params/embed/embedding",
               "params/lm_head/kernel"):
    assert _get(qp, path) is _get(params, path)
  deq = ptq.dequantize_params(qp)
  assert jax.tree.structure(deq) == jax.tree.structure(params)


def test_int4_per_group_and_rtn_per_tensor(params):
  fg = ptq.quantize_params(params, qc.fine_grained("w4a8", group_size=16))
  qt = _get(fg, "params/layers_1/mlp/down_proj/kernel")  # [64, 32] -> 4 groups along K
  assert qt.values.dtype == jnp.int8 and int(qt.values.min()) >= -7 and int(qt.values.max()) <= 7
  assert qt.scale.shape == (4, 32) and qt.spec.axis == 0
  rtn = ptq.quantize_params(params, qc.rtn_per_tensor(4))
  assert _get(rtn, "params/layers_1/mlp/down_proj/kernel").scale.shape == ()
  with pytest.raises(ValueError, match=r"attn/[qk]_proj/kernel \(32, .*group_size=24.*dim"
                                       r"ension 32"):
    ptq.quantize_params(params, qc.fine_grained("w4a8", group_size=24))


def test_per_group_beats_per_tensor_on_outlier_kernel():
  w = RNG.standard_normal((128, 24)).astype(np.float32) * 0.02
  w[3, 1], w[90, 20] = 1.5, -2.0
  err = lambda spec: float(jnp.mean((ptq.quantize_tensor(w, spec).dequantize() - w) ** 2))
  assert err(QuantSpec(4, granularity="per_group", group_size=32)) < 0.2 * err(QuantSpec(4))
  # Clipping search (MSE observer) on heavy-tailed weights beats plain min/max.
  t = RNG.standard_t(3.0, (1024, 4)).astype(np.float32)
  spec = QuantSpec(4, granularity="per_channel")
  err = lambda obs: float(jnp.mean((ptq.quantize_tensor(t, spec, observer=obs).dequantize()
                                    - t) ** 2))
  assert err(obs.MseObserver()) < 0.7 * err(None)


@pytest.mark.slow
def test_embeddings_and_lm_head(params):
  c = qc.QuantConfig(mode="fake_quant", embeddings=QuantSpec(8, granularity="per_channel"),
                     lm_head=QuantSpec(8, granularity="per_group", group_size=16))
  qp = ptq.quantize_params(params, c)
  emb = _get(qp, "params/embed/embedding")
  assert emb.values.shape == (64, 32) and emb.scale.shape == (64, 1)  # one scale per row
  assert _get(qp, "params/lm_head/kernel").scale.shape == (2, 64)  # groups along hidden
  assert not isinstance(_get(qp, "params/layers_0/attn/q_proj/kernel"), ptq.QuantizedTensor)


def test_save_restore_identical(params, tmp_path):
  qp = ptq.quantize_params(params, qc.fine_grained("w4a8", group_size=16))
  path = tmp_path / "w4"
  ptq.save_quantized(path, qp)
  got = ptq.restore_quantized(path)
  assert jax.tree.structure(got) == jax.tree.structure(qp)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(qp)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  qt, rt = (_get(t, "params/layers_0/attn/o_proj/kernel") for t in (qp, got))
  assert (rt.spec, rt.shape, rt.dtype) == (qt.spec, qt.shape, qt.dtype)
  with pytest.raises(ValueError):
    ptq.save_quantized(path, qp)  # no silent overwrite
  ptq.save_quantized(path, qp, overwrite=True)


def test_calibration():
  c = qc.preset("w8a8").replace(quantize_o_input=False)
  specs = ptq.activation_specs(c, num_layers=2)
  assert "layers_1/q" in specs and "layers_0/o_input" not in specs
  assert specs["layers_0/attn_probs"] == c.attn_probs
  assert not ptq.activation_specs(qc.fine_grained("w4a8"), 1).get("layers_0/attn_input")
  states = ptq.init_calibration({k: specs[k] for k in ("layers_0/q", "layers_0/attn_input")})
  b1, b2 = RNG.standard_normal((2, 5, 4, 8)), RNG.standard_normal((2, 5, 4, 8)) * 2
  for batch in (b1, b2):
    states = ptq.update_calibration(states, {"layers_0/q": batch})
  scale, zp = ptq.calibrated_qparams({"layers_0/q": states["layers_0/q"]})["layers_0/q"]
  both = np.concatenate([b1, b2])
  ref = qz.qparams_from_range(both.min(), both.max(), specs["layers_0/q"])
  np.testing.assert_array_equal(scale, ref[0])
  np.testing.assert_array_equal(zp, ref[1])
  with pytest.raises(ValueError, match=r"layers_0/attn_input: observer has seen no data"):
    ptq.calibrated_qparams(states)
  with pytest.raises(ValueError, match=r"\['layers_9/q'\] have no observer"):
    ptq.update_calibration(states, {"layers_9/q": b1})
