"""Can the frozen model's queries read a passkey out of the linear memory at all?

    .venv/bin/python experiments/memory_probe_smollm2.py --length=2048 --samples=6

The first check of issue #10, before any gate training: on SmolLM2 with
``with_memory`` (segment/window/sink as flagged, delta rule, pre-RoPE memory),
passkey prompts whose key lies outside sink + window + current segment are
scored teacher-forced (the whole prompt plus the answer through the training
path ``forward``) for

* ``full``: the base model (sees everything: the ceiling);
* ``streaming``: sink + window only (the floor: the key is gone);
* ``memory``: edgeinfinite with the gate forced to the memory in every head of
  every layer (what the memory alone gives back);
* ``blend=B``: edgeinfinite with every gate logit at B (sigmoid(B) of each head
  from the memory, the rest local) -- the untrained gate at several strengths;
* ``local``: the knockout, gate forced to local (must equal ``streaming``).

Reported per variant: the mean negative log-likelihood of the key's digit
tokens and the teacher-forced exact match of the whole key (every digit the
argmax), which equals greedy exact match.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from edgeinfinite_jax.model import gate as gate_lib
from edgeinfinite_jax.checkpoints import models
from edgeinfinite_jax.data import tasks
from edgeinfinite_jax.model.transformer import forward


def key_scores(logits, sample) -> tuple[float, bool]:
  """(mean NLL of the key digits, all of them argmax) from teacher-forced logits."""
  start = sample.prompt_len
  n_key = len(sample.tokens) - start - 1  # answer tokens without the EOS
  pred = logits[start - 1:start - 1 + n_key]
  want = sample.tokens[start:start + n_key]
  logp = np.asarray(jax.nn.log_softmax(pred, axis=-1))
  nll = -float(np.mean(logp[np.arange(n_key), want]))
  return nll, bool((pred.argmax(-1) == want).all())


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--length", type=int, default=2048)
  p.add_argument("--samples", type=int, default=6)
  p.add_argument("--depths", default="0.1,0.3,0.5")
  p.add_argument("--segment", type=int, default=256)
  p.add_argument("--window", type=int, default=256)
  p.add_argument("--sink", type=int, default=4)
  p.add_argument("--rule", default="delta", choices=("delta", "linear"))
  p.add_argument("--mem-uses-rope", type=int, default=0)
  p.add_argument("--blends", default="-2.0,0.0")
  p.add_argument("--out", default=None)
  a = p.parse_args(argv)
  config, params, tok = models.smollm2()
  depths = [float(x) for x in a.depths.split(",")]
  samples = [tasks.passkey(tok, a.length, depths[i % len(depths)], 4321, i)
             for i in range(a.samples)]
  reach = a.window + a.segment
  for s in samples:
    assert tasks.key_distance(s) > reach, (tasks.key_distance(s), reach)
  mem = dict(segment_len=a.segment, n_sink=a.sink, n_window=a.window, update_rule=a.rule,
             mem_uses_rope=bool(a.mem_uses_rope))
  variants = {"full": (config, params)}
  variants["streaming"] = gate_lib.with_memory(config, params, rng=jax.random.key(0),
                                               attention_type="streaming", **mem)
  for name, opts in [("memory", dict(force_gate="memory")), ("local", dict(force_gate="local"))] + [
      (f"blend={b}", dict(gate_init_bias=float(b))) for b in a.blends.split(",")]:
    variants[name] = gate_lib.with_memory(config, params, rng=jax.random.key(0), **mem, **opts)
  rows = {}
  for name, (cfg, prm) in variants.items():
    t0 = time.perf_counter()
    fwd = jax.jit(lambda p_, t_, c=cfg: forward(c, p_, t_))
    scores = [key_scores(np.asarray(fwd(prm, s.tokens[None]))[0], s) for s in samples]
    rows[name] = {"key_nll": float(np.mean([x[0] for x in scores])),
                  "exact": float(np.mean([x[1] for x in scores])),
                  "wall_s": time.perf_counter() - t0}
    print(f"{name:>12}: key NLL {rows[name]['key_nll']:.3f}  exact "
          f"{rows[name]['exact']:.0%}  ({rows[name]['wall_s']:.0f} s)", flush=True)
  if a.out:
    with open(a.out, "w") as f:
      json.dump({"args": vars(a), "rows": rows}, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
