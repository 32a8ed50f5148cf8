"""Shared tiny models for the quantization tests (kept small: every test compiles).

``trained()`` is a byte-level Llama (hidden 32, 2 layers) trained for a few dozen
steps on the embedded corpus, so its logits are peaked enough for greedy
agreement to mean something; cached per process so the quant test files share it.
"""

import functools

import jax
import numpy as np

from edgeinfinite_jax.data import corpus as data_lib
from edgeinfinite_jax import configs
from edgeinfinite_jax.train import optim, trainer as train
from edgeinfinite_jax.model import transformer as model_lib
from edgeinfinite_jax.model.config import ModelConfig
from fast_compile import fast_compiles

VOCAB = 64
SEQ = 32


def tiny(**kw):
  return ModelConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                               num_layers=2, num_heads=4, num_kv_heads=2), **kw})


def tokens(t, seed=0, batch=2, vocab=VOCAB):
  return np.random.RandomState(seed).randint(0, vocab, (batch, t)).astype(np.int32)


@functools.lru_cache(maxsize=1)
def trained(steps=80):
  """(model config, params, held-out batches, calibration batches), byte vocabulary.

  All of it under XLA's cheap compiles, initialisation included: the test files that
  share it run in either mode, and the first caller's mode must not decide its bits."""
  with fast_compiles():
    return _train(steps)


def _train(steps):
  config = configs.base_config()
  config.model.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2)
  config.data.update(seq_len=SEQ, batch_size=8, max_bytes=300_000)
  config.optim.update(lr=3e-3, warmup_steps=10)
  mc = configs.model_config(config)
  split = data_lib.load(config.data)
  groups = optim.groups_from_config(config.optim)
  params = model_lib.init_params(mc, jax.random.key(0))
  trainable = optim.trainable_paths(params, groups)
  tx = optim.make_optimizer(config.optim, groups, params, steps)
  state = train.make_train_state(mc, tx, trainable, jax.random.key(0))
  step = jax.jit(functools.partial(train.train_step, model_config=mc, tx=tx,
                                   trainable=trainable, rng=jax.random.key(1)))
  for s in range(steps):
    state, _ = step(state, data_lib.batch_at(split.train, s, 8, 0))
  held = [b["tokens"] for b in data_lib.eval_batches(split.heldout, 8, 4)]
  calib = [data_lib.batch_at(split.train, 1000 + s, 8, 1)["tokens"] for s in range(2)]
  return mc, jax.device_get(state.params), held, calib
