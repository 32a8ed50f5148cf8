"""Low-rank adapters on q/k/v (model/lora.py) and trained-subset files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from edgeinfinite_jax.model import gate as gate_lib
from edgeinfinite_jax.model import lora
from edgeinfinite_jax.model import transformer as model_lib
from edgeinfinite_jax.model.config import ConfigError, ModelConfig
from edgeinfinite_jax.quant import ptq, qconfig
from edgeinfinite_jax.train import optim

RNG = np.random.default_rng(0)  # reseeded per test (conftest)
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, max_position_embeddings=256)
MEMORY = dict(segment_len=16, n_window=16, n_sink=4, gate="mlp")


def _base():
  return CONFIG, model_lib.init_params(CONFIG, jax.random.key(0))


def _tokens(t=40):
  return jnp.asarray(RNG.integers(0, CONFIG.vocab_size, (2, t)), jnp.int32)


def _perturbed(params, scale=0.3):
  """Adapters moved away from zero (a fresh one is the base model exactly)."""
  flat = traverse_util.flatten_dict(params["params"])
  for k, v in flat.items():
    if k[-1] == "lora_b":
      flat[k] = jnp.asarray(RNG.normal(0, scale, v.shape), jnp.float32)
  return {**params, "params": traverse_util.unflatten_dict(flat)}


def test_fresh_adapters_are_the_base_model():
  config, params = _base()
  lc, lp = lora.with_lora(config, params, rank=4, rng=jax.random.key(1))
  tokens = _tokens()
  np.testing.assert_array_equal(np.asarray(model_lib.forward(lc, lp, tokens)),
                                np.asarray(model_lib.forward(config, params, tokens)))
  # The adapters are the leaves with_lora added, and init_params declares the same ones.
  declared = lora.subset(model_lib.init_params(lc, jax.random.key(2)), lora.PATTERN)
  added = lora.subset(lp, lora.PATTERN)
  assert set(declared) == set(added)
  assert all(declared[k].shape == added[k].shape for k in added)
  assert len(added) == 2 * len(lora.TARGETS) * config.num_layers


def test_merge_is_the_same_function_on_both_paths():
  """Training path (segmented, with memory) and full attention: the adapted model and its
  merged kernels agree to float32 rounding, and differ from the base model."""
  base_config, base_params = _base()
  mc, mp = gate_lib.with_memory(base_config, base_params, rng=jax.random.key(3), **MEMORY)
  lc, lp = lora.with_lora(mc, mp, rank=4, rng=jax.random.key(4))
  lp = _perturbed(lp)
  merged_config, merged = lora.merge(lc, lp)
  assert merged_config == mc and not lora.subset(merged, lora.PATTERN)
  tokens = _tokens(56)
  for config_of in (lambda c: c, lambda c: c.with_memory(attention_type="full")):
    want = np.asarray(model_lib.forward(config_of(lc), lp, tokens))
    got = np.asarray(model_lib.forward(config_of(merged_config), merged, tokens))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    base = np.asarray(model_lib.forward(config_of(mc), mp, tokens))
    assert np.abs(base - want).max() > 1e-2


def test_gate_lora_set_trains_gate_and_adapters_only():
  config, params = _base()
  mc, mp = gate_lib.with_memory(config, params, rng=jax.random.key(3), **MEMORY)
  lc, lp = lora.with_lora(mc, mp, rank=4, rng=jax.random.key(4))
  groups = optim.parse_groups("gate+lora")
  paths = optim.trainable_paths(lp, groups)
  want = set(lora.subset(lp, lora.PATTERN)) | set(gate_lib.gate_params(lp))
  assert paths == {f"params/{p}" for p in want}
  h, kv, d = config.hidden_size, config.num_kv_heads * config.head_dim, config.head_dim
  per_layer = 4 * h + 4 * config.num_heads * d + 2 * (4 * h + 4 * kv)  # A [h,r], B [r,out]
  n_lora = sum(int(np.prod(v.shape)) for v in lora.subset(lp, lora.PATTERN).values())
  assert n_lora == per_layer * config.num_layers


def test_subset_file_round_trip_and_mismatch(tmp_path):
  config, params = _base()
  mc, mp = gate_lib.with_memory(config, params, rng=jax.random.key(3), **MEMORY)
  lc, lp = lora.with_lora(mc, mp, rank=4, rng=jax.random.key(4))
  lp = _perturbed(lp)
  pattern = f"(?:{gate_lib.PATTERN})|(?:{lora.PATTERN})"
  path = str(tmp_path / "trained.npz")
  lora.save_subset(lp, path, pattern, "gate+lora")
  _, fresh = lora.with_lora(mc, mp, rank=4, rng=jax.random.key(5))
  loaded = lora.load_subset(fresh, path, pattern, "gate+lora")
  for k, v in lora.subset(lp, pattern).items():
    np.testing.assert_array_equal(np.asarray(lora.subset(loaded, pattern)[k]), np.asarray(v))
  _, rank2 = lora.with_lora(mc, mp, rank=2, rng=jax.random.key(5))
  with pytest.raises(ValueError, match="has shape"):
    lora.load_subset(rank2, path, pattern, "gate+lora")
  with pytest.raises(ValueError, match="do not match"):
    lora.load_subset(fresh, path, gate_lib.PATTERN, "gate")
  with pytest.raises(ValueError, match="no leaf matches"):
    lora.save_subset(params, path, lora.PATTERN, "adapters")


@pytest.mark.parametrize("form", [{"gate": "mlp", "gate_mlp_hidden": 8},
                                  {"gate": "per_head_vector"}, {"gate": "per_head_scalar"}])
def test_a_saved_gate_loads_in_its_own_form(tmp_path, form):
  """``generate --gate`` / ``deploy_check --gate``: the engine takes the gate's form from
  the file (the demo saves an mlp gate; the memory's default form is a scalar)."""
  from edgeinfinite_jax.cli.generate import build_engine
  from edgeinfinite_jax.engine.engine import Scenario
  config, params = _base()
  _, trained = gate_lib.with_memory(config, params, rng=jax.random.key(3),
                                    **{**MEMORY, **form})
  path = str(tmp_path / "gate.npz")
  gate_lib.save_gate(trained, path)
  assert gate_lib.saved_form(path) == form
  engine = build_engine(config, params, "edgeinfinite",
                        Scenario(segment_len=16, n_sink=4, n_window=16), gate_path=path)
  assert engine.route_configs["long"].memory.gate == form["gate"]
  got = gate_lib.gate_params(engine.params)
  for k, v in gate_lib.gate_params(trained).items():
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v))


