"""The engine over a million tokens: outputs stay finite, the state stays one size.

Its own module because running, not compiling, is its cost: tests/test_engine.py runs
under XLA's cheap compiles, which would make this run ~3x slower.
"""

import numpy as np
import pytest

from edgeinfinite_jax import Engine, Scenario, state_nbytes
from test_engine import _model, _tokens


@pytest.mark.slow
def test_a_million_tokens_keep_outputs_finite_and_state_constant():
  cfg, params = _model("edgeinfinite")
  engine = Engine(cfg, params, Scenario(segment_len=256, n_sink=4, n_window=256,
                                        batch_size=1, max_new_tokens=4, short_threshold=0))
  state, logits = engine.prefill(_tokens(1 << 20, batch=1))
  assert int(state.length) == 1 << 20
  size = state_nbytes(state)
  assert size == state_nbytes(engine.prefill(_tokens(5000, batch=1))[0])
  for t in range(3):
    state, logits = engine.decode(state, np.array([t], np.int32))
    assert state_nbytes(state) == size
  assert np.all(np.isfinite(logits))
  assert np.all(np.isfinite(np.asarray(state.caches[0].memory.M)))
