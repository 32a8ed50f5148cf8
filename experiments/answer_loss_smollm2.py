"""Does the trained memory lower the answer loss where the needle is out of reach? (issue #10)

    PYTHONPATH=. .venv/bin/python experiments/answer_loss_smollm2.py --samples=64 \\
        --out=results/answer_loss_smollm2.json

Greedy passkey accuracy is all-or-nothing; this measures the evidence underneath
it. Fresh S-SFT samples of the default demo's four tasks (its S-SFT length and
needle depths, a seed no S-SFT stage drew from; every needle out of local reach,
asserted), teacher-forced through the training path (``forward``: the same
segments, window and memory as the engine), and the mean answer loss per task
(nats per answer token, EOS included) for:

* ``full``: the base model seeing everything (what retrieval can reach);
* ``streaming``: the same sink and window, no memory (what is left without it);
* each committed trained set of the demo (``demo.sft_from``), and the same model
  with its gate forced shut (``force_gate=local``: the memory's share of the change).

A trained set helps through its memory only if it beats ``streaming`` and its
own knockout; beating ``streaming`` alone can come from the answer's format.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import numpy as np
from tqdm.auto import tqdm

from edgeinfinite_jax import configs
from edgeinfinite_jax.data import corpus, tasks
from edgeinfinite_jax.eval import passkey as evaluate
from edgeinfinite_jax.jobs import demo as pipeline
from edgeinfinite_jax.train import trainer

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.py")


def answer_losses(model_config, params, samples, seq_len, pad_id) -> np.ndarray:
  """Mean answer loss of each sample (nats per answer token)."""
  out = []
  for s in samples:
    rows = corpus.task_rows([s], seq_len, pad_id)
    batch = {"tokens": rows.tokens, "loss_mask": rows.loss_mask}
    out.append(trainer.evaluate(model_config, params, [batch])["eval_loss"])
  return np.asarray(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--samples", type=int, default=64)
  p.add_argument("--seed", type=int, default=777)
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  config = configs.load_module(DEMO).get_config()
  d = config.demo
  t0 = time.perf_counter()
  base = pipeline.stage_pretrain(config, "/nonexistent", {"stages_skipped": []})[:2]
  record = {}
  sets = pipeline.stage_sft(config, "/nonexistent", "smollm2", base, record)
  sc = pipeline.sft_config(config, "gate", "smollm2")
  tok = corpus.data_tokenizer(sc.data)
  samples = corpus.task_samples(sc.data, tok, a.samples, a.seed)
  reach = evaluate.local_reach(d.memory.segment_len, d.memory.n_window)
  for s in samples:
    assert tasks.key_distance(s) > reach, (s.task, tasks.key_distance(s), reach)
  models = {"full": (base[0].with_memory(attention_type="full"), base[1])}
  for label, (mc, params) in pipeline.eval_models(config, base, sets).items():
    if label != "full":
      models[label] = (mc, params)
      if label.startswith("edgeinfinite"):
        models[f"{label} gate shut"] = (mc.with_memory(force_gate="local"), params)
  by_task = collections.defaultdict(list)
  for i, s in enumerate(samples):
    by_task[s.task].append(i)
  result = {"samples": a.samples, "seed": a.seed, "tasks": {t: len(v) for t, v in by_task.items()},
            "loss": {}}
  for label, (mc, params) in tqdm(models.items(), desc="models"):
    losses = answer_losses(mc, params, samples, int(d.sft_len), tok.pad_id)
    result["loss"][label] = {"all": float(losses.mean()),
                             **{t: float(losses[idx].mean()) for t, idx in by_task.items()}}
  result["wall_s"] = time.perf_counter() - t0
  names = ["all"] + sorted(by_task)
  print("| model | " + " | ".join(f"{n} ({len(by_task[n]) if n != 'all' else a.samples})"
                                   for n in names) + " |")
  print("|---" * (len(names) + 1) + "|")
  for label, row in result["loss"].items():
    print(f"| {label} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
  print(f"wall {result['wall_s']:.0f} s")
  if a.out:
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