@pytest.mark.parametrize("rank", [-1, 33])
def test_bad_rank_names_the_key(rank):
  with pytest.raises(ConfigError, match=f"model.lora_rank={rank}"):
    CONFIG.replace(lora_rank=rank)


def test_quantized_kernel_refuses_an_adapter():
  config, params = _base()
  lc, lp = lora.with_lora(config, params, rank=4, rng=jax.random.key(1))
  qp = ptq.quantize_params(lp, qconfig.preset("rtn_per_tensor", weight_bits=8))
  with pytest.raises(ValueError, match="merge the adapters first"):
    model_lib.forward(lc, qp, _tokens())


def test_save_hf_merges_the_adapters(tmp_path):
  """A Hugging Face checkpoint has no adapters: save_hf folds them in (same function)."""
  from edgeinfinite_jax.checkpoints import hf as convert
  config, params = _base()
  lc, lp = lora.with_lora(config, params, rank=4, rng=jax.random.key(1))
  lp = _perturbed(lp)
  convert.save_hf(lc, lp, str(tmp_path))
  loaded_config, loaded = convert.load_hf(str(tmp_path))
  assert loaded_config.lora_rank == 0
  tokens = _tokens()
  np.testing.assert_allclose(np.asarray(model_lib.forward(loaded_config, loaded, tokens)),
                             np.asarray(model_lib.forward(lc, lp, tokens)), atol=2e-5, rtol=1e-5)
