"""Sharded training on 8 fake CPU devices equals the single-device run.

The device count must be fixed before JAX initialises its backend, so the
8-device run happens in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; this process (one
device) runs the reference.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from edgeinfinite_jax.train import sharding, trainer as train
from edgeinfinite_jax.model.config import ConfigError
from fast_compile import fast_compiles, fast_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared by both processes: GQA (4 heads, 2 KV heads: both divide tensor=2).
CONFIG_CODE = textwrap.dedent("""
    from edgeinfinite_jax import configs
    def make_config(mesh):
      module = configs.load_module(ROOT + "/experiments/configs/pretrain_tiny.py")
      c = module.get_config("tiny")
      c.model.update(num_heads=4, num_kv_heads=2)
      c.data.update(max_bytes=100_000, seq_len=32, batch_size=8)
      c.train.update(steps=4, log_every=1, eval_batches=0, progress=False)
      c.checkpoint.enabled = False
      c.mesh.update(mesh)
      return c
""")

CHILD = CONFIG_CODE + textwrap.dedent("""
    import json, sys, jax
    from edgeinfinite_jax.train import sharding, trainer as train
    from edgeinfinite_jax.model.config import ModelConfig
    assert jax.device_count() == 8, jax.device_count()
    out = train.run(make_config({"data": 2, "fsdp": 2, "tensor": 2}), sys.argv[1])
    p = out["state"].params["params"]["layers_0"]
    mu = out["state"].opt_state[1].mu["params"]["layers_0"]
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    mqa = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                      num_kv_heads=1)
    mqa_sh = sharding.param_shardings(mqa, mesh)["params"]["layers_0"]["attn"]
    print("RESULT" + json.dumps({
        "losses": out["losses"],
        "q_spec": str(p["attn"]["q_proj"]["kernel"].sharding.spec),
        "q_mu_spec": str(mu["attn"]["q_proj"]["kernel"].sharding.spec),
        "up_spec": str(p["mlp"]["up_proj"]["kernel"].sharding.spec),
        "mqa_k_spec": str(mqa_sh["k_proj"]["kernel"].spec),
        "mqa_q_spec": str(mqa_sh["q_proj"]["kernel"].spec),
    }))
""")


@pytest.mark.slow
def test_8_device_mesh_matches_single_device(tmp_path):
  # Both runs with XLA's cheap compiles (tests/fast_compile.py): the child through the
  # environment, the single-device reference here inside fast_compiles().
  env = fast_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
                 PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", f"ROOT = {ROOT!r}\n" + CHILD,
                         str(tmp_path / "sharded")],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  child = json.loads(line[len("RESULT"):])

  scope = {"ROOT": ROOT}
  exec(CONFIG_CODE, scope)
  with fast_compiles():
    ref = train.run(scope["make_config"]({"data": -1, "fsdp": 1, "tensor": 1}),
                    str(tmp_path / "single"))
  assert len(child["losses"]) == 4
  np.testing.assert_allclose(child["losses"], ref["losses"], rtol=0, atol=1e-5)
  # parameters and their Adam moments really are sharded on the 2x2x2 mesh
  assert child["q_spec"] == child["q_mu_spec"] == str(P("fsdp", "tensor", None))
  assert child["up_spec"] == str(P("fsdp", "tensor"))
  # MQA: one KV head cannot split over tensor=2, so that axis is dropped
  assert child["mqa_k_spec"] == str(P("fsdp", None, None))
  assert child["mqa_q_spec"] == str(P("fsdp", "tensor", None))


def test_logical_to_spec_drops_non_dividing_axes():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  # on one device every rule collapses to replication
  assert sharding.logical_to_spec(("embed", "q_heads", "head_dim"), (8, 4, 2), mesh) == P(
      None, None, None)
  abstract = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  spec = sharding.logical_to_spec(("vocab", "embed"), (259, 64), abstract,
                                  sharding.DEFAULT_RULES)
  assert spec == P(None, "fsdp")  # 259 is odd: tensor dropped
  spec = sharding.logical_to_spec(("batch", "length"), (8, 16), abstract,
                                  sharding.DEFAULT_RULES)
  assert spec == P(("data", "fsdp"), None)
  spec = sharding.logical_to_spec(("batch", "length"), (2, 16), abstract,
                                  sharding.DEFAULT_RULES)
  assert spec == P("data", None)  # 2 rows: only the first batch axis fits


def test_mesh_shape_rules():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {
      "data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ConfigError, match="mesh.fsdp=-1: at most one mesh axis may be -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ConfigError, match="mesh.data=-1: the other axes' product 3"):
    sharding.mesh_shape({"data": -1, "tensor": 3}, 8)
  with pytest.raises(ConfigError, match=r"must equal the device count 8"):
    sharding.mesh_shape({"data": 2, "fsdp": 1, "tensor": 1}, 8)
  with pytest.raises(ConfigError, match="unknown mesh axis mesh.pipeline"):
    sharding.mesh_shape({"pipeline": 2}, 8)


def test_distributed_init_uses_gloo_cpu_collectives(monkeypatch):
  """Without a CPU collectives library, cross-process collectives of CPU processes
  fail; the init path picks gloo (test_multiprocess.py runs it for real)."""
  import ml_collections
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(
      (kw, jax.config.jax_cpu_collectives_implementation)))
  config = ml_collections.ConfigDict({"distributed": {
      "initialize": False, "coordinator_address": "127.0.0.1:1234", "num_processes": 2,
      "process_id": 1}})
  previous = jax.config.jax_cpu_collectives_implementation
  try:
    jax.config.update("jax_cpu_collectives_implementation", None)
    assert not sharding.maybe_initialize_distributed(config) and calls == []
    config.distributed.initialize = True
    assert sharding.maybe_initialize_distributed(config)
    jax.config.update("jax_cpu_collectives_implementation", "mpi")  # a choice is kept
    sharding.maybe_initialize_distributed(config)
  finally:
    jax.config.update("jax_cpu_collectives_implementation", previous)
  args = {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
  assert calls == [(args, "gloo"), (args, "mpi")]
