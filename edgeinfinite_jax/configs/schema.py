"""Every config section and its defaults, as data: the one schema of an experiment.

An experiment is one file ``experiments/configs/NAME.py`` (big_vision style):
``get_config(arg=None)`` starts from ``base_config()`` and overrides only what it
changes; ``sweep(add, arg=None)`` adds dotted-key override dicts; ``metrics()``
names the metrics worth plotting (see ``configs/args.py``).

A key that is not here does not exist: ``configs.validate.check_keys`` rejects it
with the nearest valid key. New jobs add their section here and register their
``run``/``validate`` in ``jobs/registry.py``.

Two sections sound alike and mean different things:

* ``quant``: *how the model computes*, a ``QuantConfig`` (preset, bit widths,
  mode) read by ``QuantConfig.from_dict``; used by every job that runs a
  quantized model.
* ``quant_job``: *the settings of the job* ``quant`` (which method, which base
  model, how many calibration batches); read only by ``jobs/quant.py``.
"""

from __future__ import annotations

import copy
import dataclasses

import ml_collections

from edgeinfinite_jax.model.config import ModelConfig

JOB_NAMES = ("train", "demo", "quant")

# Keys renamed in the schema, so that an old config or command line is told the new
# name instead of only "no such key" (configs.validate / overrides / cli.main).
RENAMED = {"quantize": "quant_job"}


def renamed_hint(dotted: str) -> str:
  """`` ('quantize' was renamed 'quant_job')`` when the key's first part was renamed."""
  head = dotted.split(".", 1)[0]
  return f" ({head!r} was renamed {RENAMED[head]!r})" if head in RENAMED else ""  # jobs/registry.py registers each (tested)

# Job ``demo`` (jobs/demo.py): pretrain -> S-SFT -> passkey -> PTQ -> results.
DEMO = {
    "pretrain_task_mix": 0.0,    # share of passkey-style rows in pretraining (full loss)
    "memory": {                  # model.memory of the S-SFT'd models
        "attention_type": "edgeinfinite", "segment_len": 64, "n_sink": 4, "n_window": 64,
        "gate": "per_head_scalar", "gate_init_bias": -6.0, "update_rule": "delta",
        "mem_uses_rope": False, "rope_positions": "absolute", "truncate_every": 0,
    },
    "sft_runs": "gate,all",      # trainable sets, comma-separated (first = headline)
    "sft_from": "",              # trained.npz of an earlier S-SFT stage, loaded instead of
                                 # training: "PATH" (first set) or "SET=PATH,..." ("" = train)
    "lora_rank": 8,              # rank of the q/k/v adapters of the "gate+lora" set
    "sft_len": 512,              # S-SFT sample length in tokens
    "sft_tasks": "passkey",      # data.tasks of the S-SFT stages
    "sft_max_depth": 1.0,        # data.task_max_depth of the S-SFT stages
    "sft_samples": 2048,
    "sft_steps": 300,
    "sft_batch": 8,
    "sft_warmup": 20,
    "gate_lr": 1e-2,             # gate group: own lr, no weight decay (reference §6.3)
    "sft_lr": 1e-3,              # every other trainable parameter
    "sft_full_loss": False,      # loss on every token, not just the answer
    "digits": 5,                 # passkey digits (training and evaluation)
    "eval_mults": "2,4,8,16",    # evaluation lengths, in multiples of sft_len
    "eval_depths": "0.0,0.4,0.8",
    "eval_samples": 8,           # per (length, depth) cell
    "eval_batch": 4,             # Engine batch size
    "eval_seed": 1234,           # disjoint from the training samples' seeds
    "beyond_lengths": "",        # extra lengths in tokens (e.g. past the model's trained
    "beyond_depth": 0.5,         # context), each at this one depth
    # The long-context suite (eval/longctx.py, stage 4), every method at equal state bytes;
    # suite_tasks "" skips it. n samples per RULER length and per LCC bin.
    "suite_tasks": "lcc,nll,niah_single_1",
    "suite_lengths": "2048",     # RULER lengths in tokens (prompt + tokens to generate)
    "suite_n": 6,
    "suite_lcc_bins": "1024-2048",  # LCC prompt-length bins, "lo-hi,..."
    "suite_nll_docs": 6,
    "suite_nll_length": 2048,    # tokens scored per NLL document
    "suite_nll_bucket": 256,     # NLL curve bucket
    "quant_presets": "fine_grained,rtn_per_tensor",
    "quant_eval_batches": 4,
    "quant_depths": "",          # depths of the quantized model's passkey @8x ("" = eval_depths)
    "integer_modes": "all",      # requantization modes of the integer check ("all" or a list)
}

