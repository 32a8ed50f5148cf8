"""Gate-only segmented SFT (S-SFT) of EdgeInfinite on SmolLM2-135M: does the memory
learn to give back a passkey that streaming attention has lost?

    PYTHONPATH=. nice -n 19 .venv/bin/python experiments/ssft_smollm2.py --train-len=512 \\
        --steps=90 --lr=5e-2 --warmup=5 --gate=mlp --baselines-from=results/ssft_baselines.json \\
        --out=results/ssft_run3_gate_mlp.json --gate-out=results/ssft_run3_gate_mlp.npz

(the run that made ``experiments/gates/smollm2_gate.npz``; ``--steps=0`` first,
with ``--out=results/ssft_baselines.json``, scores only ``full`` and
``streaming`` for reuse; ``--load-gate=FILE --steps=0`` scores a saved gate).

Issue #10. SmolLM2-135M-Instruct (``models.smollm2()``, frozen) is turned into an
EdgeInfinite model by ``gate.with_memory`` (segment / window / sink as flagged,
delta or linear rule, pre- or post-RoPE memory) and only the memory gate is
trained (``optim.TRAINABLE_SETS['gate']``; ``--trainable=gate+qkv`` adds the q/k/v
projections as a larger set) on passkey samples in Infini-attention's raw format
(``tasks.passkey``, the model's own tokenizer), loss on the answer tokens only
(" " + the 5 digits; ``--loss-tokens=7`` adds the EOS, as ``tasks`` masks it:
the EOS after a number is a format question the memory cannot answer, and its
large NLL would dominate the gate's gradient). Every training sample has its key
outside sink + window + current segment (depth uniform over the depths where
``tasks.key_distance > window + segment``), so the answer can only come from
the memory. The step is ``train.train_step`` (AdamW over the trainable subtree,
``optim.make_optimizer``) with a loss that projects to the vocabulary only at
the answer positions (the same cross entropy as ``train.loss_fn`` with the
answer mask, without the [T, vocab] logits of the other positions).

Evaluation, teacher-forced, on held-out prompts (another seed) at
``--eval-mults`` x the training length, depths spread evenly over the range
where the key is out of local reach (asserted per sample):

* ``full``: the base model (sees everything: the ceiling);
* ``streaming``: sink + window, no memory (the floor);
* ``edgeinfinite``: the trained gate;
* ``knockout``: the trained model with the gate forced to local (must equal
  ``streaming``: checked and reported).

Per variant: mean NLL of the 5 digit tokens (``key_nll``), mean NLL of the 6
answer tokens before EOS (" " + digits, ``answer_nll``: what
``memory_probe_smollm2.py`` calls key NLL) and the exact match of all 5 digits
(every one the argmax; equals greedy exact match).

``--measure=512,1024`` only times one train step (after compile) per length.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from edgeinfinite_jax import configs
from edgeinfinite_jax.model import gate as gate_lib
from edgeinfinite_jax.checkpoints import models
from edgeinfinite_jax.train import optim, trainer as train
from edgeinfinite_jax.data import tasks
from edgeinfinite_jax.model.transformer import Transformer

N_ANSWER = 7  # " ", 5 digits, EOS (SmolLM2 writes each digit as one token)
QKV_RE = r".*/attn/[qkv]_proj/.*"  # q/k/v projections (not o_proj)


def max_depth(tok, length, reach, digits=5):
  """Largest depth (grid 0.005) whose key ends more than ``reach`` tokens before the answer."""
  best = None
  for d in np.arange(0.0, 1.0001, 0.005):
    if tasks.key_distance(tasks.passkey(tok, length, float(d), 0, 0, digits=digits)) > reach:
      best = float(d)
  if best is None:
    raise ValueError(f"length {length}: no depth puts the key beyond {reach} tokens")
  return best


def answer_batch(samples, length, pad_id):
  """tokens [B, length] (right-padded) + the answer's target positions and ids."""
  b = tasks.make_batch(samples, length, pad_id)
  pos = np.stack([np.arange(s.prompt_len - 1, s.prompt_len - 1 + N_ANSWER) for s in samples])
  tgt = np.stack([s.tokens[s.prompt_len:s.prompt_len + N_ANSWER] for s in samples])
  for s in samples:
    assert len(s.tokens) - s.prompt_len == N_ANSWER, (len(s.tokens), s.prompt_len)
  return {"tokens": b["tokens"], "pos": pos.astype(np.int32), "tgt": tgt.astype(np.int32)}


