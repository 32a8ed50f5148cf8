"""Shared check: exported engine steps, reloaded in a fresh process, reproduce the engine."""

import os
import subprocess
import sys

import jax
import numpy as np


def assert_exported_matches_engine(directory, engine, tokens, atol=1e-5):
  """Prefill ``tokens`` and decode one token with ``engine``, then replay the same
  calls through the long-route functions ``engine.export`` wrote to ``directory``,
  in a new Python process that knows nothing but the files."""
  state, logits = engine.prefill(tokens)
  state, logits = engine.decode(state, tokens[:, 0])
  leaves = jax.tree.leaves((engine.params, engine.init_state("long")))
  np.savez(os.path.join(directory, "inputs.npz"), *[np.asarray(x) for x in leaves],
           tokens=tokens)
  np.save(os.path.join(directory, "want.npy"), np.asarray(logits))
  b, t = tokens.shape
  seg = engine.scenario.segment_len
  script = f"""
import numpy as np
from jax.tree_util import tree_unflatten
from edgeinfinite_jax.engine.export import load_exported
d = {str(directory)!r}
prefill, decode = load_exported(d, "prefill_long"), load_exported(d, "decode_long")
data = np.load(d + "/inputs.npz")
tokens = data["tokens"]
leaves = [data[f"arr_{{i}}"] for i in range(len(data.files) - 1)]
params, state = tree_unflatten(prefill.in_tree, leaves + [0, 0])[0][:2]
for s in range(0, {t}, {seg}):
  chunk = np.zeros(({b}, {seg}), np.int32); n = min({seg}, {t} - s)
  chunk[:, :n] = tokens[:, s:s + n]
  state, logits = prefill.call(params, state, chunk, np.int32(n))
state, logits = decode.call(params, state, tokens[:, :1], np.int32(1))
# float ops compile afresh in this process: equal up to float rounding
np.testing.assert_allclose(np.asarray(logits), np.load(d + "/want.npy"), atol={atol})
print("OK")
"""
  res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