# Section ``data``: the token stream every job reads (data/corpus.py, data/tasks.py).
DATA = {
    "source": "embedded",     # embedded | text | json | parquet | hub
    "path": "",               # files (comma-separated / globs) or a hub name
    "text_field": "text",
    "split": "train",         # hub only
    "tokenizer": "byte",      # "byte" or a local HF tokenizer directory
    "seq_len": 128,
    "batch_size": 8,          # global batch, in rows
    "max_bytes": 3_000_000,   # cap on the text read
    "heldout_fraction": 0.05,
    "embedded_form": "prose",  # .py files of "embedded": "prose" (docstrings, comments) | "source"
    # source "task" (S-SFT rows, loss on answers) and task_mix (share of
    # task rows, full loss, mixed into a text source); see data/corpus.py.
    "tasks": "passkey",       # "passkey" or weighted "passkey:3,kv_recall:1"
    "task_length": 0,         # target sample length, 0 = seq_len
    "task_samples": 1024,     # training samples drawn for source "task"
    "task_digits": 5,         # digits of passkey / needle values
    "task_max_depth": 1.0,    # needle depth uniform over [0, task_max_depth]
    "task_seed": 0,
    "task_mix": 0.0,
    "text_mix": 0.0,          # source "task": share of rows that are embedded text (full loss)
}

# Section ``quant``: a QuantConfig as ``QuantConfig.from_dict`` reads it.
QUANT = {"preset": "", "preset_args": {}, "mode": "fake_quant", "edgeqat": {}}

# Job ``quant`` (jobs/quant.py): method, base model, calibration, integer check.
QUANT_JOB = {
    "method": "fp",               # one of train.qat.QUANT_METHODS
    "base_steps": 200,            # pretraining of the float base (no init)
    "base_workdir": "",           # where that run lives ("" = <workdir>/base; reused)
    "calib_batches": 4,           # calibration / LSQ-init batches (training split)
    "observer": "minmax",         # calib.OBSERVERS
    "group_size": 32,             # ptq_fine's weight groups
    "output_bits": 16,            # integer check: the linear-output grid
    "requant_mode": "tflite_optimized",
    "qat_lr": 0.0,                # 0 = optim.lr
    # lr multiplier of the quantizer parameters: Adam moves every parameter by ~lr
    # per step whatever its gradient scale (LSQ's g cancels), and 8-bit step sizes
    # are ~1e-3, so at the weights' lr they would cross zero within a few steps.
    "quant_lr_mult": 0.1,
}


def base_config() -> ml_collections.ConfigDict:
  """Every top-level section with its defaults; experiment files override."""
  model = dataclasses.asdict(ModelConfig())
  model["head_dim"] = 0  # 0 = hidden_size // num_heads, recomputed after overrides
  return ml_collections.ConfigDict({
      "job": "train",
      "seed": 0,
      "model": model,
      "data": copy.deepcopy(DATA),  # the token stream, see DATA above
      "optim": {
          "lr": 3e-4,
          "warmup_steps": 100,
          "min_lr_ratio": 0.1,      # cosine decays to lr * min_lr_ratio
          "b1": 0.9,
          "b2": 0.95,
          "eps": 1e-8,
          "weight_decay": 0.1,
          "clip_norm": 1.0,         # global-norm clipping, 0 = off
          "trainable": "all",       # preset name, see optim.TRAINABLE_SETS
          "groups": None,           # or [(regex, lr_mult|"frozen"[, wd_mult]), ...]
      },
      "train": {
          "steps": 1000,
          "log_every": 10,
          "eval_every": 200,        # 0 = only at the end
          "eval_batches": 4,
          "progress": True,         # tqdm progress bar
          "fresh": False,           # move a recorded run aside (workdir/previous/), start over
      },
      "checkpoint": {
          "every": 500,             # save every k steps (and always at the end)
          "keep": 3,                # keep the last N
          "enabled": True,
      },
      "mesh": {"data": -1, "fsdp": 1, "tensor": 1},  # -1 = the remaining devices
      "distributed": {
          "initialize": False,      # call jax.distributed.initialize()
          "coordinator_address": "",
          "num_processes": 0,       # 0 = auto-detect
          "process_id": -1,         # -1 = auto-detect
      },
      "init": {"hf_path": "",       # HF checkpoint directory to start from, or
               "gguf": ""},         # a .gguf file or a named model (models.MODELS: smollm2)
      "demo": copy.deepcopy(DEMO),  # job "demo" (jobs/demo.py): its stages' settings
      "quant": copy.deepcopy(QUANT),  # a QuantConfig (preset + overrides), see quant/qconfig.py
      "quant_job": copy.deepcopy(QUANT_JOB),  # job "quant" (jobs/quant.py): method, base, calibration
  })