def answer_logits(model_config, params, tokens, pos):
  """Logits [B, A, vocab] at positions ``pos`` [B, A] only."""
  model = Transformer(model_config)
  hidden = model.apply(params, tokens, return_hidden=True)
  picked = jnp.take_along_axis(hidden, pos[..., None], axis=1)
  return model.apply(params, picked, method=Transformer.logits)


def answer_loss(trainable, frozen, model_config, batch, rng, n_loss=N_ANSWER - 1):
  """``train.loss_fn`` with an answer mask: mean NLL of the first ``n_loss`` answer tokens
  (default " " + 5 digits; ``N_ANSWER`` adds the EOS, the ``tasks`` loss mask)."""
  del rng
  params = optim.merge(trainable, frozen)
  pos, tgt = batch["pos"][:, :n_loss], batch["tgt"][:, :n_loss]
  logits = answer_logits(model_config, params, batch["tokens"], pos)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
  return jnp.mean(nll), jnp.float32(nll.size)


def train_sample(tok, length, hi, seed, step, row, reach):
  r = np.random.default_rng([seed, step, row, 17])
  s = tasks.passkey(tok, length, float(r.uniform(0.0, hi)), seed, step * 1000 + row)
  assert tasks.key_distance(s) > reach, (tasks.key_distance(s), reach)
  return s


def groups_for(args):
  if args.trainable == "gate":
    return optim.parse_groups("gate")
  return optim.parse_groups(optim.partition(
      [(optim.GATE, 1.0, 0.0), (QKV_RE, args.qkv_lr / args.lr, 0.0)], optim.FROZEN))


def optim_config(args):
  c = configs.base_config().optim
  c.update(lr=args.lr, warmup_steps=args.warmup, weight_decay=0.0, clip_norm=1.0,
           min_lr_ratio=0.1)
  return c


def memory_options(args):
  return dict(segment_len=args.segment, n_window=args.window, n_sink=args.sink,
              update_rule=args.rule, mem_uses_rope=bool(args.mem_uses_rope), gate=args.gate,
              gate_init_bias=args.gate_init_bias, remat=bool(args.remat))


def make_step(model_config, params, args, total_steps):
  groups = groups_for(args)
  trainable = optim.trainable_paths(params, groups)
  tx = optim.make_optimizer(optim_config(args), groups, params, total_steps)
  state = train.TrainState(jnp.zeros((), jnp.int32), params,
                           tx.init(optim.split(params, trainable)[0]))
  step = jax.jit(functools.partial(train.train_step, model_config=model_config, tx=tx,
                                   trainable=trainable, rng=jax.random.key(args.seed),
                                   loss=functools.partial(answer_loss, n_loss=args.loss_tokens)))  # no donation: the frozen leaves are the base model's
  return state, step, optim.summary(params, groups)


def gate_report(params):
  """Per layer: the gate's mean logit per head (and the most open heads overall)."""
  rows = {}
  for k, v in gate_lib.gate_params(params).items():
    if k.endswith("/bias"):
      v = np.asarray(v, np.float64)
      rows[k.split("/")[0]] = (v if v.ndim == 1 else v.mean(-1)).round(3).tolist()
  flat = [(float(x), layer, h) for layer, hs in rows.items() for h, x in enumerate(hs)]
  flat.sort(reverse=True)
  return {"per_layer_head_logit": rows, "top5": flat[:5],
          "mean_logit": float(np.mean([x for x, _, _ in flat]))}


def eval_samples(tok, length, n, hi, reach, seed):
  out = []
  for i in range(n):
    s = tasks.passkey(tok, length, hi * (i + 0.5) / n, seed, i)
    assert tasks.key_distance(s) > reach, (length, i, tasks.key_distance(s), reach)
    out.append(s)
  return out


def score(model_config, params, samples, length, pad_id, batch=8):
  """Teacher-forced answer scores of ``samples``, ``batch`` prompts per forward."""
  fn = jax.jit(lambda p, t, q: answer_logits(model_config, p, t, q))
  rows = []
  for i in range(0, len(samples), batch):
    chunk = samples[i:i + batch]
    b = answer_batch(chunk, length, pad_id)
    logits = np.asarray(fn(params, b["tokens"], b["pos"]))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for j, s in enumerate(chunk):
      nll = -logp[j, np.arange(N_ANSWER), b["tgt"][j]]
      pred = logits[j].argmax(-1)
      # NLL of the key digit among the 10 digit tokens only: ln 10 = 2.303 means the
      # prediction carries no information about *which* digit (format learning only).
      lp_digits = logp[j, 1:6][:, DIGIT_IDS]
      lp_digits = lp_digits - np.log(np.exp(lp_digits).sum(-1, keepdims=True))
      want = [DIGIT_IDS.index(int(t)) for t in b["tgt"][j, 1:6]]
      rows.append({"key_nll": float(nll[1:6].mean()), "answer_nll": float(nll[:6].mean()),
                   "digit_nll": float(-lp_digits[np.arange(5), want].mean()),
                   "exact": bool((pred[1:6] == b["tgt"][j, 1:6]).all()),
                   "pred": tok_decode(pred[:6]), "key": s.answer,
                   "key_distance": tasks.key_distance(s)})
  return rows


