"""The shared baseline of the EdgeInfinite ablations (``ablation_*.py``).

Each ablation file varies one factor around this baseline with ``sweep(add, arg)``;
run one with the sweep launcher (``experiments/README.md``)::

  python -m edgeinfinite_jax.cli.sweep --config=experiments/configs/ablation_gate.py:tiny \\
      --workdir=sweeps/gate

This file is also a config of its own: the baseline run, no sweep.

Arguments (after ``:``, comma-separated, see ``configs.parse_arg``):
  tiny        seconds-to-a-minute CPU runs (tiny model, a few steps); without it,
              ``job=demo`` runs on SmolLM2-135M (``demo.py:train``)
  job=NAME    ``demo`` (default): the demo pipeline (pretrain, S-SFT on passkey
              samples, passkey retrieval through the Engine for full / streaming /
              edgeinfinite with the key outside window + segment); the memory
              settings live in ``demo.memory``, the metric is passkey accuracy.
              ``train``: the trainer on the embedded corpus with an EdgeInfinite
              model (``model.memory.attention_type="edgeinfinite"``, sequences of
              several segments so the memory is read): held-out LM loss under the
              segmented path, a cheaper ablation of the same factors.
  steps=INT   training steps (``job=demo``: S-SFT steps; 0 = the variant's default)
  hf=DIR      start from a Hugging Face checkpoint (``init.hf_path``), e.g. the
              ``pretrain/hf`` of a demo run: ``job=demo`` skips pretraining;
              ``job=train`` fine-tunes it (what the trainable-set ablation needs)
"""

import os

from edgeinfinite_jax import configs

JOBS = ("demo", "train")
# job=train model sizes (job=demo takes the demo's model).
TRAIN_SIZES = {
    True: dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1),
    False: dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                num_kv_heads=2),
}


def parse(arg):
  a = configs.parse_arg(arg, tiny=False, runlocal=False, job="demo", steps=0, hf="")
  a.tiny = a.tiny or a.runlocal
  if a.job not in JOBS:
    raise ValueError(f"config arg job={a.job!r}: must be one of {JOBS}")
  return a


def _demo_config(a):
  here = os.path.dirname(os.path.abspath(__file__))
  demo = configs.load_module(os.path.join(here, "demo.py"))
  # Real model (SmolLM2, every point trains its gate: demo.py:train) or the tiny one.
  config = demo.get_config("tiny" if a.tiny else "train")
  d = config.demo
  d.sft_runs = "gate"  # one S-SFT run per point (the trainable-set ablation varies it)
  if a.tiny:
    # Lengths 2x / 4x the S-SFT length keep the key outside window + segment for
    # every window and segment size the ablations try (``checked`` verifies it).
    d.update(eval_mults="2,4", quant_presets="", eval_samples=2)
  else:
    # 4x-16x at depths <= 0.5: the key ~1000 tokens or more from the answer, out of reach
    # of every window + segment the ablations try (``checked`` verifies it).
    d.update(eval_mults="4,8,16", eval_depths="0.0,0.25,0.5", quant_presets="",
             integer_modes="", beyond_lengths="")
  if a.steps:
    d.sft_steps = a.steps
  return config


def _train_config(a):
  config = configs.base_config()
  config.model.update(TRAIN_SIZES[a.tiny])
  config.model.memory.update(attention_type="edgeinfinite", gate_init_bias=-2.0)
  config.optim.trainable = "all"
  if a.tiny:
    config.model.max_position_embeddings = 1024
    config.model.memory.update(segment_len=32, n_sink=4, n_window=32)
    config.data.update(seq_len=256, batch_size=4, max_bytes=200_000)
    config.train.update(steps=a.steps or 20, log_every=5, eval_every=0, eval_batches=2)
    config.optim.update(lr=3e-3, warmup_steps=5)
    config.checkpoint.update(every=a.steps or 20, keep=1)
  else:
    config.model.max_position_embeddings = 8192
    config.model.memory.update(segment_len=128, n_sink=4, n_window=256)
    config.data.update(seq_len=2048, batch_size=16)
    config.train.update(steps=a.steps or 3000, log_every=50, eval_every=500, eval_batches=8)
    config.optim.update(lr=1e-3, warmup_steps=200)
    config.checkpoint.update(every=1000, keep=2)
  return config


def get_config(arg=None):
  a = parse(arg)
  config = _demo_config(a) if a.job == "demo" else _train_config(a)
  if a.hf:
    config.init.hf_path = a.hf
  return config


def memory_key(arg, field):
  """The dotted key of a memory setting for this job (``demo.memory.X`` / ``model.memory.X``)."""
  return f"{'demo' if parse(arg).job == 'demo' else 'model'}.memory.{field}"


def trainable_key(arg):
  """``demo.sft_runs`` (the S-SFT trainable set) or ``optim.trainable``."""
  return "demo.sft_runs" if parse(arg).job == "demo" else "optim.trainable"


def checked(add, arg):
  """``add`` that first checks, for ``job=demo``, that every passkey cell of the
  evaluation grid keeps the key outside window + segment with the point's sizes (the
  evaluation refuses such cells, late; this fails when the sweep is expanded)."""
  a = parse(arg)
  if a.job != "demo":
    return add
  from edgeinfinite_jax.data import tasks
  from edgeinfinite_jax.data import corpus
  config = get_config(arg)
  d, tok = config.demo, corpus.data_tokenizer(config.data)
  mults = [float(x) for x in str(d.eval_mults).split(",") if x.strip()]
  depths = [float(x) for x in str(d.eval_depths).split(",") if x.strip()]
  closest = min(tasks.key_distance(tasks.passkey(tok, int(round(m * d.sft_len)), depth, 0,
                                                 digits=d.digits))
                for m in mults for depth in depths)

  def add_checked(point):
    size = lambda k: point.get(f"demo.memory.{k}", d.memory[k])
    reach = size("segment_len") + size("n_window")
    if closest <= reach:
      raise ValueError(f"sweep point {point}: window + segment = {reach} tokens reaches the "
                       f"passkey (closest key {closest} tokens before the answer at "
                       f"demo.eval_mults={d.eval_mults!r}, eval_depths={d.eval_depths!r})")
    add(point)

  return add_checked


def metrics(arg=None):
  if parse(arg).job == "demo":
    return ["eval.passkey.edgeinfinite.mean", "eval.passkey.streaming.mean",
            "eval.passkey.full.mean", "pretrain.eval_loss"]
  return ["loss", "eval_loss", "eval_ppl", "tokens_per_s"]
