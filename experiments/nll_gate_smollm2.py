"""Beyond-window NLL of EdgeInfinite's trained sets on real text, and gates trained so
that real text cannot get worse than dropping the old context (issue #26, item 4).

Two commands (the notes, ``experiments/NOTES_longctx.md``, hold every run):

    # train a gate (SmolLM2 frozen, the demo's memory: segment/window 128, sink 4, MLP gate)
    PYTHONPATH=. .venv/bin/python experiments/nll_gate_smollm2.py train --recipe=text \\
        --steps=60 --seq-len=1024 --workdir=results/nll/gate_text
    # score full, streaming and every set on held-out documents
    PYTHONPATH=. .venv/bin/python experiments/nll_gate_smollm2.py eval \\
        --set=gate=experiments/gates/smollm2_gate.npz --set=text=results/nll/gate_text/trained.npz \\
        --out=results/nll/eval.json

Recipes (``train --recipe``), both from the demo's S-SFT config (``jobs.demo.sft_config``
of ``experiments/configs/demo.py``: gate-only AdamW, lr 5e-2, the gate initialised shut),
both with the corpus split at ``--heldout-fraction`` (default 0.25):

* ``text``: next-token loss on every token of the embedded corpus's training split in
  its ``source`` form (whole standard-library files: code, .txt, .rst), rows of
  ``--seq-len`` tokens fed segment by segment by the training path. The gate learns
  where the memory's read helps ordinary text and where it hurts.
* ``mix``: the demo's S-SFT (its task mix, answers only) with ``--text-mix`` of the rows
  replaced by such text rows (``data.text_mix``): the answers, and a loss that holds the
  gate shut where it would hurt text.

``--init-set=PATH`` starts either recipe from a trained set's gate (say the ``text``
gate, then ``mix``: text first, then the answers) instead of the shut one; it is
recorded in ``trained.json``, not in the workdir's config, so give each its own workdir.

Evaluation (``eval``): ``longctx.nll_documents`` at ``--heldout-fraction``, the first
``--length`` tokens of ``--docs`` documents, leaving out every file the committed sets'
training read (``corpus.embedded_paths`` at the default fraction 0.05, prose form): no
trained set here saw an evaluation document. ``Engine.score`` per method (one Engine
per config; the sets share one through ``with_params``), the mean NLL of targets past
local reach per document, and the paired difference of each method to ``streaming``
with its standard error over documents (``--baselines-from=JSON`` reuses an earlier
run's ``full`` and ``streaming`` on the same documents).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

from edgeinfinite_jax.checkpoints import models
from edgeinfinite_jax.configs import args as config_args
from edgeinfinite_jax.data import corpus
from edgeinfinite_jax.engine.engine import Engine, Scenario
from edgeinfinite_jax.eval import longctx, passkey
from edgeinfinite_jax.jobs import demo
from edgeinfinite_jax.model import gate as gate_lib
from edgeinfinite_jax.model import lora
from edgeinfinite_jax.train import trainer as train
from edgeinfinite_jax.train import workdir as workdir_lib

HERE = os.path.dirname(os.path.abspath(__file__))
# What the committed sets (experiments/gates) trained on: the demo's S-SFT tasks, whose
# doc_qa documents come from the embedded corpus at the default fraction and cap.
COMMITTED_SPLIT = dict(max_bytes=3_000_000, heldout_fraction=corpus.HELDOUT_FRACTION)


def demo_config():
  return config_args.load_module(os.path.join(HERE, "configs", "demo.py")).get_config("")


def train_config(args):
  config = demo_config()
  c = demo.sft_config(config, args.run, models.init_source(config.init))
  c.seed = args.seed
  c.data.update(heldout_fraction=args.heldout_fraction, embedded_form="source",
                seq_len=args.seq_len, batch_size=args.batch)
  if args.recipe == "text":
    c.data.update(source="embedded", task_mix=0.0)
  else:
    c.data.update(text_mix=args.text_mix, task_samples=max(int(c.data.task_samples),
                                                           args.steps * args.batch))
  c.optim.update(lr=args.lr, warmup_steps=args.warmup)
  c.train.update(steps=args.steps, eval_every=0, log_every=5)
  c.checkpoint.update(every=max(args.steps // 4, 1), keep=1)
  return c


def cmd_train(args):
  c = train_config(args)
  t0 = time.perf_counter()
  model_config, params = train.model_and_base_params(c)
  if args.init_set:  # start from a trained set's gate instead of the shut one
    memory = dict(demo_config().demo.memory)
    model_config, params, _ = gate_lib.load_trained_set(
        model_config.replace(memory=type(model_config.memory)()), params, args.init_set,
        rng=jax.random.key(args.seed), where="demo.memory", **memory)
  out = train.run(c, args.workdir, model=(model_config, params))  # resumes when it can
  path = os.path.join(args.workdir, "trained.npz")
  lora.save_subset(out["state"].params, path, demo._trained_pattern(args.run), args.run,
                   model_config)
  record = {"command": " ".join(sys.argv), "recipe": args.recipe, "run": args.run,
            "init_set": args.init_set,
            "wall_s_this_invocation": time.perf_counter() - t0,
            "final_step": int(out.get("final_step", args.steps)),
            "losses": [float(x) for x in out.get("losses", [])],
            "sha256": workdir_lib.sha256_file(path), "data": c.data.to_dict(),
            "optim": {k: v for k, v in c.optim.to_dict().items() if k != "groups"}}
  workdir_lib.write_atomic(os.path.join(args.workdir, "trained.json"),
                           json.dumps(record, indent=1))
  print(json.dumps({k: record[k] for k in ("final_step", "wall_s_this_invocation", "sha256")}))


def cmd_eval(args):
  config = demo_config()
  memory = dict(config.demo.memory)
  base_config, base_params, tok = models.smollm2()
  seen = corpus.embedded_paths(**COMMITTED_SPLIT)[0]
  docs = longctx.nll_documents(tok, n_docs=args.docs, length=args.length, seed=args.seed,
                               heldout_fraction=args.heldout_fraction, exclude=seen)
  sc = Scenario(segment_len=int(memory["segment_len"]), n_sink=int(memory["n_sink"]),
                n_window=int(memory["n_window"]), batch_size=1, max_new_tokens=1,
                short_threshold=0, max_context=args.length)
  reach = passkey.local_reach(sc.segment_len, sc.n_window)
  models_ = {"full": (base_config.with_memory(attention_type="full"), base_params),
             "streaming": (base_config.with_memory(**{**memory, "attention_type": "streaming"}),
                           base_params)}
  for spec in args.set:
    name, _, path = spec.partition("=")
    mc, params, _ = gate_lib.load_trained_set(base_config, base_params, path,
                                              rng=jax.random.key(0), where="demo.memory",
                                              **memory)
    models_[f"edgeinfinite[{name}]"] = (mc, params)
  engines, out = {}, {"docs": [d.path for d in docs], "length": args.length, "reach": reach,
                      "heldout_fraction": args.heldout_fraction, "sets": args.set,
                      "command": " ".join(sys.argv), "methods": {}}
  if args.baselines_from:  # full and streaming of an earlier run on the same documents
    with open(args.baselines_from) as f:
      prev = json.load(f)
    if prev["docs"] != out["docs"] or prev["length"] != args.length:
      raise SystemExit(f"--baselines-from={args.baselines_from}: scored other documents")
    for method in ("full", "streaming"):
      out["methods"][method] = {**prev["methods"][method], "from": args.baselines_from}
      del models_[method]
  for method, (mc, params) in models_.items():
    if mc not in engines:
      engines[mc] = Engine(mc, params, sc)
    t0 = time.perf_counter()
    nll = longctx.score_documents(engines[mc].with_params(params), docs)
    curve = longctx.nll_curve(nll, reach, bucket=256)
    curve["wall_s"] = time.perf_counter() - t0
    out["methods"][method] = curve
    print(f"{method}: past reach {curve['past_reach']['mean']:.4f} "
          f"± {curve['past_reach']['stderr']:.4f} ({curve['wall_s']:.0f} s)", flush=True)
  ref = out["methods"]["streaming"]["past_reach_docs"]
  for method, curve in out["methods"].items():
    curve["minus_streaming"] = longctx.paired_difference(curve["past_reach_docs"], ref)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  workdir_lib.write_atomic(args.out, json.dumps(out, indent=1))
  print(f"\n{'method':28s} {'NLL past reach':>16s} {'minus streaming':>18s} worse/docs")
  for method, curve in out["methods"].items():
    p, d = curve["past_reach"], curve["minus_streaming"]
    print(f"{method:28s} {p['mean']:9.4f} ± {p['stderr']:.4f} {d['mean']:+10.4f} ± "
          f"{d['stderr']:.4f} {d['above']:>4d}/{d['n']}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  t = sub.add_parser("train")
  t.add_argument("--recipe", choices=("text", "mix"), required=True)
  t.add_argument("--run", choices=demo.SAVED_SETS, default="gate",
                 help="the trainable set: the gate, or the gate plus the q/k/v adapters")
  t.add_argument("--workdir", required=True)
  t.add_argument("--steps", type=int, default=60)
  t.add_argument("--seq-len", type=int, default=1024)
  t.add_argument("--batch", type=int, default=1)
  t.add_argument("--lr", type=float, default=5e-2)
  t.add_argument("--warmup", type=int, default=5)
  t.add_argument("--text-mix", type=float, default=0.5)
  t.add_argument("--heldout-fraction", type=float, default=0.25)
  t.add_argument("--seed", type=int, default=0)
  t.add_argument("--init-set", default="",
                 help="a trained set (.npz) whose gate the run starts from (default: shut)")
  e = sub.add_parser("eval")
  e.add_argument("--set", action="append", default=[], help="NAME=PATH of a trained set")
  e.add_argument("--out", required=True)
  e.add_argument("--docs", type=int, default=24)
  e.add_argument("--length", type=int, default=2048)
  e.add_argument("--heldout-fraction", type=float, default=0.25)
  e.add_argument("--seed", type=int, default=0)
  e.add_argument("--baselines-from", default="",
                 help="an earlier eval's JSON: reuse its full and streaming scores")
  args = p.parse_args(argv)
  (cmd_train if args.cmd == "train" else cmd_eval)(args)


if __name__ == "__main__":
  main()
