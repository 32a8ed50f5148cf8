"""The long-context suite (issue #26) on SmolLM2-135M-Instruct: ``full``, ``streaming``,
``h2o``, ``snapkv`` and trained EdgeInfinite sets at equal state bytes, through the
public Engine (``longctx.method_engines`` + ``longctx.run_suite``).

    PYTHONPATH=. .venv/bin/python experiments/longctx_suite_smollm2.py \\
        --set=text=experiments/gates/smollm2_gate_text.npz \\
        --tasks=lcc,nll,niah_single_1 --lengths=2048 --n=12 --lcc-bins=1024-2048 \\
        --nll-docs=24 --nll-length=2048 --out=experiments/longctx/suite.json

Every method reads with the demo's memory settings (segment 128, window 128, sink 4,
absolute positions; ``experiments/configs/demo.py``), batch 1, every prompt on the long
route (``short_threshold=0``). ``h2o`` and ``snapkv`` (segment-by-segment form,
``model/eviction.py``) keep the largest ``n_kept`` whose state is at most the first
set's (the memory's bytes spent on exact tokens instead). ``full`` holds the whole
prompt: its state grows with length and is reported as such.

Data: the held-out split at ``--heldout-fraction`` (default 0.25, as the NLL runs of
``nll_gate_smollm2.py``), leaving out every file the committed S-SFT sets read
(``corpus.embedded_paths`` at the default fraction; RULER's haystack is held-out prose
around synthetic needles). The defaults of ``--n``, ``--lengths`` and the rest are the
issue's protocol sizes; at about 10 s per 2k-token prompt and method on a 2-core CPU
they need days here, so the notes record the reduced runs and their wall times.
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
from edgeinfinite_jax.engine.engine import Scenario
from edgeinfinite_jax.eval import longctx, ruler
from edgeinfinite_jax.model import gate as gate_lib

HERE = os.path.dirname(os.path.abspath(__file__))
# What the committed sets (experiments/gates) trained on: the demo's S-SFT tasks, whose
# doc_qa documents come from the embedded corpus at the default fraction and cap.
COMMITTED_SPLIT = dict(max_bytes=3_000_000, heldout_fraction=corpus.HELDOUT_FRACTION)


def demo_memory() -> dict:
  return dict(config_args.load_module(os.path.join(HERE, "configs", "demo.py"))
              .get_config("").demo.memory)


def _bins(text: str) -> list[tuple[int, int]]:
  out = []
  for part in text.split(","):
    lo, _, hi = part.partition("-")
    out.append((int(lo), int(hi)))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--set", action="append", default=[],
                 help="NAME=PATH of a trained set (repeatable; the first fixes the budget)")
  p.add_argument("--baselines", default=",".join(longctx.BASELINES))
  p.add_argument("--tasks", default=",".join(longctx.TASK_NAMES))
  p.add_argument("--lengths", default="2048,4096,8192")
  p.add_argument("--n", type=int, default=30)
  p.add_argument("--lcc-bins", default="1024-2048,2048-4096,4096-8192")
  p.add_argument("--nll-docs", type=int, default=20)
  p.add_argument("--nll-length", type=int, default=8192)
  p.add_argument("--heldout-fraction", type=float, default=0.25)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", required=True)
  a = p.parse_args(argv)
  if not a.set:
    p.error("--set: give at least one trained set (NAME=PATH); it fixes the state budget")
  memory = demo_memory()
  base_config, base_params, tok = models.smollm2()
  tasks = [t for t in a.tasks.split(",") if t]
  lengths = [int(x) for x in a.lengths.split(",") if x]
  bins = _bins(a.lcc_bins)
  new = max([ruler.TOKENS_TO_GENERATE[ruler.TASKS[t][0]] for t in tasks if t in ruler.TASKS]
            + [longctx.LCC_MAX_NEW_TOKENS if longctx.LCC in tasks else 1])
  longest = max(lengths + [hi for _, hi in bins] + [a.nll_length])
  sc = Scenario(segment_len=int(memory["segment_len"]), n_sink=int(memory["n_sink"]),
                n_window=int(memory["n_window"]), batch_size=1, max_new_tokens=new,
                short_threshold=0, max_context=longest + new)
  sets = {}
  for spec in a.set:
    name, _, path = spec.partition("=")
    mc, params, _ = gate_lib.load_trained_set(base_config, base_params, path,
                                              rng=jax.random.key(0), where="demo.memory",
                                              **memory)
    sets[f"edgeinfinite[{name}]"] = (mc, params)
  engines, info = longctx.method_engines(base_config, base_params, sc, sets,
                                         baselines=[b for b in a.baselines.split(",") if b])
  for method, i in info.items():
    print(f"{method}: state {i['state_bytes']:,} B"
          + (f", n_kept {i['n_kept']}" if "n_kept" in i else ""), flush=True)
  t0 = time.perf_counter()
  result = longctx.run_suite(
      engines, tok, lengths, a.n, a.seed, tasks=tasks, lcc_bins=bins, nll_docs=a.nll_docs,
      nll_length=a.nll_length, bucket=256, heldout_fraction=a.heldout_fraction,
      exclude=corpus.embedded_paths(**COMMITTED_SPLIT)[0])
  result["config"].update(command=" ".join(sys.argv), sets=a.set, methods=info,
                          wall_s=time.perf_counter() - t0)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
  longctx.write_json(result, a.out)
  print(longctx.markdown_table(result))
  print(f"wall {result['config']['wall_s']:.0f} s; {a.out}")


if __name__ == "__main__":
  main()
