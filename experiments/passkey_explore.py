"""Quick passkey experiments (see experiments/NOTES_passkey.md).

  .venv/bin/python experiments/passkey_explore.py hidden=128 heads=2 steps=300 ...

Trains a small model on passkey samples (segmented, memory on) and scores the
teacher-forced exact match of the answer digits (== greedy exact match) at the
training length and at multiples of it, with the key outside the local reach,
for edgeinfinite and for streaming with the same cache (same params).
"""

import sys
import time

import jax
import ml_collections
import numpy as np

from edgeinfinite_jax.model import transformer as model_lib
from edgeinfinite_jax.train import optim, trainer as train
from edgeinfinite_jax.data import tasks
from edgeinfinite_jax.model.config import ModelConfig
from edgeinfinite_jax.checkpoints.tokenizer import ByteTokenizer

A = dict(hidden=128, inter=256, layers=2, heads=2, kv=2, seg=64, win=64, sink=4, train_len=512,
         steps=300, batch=8, lr=3e-3, rule="delta", gate="per_head_scalar", rope=0, digits=5,
         lens="1,4,8", n_eval=16, trunc=0, bias=-2.0, seed=0, trainable="all", gate_lr=1.0,
         wd=0.0, warm=30, rel=0, fullloss=0, near=1)
for item in sys.argv[1:]:
  k, v = item.split("=")
  A[k] = type(A[k])(v)
print(A, flush=True)
tok = ByteTokenizer()
mem = dict(attention_type="edgeinfinite", segment_len=A["seg"], n_window=A["win"],
           n_sink=A["sink"], update_rule=A["rule"], gate=A["gate"], mem_uses_rope=bool(A["rope"]),
           truncate_every=A["trunc"], gate_init_bias=A["bias"],
           rope_positions="cache_relative" if A["rel"] else "absolute")
cfg = ModelConfig(hidden_size=A["hidden"], intermediate_size=A["inter"], num_layers=A["layers"],
                  num_heads=A["heads"], num_kv_heads=A["kv"], max_position_embeddings=65536
                  ).with_memory(**mem)
ocfg = ml_collections.ConfigDict(dict(lr=A["lr"], warmup_steps=A["warm"], min_lr_ratio=0.1, b1=0.9,
                                      b2=0.95, eps=1e-8, weight_decay=A["wd"], clip_norm=1.0,
                                      trainable=A["trainable"], groups=None))
if A["trainable"] == "all" and A["gate_lr"] != 1.0:
  ocfg.groups = optim.partition([(optim.GATE, A["gate_lr"], 0.0)], 1.0)
groups = optim.groups_from_config(ocfg)
abstract = model_lib.abstract_params(cfg)
trainable = optim.trainable_paths(abstract, groups)
tx = optim.make_optimizer(ocfg, groups, abstract, A["steps"])
state = train.make_train_state(cfg, tx, trainable, jax.random.key(A["seed"]))
step_fn = jax.jit(lambda s, b: train.train_step(s, b, model_config=cfg, tx=tx, trainable=trainable,
                                                rng=jax.random.key(1)), donate_argnums=0)
L = A["train_len"]


def batch(step):
  s = [tasks.passkey(tok, L, float(np.random.default_rng([A["seed"], step, i]).random()), A["seed"],
                     step * A["batch"] + i, digits=A["digits"]) for i in range(A["batch"])]
  b = tasks.make_batch(s, L, tok.pad_id)
  if A["fullloss"]:  # loss on every real token, answer weighted x fullloss
    b["loss_mask"] = (b["tokens"] != tok.pad_id) * 1.0 + (A["fullloss"] - 1) * b["loss_mask"]
  return b


t0 = time.time()
for step in range(A["steps"]):
  state, m = step_fn(state, batch(step))
  if (step + 1) % 50 == 0:
    print(f"step {step + 1} loss {float(m['loss']):.4f} t={time.time() - t0:.0f}s", flush=True)
params = state.params


@jax.jit
def _fwd(c, p, toks):
  return model_lib.Transformer(c).apply(p, toks)


fwd = jax.jit(lambda p, t, c: model_lib.Transformer(c).apply(p, t), static_argnums=2)


def score(c, length, near=False):
  reach = A["win"] + A["seg"]
  hits = []
  for depth in ((1.0,) if near else (0.0, 0.5, 0.9)):
    ss = []
    for i in range(A["n_eval"]):
      s = tasks.passkey(tok, length, depth, 1000 + A["seed"], i, digits=A["digits"])
      if (tasks.key_distance(s) <= reach) != near:
        continue
      ss.append(s)
    if not ss:
      continue
    b = tasks.make_batch(ss, length, tok.pad_id)
    logits = np.asarray(fwd(params, b["tokens"], c))
    for j, s in enumerate(ss):
      pred = logits[j, s.prompt_len - 1:s.length - 1].argmax(-1)
      hits.append(bool(np.all(pred == s.tokens[s.prompt_len:])))
  return float(np.mean(hits)) if hits else float("nan")


res = {}
if A["near"]:
  res["in_window@1x"] = score(cfg, L, near=True)
for mult in [int(x) for x in A["lens"].split(",")]:
  for kind, c in (("edgeinfinite", cfg), ("streaming", cfg.with_memory(attention_type="streaming")),
                  ("knockout", cfg.with_memory(force_gate="local"))):
    if kind != "edgeinfinite" and mult != 1 and kind == "knockout":
      continue
    res[f"{kind}@{mult}x"] = score(c, L * mult)
print("RESULT", A, res, f"train_time={time.time() - t0:.0f}s", flush=True)