_TOK = None
DIGIT_IDS: list[int] = []


def tok_decode(ids):
  return _TOK.decode([int(i) for i in ids])


def summarise(rows):
  out = {}
  if "digit_nll" in rows[0]:
    out["digit_nll"] = float(np.mean([r["digit_nll"] for r in rows]))
  return {**out, "key_nll": float(np.mean([r["key_nll"] for r in rows])),
          "answer_nll": float(np.mean([r["answer_nll"] for r in rows])),
          "exact": int(sum(r["exact"] for r in rows)), "n": len(rows)}


def main(argv=None):
  global _TOK, DIGIT_IDS
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--train-len", type=int, default=512)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--segment", type=int, default=128)
  p.add_argument("--window", type=int, default=128)
  p.add_argument("--sink", type=int, default=4)
  p.add_argument("--rule", default="delta", choices=("delta", "linear"))
  p.add_argument("--mem-uses-rope", type=int, default=0)
  p.add_argument("--gate", default="per_head_scalar",
                 choices=("per_head_scalar", "per_head_vector", "mlp"))
  p.add_argument("--gate-init-bias", type=float, default=-4.0)
  p.add_argument("--trainable", default="gate", choices=("gate", "gate+qkv"))
  p.add_argument("--lr", type=float, default=2e-2, help="gate lr (optim.lr)")
  p.add_argument("--qkv-lr", type=float, default=1e-4, help="q/k/v lr with --trainable=gate+qkv")
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--loss-tokens", type=int, default=N_ANSWER - 1,
                 help="answer tokens in the loss: 6 = ' ' + digits, 7 = with EOS (tasks' mask)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval-mults", default="2,4")
  p.add_argument("--eval-samples", type=int, default=8)
  p.add_argument("--eval-seed", type=int, default=4321)
  p.add_argument("--baselines-from", default=None,
                 help="reuse full/streaming rows of an earlier result JSON with the same eval")
  p.add_argument("--remat", type=int, default=1, help="rematerialise the segment body")
  p.add_argument("--log-every", type=int, default=10)
  p.add_argument("--load-gate", default=None,
                 help="evaluate a saved gate (gate.load_gate) instead of training (--steps=0)")
  p.add_argument("--variants", default="full,streaming,edgeinfinite,knockout")
  p.add_argument("--measure", default=None, help="only time a train step at these lengths")
  p.add_argument("--out", default=None)
  p.add_argument("--gate-out", default=None)
  a = p.parse_args(argv)
  t_start = time.perf_counter()
  config, base_params, tok = models.smollm2()
  _TOK = tok
  DIGIT_IDS = [tok.encode(str(d), add_bos=False)[0] for d in range(10)]
  assert all(len(tok.encode(str(d), add_bos=False)) == 1 for d in range(10))
  reach = a.window + a.segment
  mem = memory_options(a)
  mcfg, params = gate_lib.with_memory(config, base_params, rng=jax.random.key(a.seed), **mem)

  if a.measure:
    for length in [int(x) for x in a.measure.split(",")]:
      hi = max_depth(tok, length, reach)
      state, step, share = make_step(mcfg, params, a, 10)
      batches = [answer_batch([train_sample(tok, length, hi, a.seed, i, r, reach)
                               for r in range(a.batch)], length, tok.pad_id) for i in range(3)]
      t0 = time.perf_counter()
      state, m = step(state, batches[0])
      jax.block_until_ready(m["loss"])
      compile_s = time.perf_counter() - t0
      times = []
      for b in batches[1:]:
        t0 = time.perf_counter()
        state, m = step(state, b)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
      print(f"L={length} batch={a.batch} trainable={share['trainable']} "
            f"({100 * share['share']:.4f}%): first step (compile+run) {compile_s:.1f} s, "
            f"then {', '.join(f'{x:.1f}' for x in times)} s/step", flush=True)
    return None

  hi = max_depth(tok, a.train_len, reach)
  state, step, share = make_step(mcfg, params, a, max(a.steps, 1))
  print(f"trainable {a.trainable}: {share['trainable']:,} of {share['total']:,} params "
        f"({100 * share['share']:.4f}%); train depths [0, {hi}] at {a.train_len} tokens "
        f"(key > {reach} tokens before the answer)", flush=True)
  curve, window = [], []
  t0 = time.perf_counter()
  bar = tqdm(range(a.steps), desc="S-SFT", dynamic_ncols=True)
  for i in bar:
    batch = answer_batch([train_sample(tok, a.train_len, hi, a.seed, i, r, reach)
                          for r in range(a.batch)], a.train_len, tok.pad_id)
    state, m = step(state, batch)
    window.append(float(m["loss"]))
    if (i + 1) % a.log_every == 0 or i + 1 == a.steps:
      g = gate_report(state.params)
      curve.append({"step": i + 1, "loss": float(np.mean(window)),
                    "grad_norm": float(m["grad_norm"]), "gate_mean_logit": g["mean_logit"],
                    "gate_max_logit": g["top5"][0][0]})
      bar.set_postfix(loss=f"{np.mean(window):.3f}", gmax=f"{g['top5'][0][0]:.2f}")
      window = []
  train_s = time.perf_counter() - t0
  trained = state.params
  if a.load_gate:
    trained = gate_lib.load_gate(trained, a.load_gate)
  gates = gate_report(trained)
  if a.steps:
    print(f"trained {a.steps} steps in {train_s:.0f} s; loss {curve[0]['loss']:.3f} -> "
        f"{curve[-1]['loss']:.3f}; gate logits mean {gates['mean_logit']:.2f}, top "
        f"{gates['top5'][:3]}", flush=True)
  if a.gate_out and a.steps:
    os.makedirs(os.path.dirname(a.gate_out) or ".", exist_ok=True)
    gate_lib.save_gate(trained, a.gate_out, mcfg)

  # ---- evaluation
  prior = None
  if a.baselines_from and os.path.exists(a.baselines_from):
    with open(a.baselines_from) as f:
      prior = json.load(f)
  knock_cfg = config.with_memory(attention_type="edgeinfinite", force_gate="local", **mem)
  stream_cfg, stream_params = gate_lib.with_memory(config, base_params, rng=jax.random.key(0),
                                                   attention_type="streaming", **mem)
  evals = {}
  t_eval = time.perf_counter()
  for mult in [float(x) for x in a.eval_mults.split(",")]:
    length = int(round(mult * a.train_len))
    ehi = max_depth(tok, length, reach)
    samples = eval_samples(tok, length, a.eval_samples, ehi, reach, a.eval_seed)
    cell, variants = {}, [("edgeinfinite", mcfg, trained), ("knockout", knock_cfg, trained)]
    if not a.steps and not a.load_gate:  # --steps=0: the baselines only (--baselines-from)
      variants = []
    reuse = prior and prior.get("eval", {}).get(str(length))
    same = reuse and all(prior["args"][k] == getattr(a, k) for k in
                         ("segment", "window", "sink", "eval_samples", "eval_seed", "train_len"))
    if same and "full" in reuse and "streaming" in reuse:
      cell["full"], cell["streaming"] = reuse["full"], reuse["streaming"]
      cell["baselines_from"] = a.baselines_from
    else:
      variants = [("full", config, base_params), ("streaming", stream_cfg, stream_params)] + variants
    wanted = a.variants.split(",")
    for name, cfg, prm in [v for v in variants if v[0] in wanted]:
      t1 = time.perf_counter()
      rows = score(cfg, prm, samples, length, tok.pad_id)
      cell[name] = {**summarise(rows), "rows": rows, "wall_s": time.perf_counter() - t1}
      print(f"{length:>5} {name:>12}: key NLL {cell[name]['key_nll']:.3f} (answer "
            f"{cell[name]['answer_nll']:.3f}, among digits "
            f"{cell[name].get('digit_nll', float('nan')):.3f})  exact {cell[name]['exact']}/{len(rows)}  "
            f"({cell[name]['wall_s']:.0f} s)", flush=True)
    if "knockout" in cell and "streaming" in cell:
      diff = max(abs(x["key_nll"] - y["key_nll"])
                 for x, y in zip(cell["knockout"]["rows"], cell["streaming"]["rows"]))
      cell["knockout_vs_streaming_max_abs_nll_diff"] = diff
      print(f"{length:>5} knockout vs streaming: max |key NLL diff| {diff:.2e}", flush=True)
    evals[str(length)] = cell
  result = {"args": vars(a), "params": share, "train_wall_s": train_s,
            "eval_wall_s": time.perf_counter() - t_eval,
            "total_wall_s": time.perf_counter() - t_start, "curve": curve, "gates": gates,
            "train_depth_max": hi, "eval": evals}
  if a.out:
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
