"""Does any head's linear-memory read carry the passkey digits? A linear probe (issue #10).

    PYTHONPATH=. .venv/bin/python experiments/memory_readout_smollm2.py --prompts=160 \\
        --out=results/memory_readout_smollm2.json

Gate S-SFT (experiments/NOTES_passkey.md) never got key information out of the
memory: the digits-only NLL stayed at chance for every gate form. A gate can only
weigh what the read contains, so this asks the question underneath: with the best
possible inputs (the frozen SmolLM2's own activations with the whole context in
view, i.e. the queries of a model that has retrieved the key), does the read
σ(q)M / σ(q)z of a linear memory over the tokens that left the cache hold the
digit the model is about to write, in any of the 270 (layer, head) pairs?

Per passkey prompt (Infini-attention raw format, 512 tokens, key depth uniform
over the out-of-reach range, asserted), one teacher-forced forward of the base
model with its activations captured: pre-RoPE q / k / v per layer (what the
memory stores and reads: EdgeInfinite's default pre-RoPE memory) and the
post-RoPE q / k (what softmax attention uses). At each of the 5 positions that
predict a key digit, the tokens outside sink + window + current segment (the
demo's geometry: segment 128, window 128, sink 4) are the *evicted* ones, and per
head we form three 64-dim reads of them:

* ``memory``: the delta-rule linear memory written with the evicted tokens,
  segment by segment (``memory.update``, the model's own code), read with that
  position's pre-RoPE query (``memory.retrieve``);
* ``memory_linear``: the same with the linear rule (M += σ(K)ᵀV);
* ``memory_rope``: the delta-rule memory of post-RoPE keys read with the post-RoPE
  query (``mem_uses_rope=True``);
* ``softmax``: the head's exact softmax attention over the same evicted tokens
  (post-RoPE q/k, as full attention reads them): an uncompressed read of the same
  tokens, the upper bound of what a read of them can carry.

A ridge-regression probe (one-hot targets, standardized features) per head and
per read kind is fit on the prompts' first ``--train`` fraction and scored on the
rest: accuracy of the digit the model writes next (chance 10%). Reported per
kind: best head, heads above 30%, and a probe on all heads of a layer together;
plus the best head under shuffled training labels (what the max over 270 heads
reaches by chance).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from edgeinfinite_jax.checkpoints import models
from edgeinfinite_jax.data import tasks
from edgeinfinite_jax.model import memory as memory_lib
from edgeinfinite_jax.model.transformer import Transformer

KINDS = ("memory", "memory_linear", "memory_rope", "softmax")


def prompts(tok, n, length, reach, seed):
  """n passkey samples with the key out of reach at the first answer position."""
  out, i = [], 0
  rng = np.random.default_rng(seed)
  while len(out) < n:
    s = tasks.passkey(tok, length, float(rng.uniform(0.0, 0.43)), seed, i)
    i += 1
    if tasks.key_distance(s) > reach:
      out.append(s)
  return out


def capture_fn(model_config):
  """Jitted params, tokens [1, T] -> the captured intermediates (one compile per T)."""
  return jax.jit(lambda p, t: Transformer(model_config).apply(
      p, t, mutable=["intermediates"])[1]["intermediates"])


def captured(fn, model_config, params, tokens):
  """Pre-RoPE q/k/v ("q_out"...) and post-RoPE q/k, numpy [layers, T, heads, d] (batch 1)."""
  inter = fn(params, tokens)
  layers = [inter[f"layers_{i}"]["attn"] for i in range(model_config.num_layers)]
  return {k: np.stack([np.asarray(a[k][0][0], np.float32) for a in layers])
          for k in ("q_out", "k_out", "v_out", "q", "k")}


MEMORIES = (("delta", "memory", "_out"), ("linear", "memory_linear", "_out"),
            ("delta", "memory_rope", ""))  # (rule, kind, "_out" = pre-RoPE q/k)


def memories(acts, start, segment, sink, n_kv, eps=1e-6):
  """Every layer's memory (layers as the batch axis) of the tokens [sink, start), written
  a segment at a time as the engine writes each block that leaves the window."""
  bounds = [sink] + list(range(segment, start, segment)) + [max(start, sink)]
  n_layers, _, _, d = acts["k_out"].shape
  out = {}
  for rule, kind, qk in MEMORIES:
    mem = memory_lib.empty(n_layers, n_kv, d, acts["v_out"].shape[-1])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      if hi > lo:
        mem = memory_lib.update(mem, acts["k" + qk][:, lo:hi], acts["v_out"][:, lo:hi],
                                np.ones(hi - lo, bool), rule, eps)
    out[kind] = mem
  return out


def reads(acts, mems, t, start, sink, n_heads, n_kv, eps=1e-6):
  """The reads {kind: [layers, H, d]} at position t of the tokens evicted before ``start``."""
  evicted = np.arange(sink, max(start, sink))
  g = n_heads // n_kv
  out = {}
  for _, kind, qk in MEMORIES:
    r = memory_lib.retrieve(mems[kind], acts["q" + qk][:, t:t + 1], eps)
    out[kind] = np.asarray(r[:, 0])
  q, k, v = acts["q"][:, t], acts["k"][:, evicted], acts["v_out"][:, evicted]
  kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # [L, E, H, d]
  logits = np.einsum("lhd,lehd->lhe", q, kk) / np.sqrt(q.shape[-1])
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out["softmax"] = np.einsum("lhe,lehd->lhd", p, vv)
  return out


def ridge_accuracy(xtr, ytr, xte, yte, lam=1.0):
  mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
  a, b = (xtr - mu) / sd, (xte - mu) / sd
  y = np.eye(10)[ytr]
  # dual form: n_train may be smaller than the feature count (all heads of a layer)
  w = a.T @ np.linalg.solve(a @ a.T + lam * len(a) * np.eye(len(a)), y - y.mean(0))
  return float(np.mean((b @ w).argmax(-1) == yte))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--prompts", type=int, default=160)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--segment", type=int, default=128)
  p.add_argument("--window", type=int, default=128)
  p.add_argument("--sink", type=int, default=4)
  p.add_argument("--train", type=float, default=0.75)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  t0 = time.perf_counter()
  cfg, params, tok = models.smollm2()
  reach = a.segment + a.window
  samples = prompts(tok, a.prompts, a.length, reach, a.seed)
  H, K, L = cfg.num_heads, cfg.num_kv_heads, cfg.num_layers
  feats = {kind: np.zeros((a.prompts, 5, L, H, cfg.head_dim), np.float32) for kind in KINDS}
  digits = np.zeros((a.prompts, 5), np.int64)
  fn = capture_fn(cfg)
  width = a.length + 8  # one padded width: one compile (causal: padding changes nothing)
  for i, s in enumerate(tqdm(samples, desc="prompts", dynamic_ncols=True)):
    tokens = np.full((1, width), tok.pad_id, np.int32)
    tokens[0, :s.prompt_len + 5] = s.tokens[:s.prompt_len + 5]  # " " + 4 digits seen
    acts = captured(fn, cfg, params, tokens)
    cache = {}  # start -> memories: the 5 positions mostly share a segment
    for j in range(5):  # position prompt_len - 1 + j predicts digit j
      t = s.prompt_len - 1 + j
      start = (t // a.segment) * a.segment - a.window  # first token still in the window
      digits[i, j] = int(s.answer.strip()[j])
      if start not in cache:
        cache[start] = memories(acts, start, a.segment, a.sink, K)
      r = reads(acts, cache[start], t, start, a.sink, H, K)
      for kind in KINDS:
        feats[kind][i, j] = r[kind]
  n_tr = int(round(a.train * a.prompts))
  ytr, yte = digits[:n_tr].reshape(-1), digits[n_tr:].reshape(-1)
  shuffled = np.random.default_rng(1).permutation(ytr)
  result = {"prompts": a.prompts, "train_prompts": n_tr, "test_positions": int(yte.size),
            "geometry": dict(segment=a.segment, window=a.window, sink=a.sink, length=a.length),
            "chance": 0.1, "kinds": {}}
  for kind in KINDS:
    f = feats[kind]
    tr = f[:n_tr].reshape(n_tr * 5, L, H, -1)
    te = f[n_tr:].reshape(-1, L, H, f.shape[-1])
    acc = np.zeros((L, H))
    null = np.zeros((L, H))
    for li in range(L):
      for h in range(H):
        acc[li, h] = ridge_accuracy(tr[:, li, h], ytr, te[:, li, h], yte)
        null[li, h] = ridge_accuracy(tr[:, li, h], shuffled, te[:, li, h], yte)
    layer_acc = [ridge_accuracy(tr[:, li].reshape(len(tr), -1), ytr,
                                te[:, li].reshape(len(te), -1), yte) for li in range(L)]
    best = np.unravel_index(acc.argmax(), acc.shape)
    result["kinds"][kind] = {
        "best_head": {"layer": int(best[0]), "head": int(best[1]), "acc": float(acc.max())},
        "heads_above_30pct": int((acc > 0.3).sum()),
        "mean_head_acc": float(acc.mean()),
        "best_layer_all_heads": {"layer": int(np.argmax(layer_acc)),
                                 "acc": float(np.max(layer_acc))},
        "shuffled_labels_best_head": float(null.max()),
        "per_head": acc.round(4).tolist()}
    print(f"{kind:14s} best head L{best[0]}H{best[1]} {acc.max():.1%}  heads>30%: "
          f"{(acc > 0.3).sum():3d}  mean {acc.mean():.1%}  best layer (all heads) "
          f"L{int(np.argmax(layer_acc))} {np.max(layer_acc):.1%}  shuffled-label best head "
          f"{null.max():.1%}", flush=True)
  result["wall_s"] = time.perf_counter() - t0
  if a.out:
    with open(a.out, "w") as fh:
      json.dump(result, fh, indent=1)
  print(f"wall {result['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
  main()
