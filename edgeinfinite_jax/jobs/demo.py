"""The demo job: pretrain -> S-SFT -> passkey evaluation -> quantization -> results.

  python -m edgeinfinite_jax.cli.main --config=experiments/configs/demo.py --workdir=DIR

Stages (each resumable: a stage whose output exists is skipped on a rerun, and
the training stages resume from their orbax checkpoints):

1. ``pretrain``: ``train.run`` of the base model (``config.model``, full
   attention) on ``config.data`` (the embedded corpus, optionally mixed with
   passkey-style rows, ``demo.pretrain_task_mix``), then exported as a Hugging
   Face checkpoint (``DIR/pretrain/hf``). With ``config.init.hf_path`` (or ``init.gguf``) the stage
   is skipped and that checkpoint is the base model.
2. ``sft_<set>``: segmented SFT (reference §4.4) per trainable set of
   ``demo.sft_runs`` ("gate", "gate+attention", "all"): ``train.run`` from the
   base checkpoint with ``model.memory = demo.memory`` on the ``task`` data
   source (long context + question + answer; the training path scans segments
   with full backpropagation through the memory; loss on answer tokens only).
   The gate group gets ``demo.gate_lr`` and no weight decay; other trainable
   parameters ``demo.sft_lr``.
3. ``eval``: passkey accuracy through the Engine on lengths ``demo.eval_mults`` x
   the S-SFT length and ``demo.eval_depths`` for ``full`` (the base model),
   ``streaming`` (same sink/window cache as edgeinfinite, no memory) and each
   S-SFT'd ``edgeinfinite`` model; the key is always outside window + segment.
   Plus time to first token and state bytes against length.
4. ``quant``: weight-only PTQ of the base model (``quant.ptq.quantize_params`` /
   ``dequantize_params``) per ``demo.quant_presets``: held-out loss against float,
   and the passkey accuracy of the quantized edgeinfinite model at 8x.
5. ``metrics.json``, ``results.md`` (printed at the end) and the plots
   ``passkey_heatmap_<method>.png``, ``ttft_memory.png`` in DIR (``demo_report.py``).

(Over 400 lines on purpose: the five stages read top to bottom in one file, each a
short function sharing the stage-record helpers; the tables live in demo_report.py.)
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from edgeinfinite_jax.jobs import demo_report
from edgeinfinite_jax.train import workdir as workdir_lib
from edgeinfinite_jax.model.config import ConfigError
from edgeinfinite_jax.model.config import quantized
from edgeinfinite_jax.quant import qconfig
from edgeinfinite_jax.checkpoints import models as models_lib
from edgeinfinite_jax.model.config import ModelConfig
from edgeinfinite_jax.train import trainer as train
from edgeinfinite_jax.checkpoints import hf as convert
from edgeinfinite_jax.model import transformer as model_lib
from edgeinfinite_jax.train import optim
from edgeinfinite_jax.engine.engine import Scenario
from edgeinfinite_jax.engine.engine import Engine
from edgeinfinite_jax.eval import longctx
from edgeinfinite_jax.eval import passkey as evaluate
from edgeinfinite_jax.eval import ruler
from edgeinfinite_jax.eval import reference
from edgeinfinite_jax.model import gate as gate_lib
from edgeinfinite_jax.model import lora
from edgeinfinite_jax.data import corpus as data_lib
from edgeinfinite_jax.quant import ptq
from edgeinfinite_jax.train import qat
from edgeinfinite_jax.train import calib

SFT_SETS = ("gate", "gate+lora", "gate+attention", "all")
# The quant stage's weight-only PTQ recipes (``demo.quant_presets``, each optionally
# "name:bits"): fine-grained per-group scales vs round-to-nearest per-tensor.
WEIGHT_PRESETS = ("fine_grained", "rtn_per_tensor")




def _csv(s, cast=str) -> list:
  return [cast(x.strip()) for x in str(s).split(",") if x.strip()]


def validate(config) -> None:
  """Rules of the ``demo`` section (``jobs.registry.validate`` runs it for job demo)."""
  d = config.demo  # (its keys: configs.validate.check_keys)
  runs = _csv(d.sft_runs)
  if not runs or any(r not in SFT_SETS for r in runs):
    raise ConfigError(f"demo.sft_runs={d.sft_runs!r}: must list trainable sets of {SFT_SETS}")
  if d.memory.attention_type != "edgeinfinite":
    raise ConfigError(f"demo.memory.attention_type={d.memory.attention_type!r}: must be "
                      "'edgeinfinite' (the S-SFT'd model)")
  for key in ("sft_len", "sft_samples", "sft_steps", "sft_batch", "eval_samples", "eval_batch",
              "digits", "suite_n", "suite_nll_docs", "suite_nll_length", "suite_nll_bucket"):
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise ConfigError(f"demo.{key}={v!r}: must be a positive integer")
  for key in ("gate_lr", "sft_lr"):
    if not d[key] > 0:
      raise ConfigError(f"demo.{key}={d[key]!r}: must be > 0")
  if not 0.0 < float(d.sft_max_depth) <= 1.0:
    raise ConfigError(f"demo.sft_max_depth={d.sft_max_depth!r}: must be in (0, 1]")
  try:
    mults = _csv(d.eval_mults, float)
    depths = _csv(d.eval_depths, float) + _csv(d.quant_depths, float) + [float(d.beyond_depth)]
    beyond = _csv(d.beyond_lengths, int)
  except ValueError:
    raise ConfigError("demo.eval_mults / eval_depths / quant_depths / beyond_depth: must be "
                      "comma-separated numbers; demo.beyond_lengths: integers") from None
  if not mults or any(m <= 0 for m in mults):
    raise ConfigError(f"demo.eval_mults={d.eval_mults!r}: must be positive numbers")
  if not _csv(d.eval_depths) or any(not 0 <= x <= 1 for x in depths):
    raise ConfigError(f"demo.eval_depths={d.eval_depths!r}, quant_depths={d.quant_depths!r}, "
                      f"beyond_depth={d.beyond_depth!r}: must be numbers in [0, 1]")
  if any(n <= 0 for n in beyond):
    raise ConfigError(f"demo.beyond_lengths={d.beyond_lengths!r}: must be positive token counts")
  for t in _csv(d.suite_tasks):
    if t not in longctx.TASK_NAMES:
      raise ConfigError(f"demo.suite_tasks={d.suite_tasks!r}: {t!r} must be one of "
                        f"{list(longctx.TASK_NAMES)}")
  try:
    bins, lengths = _bins(d.suite_lcc_bins), _csv(d.suite_lengths, int)
  except ValueError:
    raise ConfigError(f"demo.suite_lcc_bins={d.suite_lcc_bins!r}, suite_lengths="
                      f"{d.suite_lengths!r}: must be 'lo-hi,...' and comma-separated token "
                      "counts") from None
  if any(not 0 < lo < hi for lo, hi in bins) or any(n <= 0 for n in lengths):
    raise ConfigError(f"demo.suite_lcc_bins={d.suite_lcc_bins!r}, suite_lengths="
                      f"{d.suite_lengths!r}: bins must have 0 < lo < hi, lengths be positive")
  modes = _integer_modes(d)
  if any(m not in qconfig.REQUANT_MODES for m in modes):
    raise ConfigError(f"demo.integer_modes={d.integer_modes!r}: must be 'all', '' or a list of "
                      f"{qconfig.REQUANT_MODES}")
  if isinstance(d.lora_rank, bool) or not isinstance(d.lora_rank, int) or d.lora_rank <= 0:
    raise ConfigError(f"demo.lora_rank={d.lora_rank!r}: must be a positive integer (the "
                      "adapters' rank of the 'gate+lora' trainable set)")
  for run, path in sft_sources(d).items():
    if run not in runs:
      raise ConfigError(f"demo.sft_from={d.sft_from!r}: names trainable set {run!r}, which "
                        f"demo.sft_runs={d.sft_runs!r} does not list")
    if run not in SAVED_SETS:
      raise ConfigError(f"demo.sft_from={d.sft_from!r}: set {run!r} is not saved apart from "
                        f"the base model; only {SAVED_SETS} are")
    if not os.path.isfile(path):
      raise ConfigError(f"demo.sft_from={d.sft_from!r}: {path!r}: no such file (an .npz "
                        "that an S-SFT stage wrote as trained.npz; '' trains instead)")
  for name in _csv(d.quant_presets):
    preset, _, bits = name.partition(":")
    if preset not in WEIGHT_PRESETS or (bits and bits not in ("4", "8")):
      raise ConfigError(f"demo.quant_presets={d.quant_presets!r}: {name!r} must be one of "
                        f"{WEIGHT_PRESETS}, optionally with ':4' or ':8' weight bits")
  # The S-SFT model config must build (segment/window/sink rules).
  _memory_model(config)
  for run in runs:
    train.validate(sft_config(config, run, "/nonexistent"), check_paths=False)


def sft_sources(d) -> dict[str, str]:
  """``demo.sft_from`` -> {trainable set: .npz to load instead of training it}.

  "PATH" loads the first set of ``demo.sft_runs``; "SET=PATH,SET=PATH" names them.
  """
  spec = str(d.sft_from or "").strip()
  if not spec:
    return {}
  if "=" not in spec:
    return {_csv(d.sft_runs)[0]: spec}
  out = {}
  for item in _csv(spec):
    run, sep, path = item.partition("=")
    if not sep or not path.strip():
      raise ConfigError(f"demo.sft_from={d.sft_from!r}: {item!r} must be SET=PATH")
    out[run.strip()] = path.strip()
  return out


def _integer_modes(d) -> list:
  return list(qconfig.REQUANT_MODES) if d.integer_modes == "all" else _csv(d.integer_modes)


# ----------------------------------------------------------------------------- stage configs


def _copy(config) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


def pretrain_config(config) -> ml_collections.ConfigDict:
  c = _copy(config)
  c.job = "train"
  c.model.memory.attention_type = "full"
  c.data.task_mix = float(config.demo.pretrain_task_mix)
  c.data.task_digits = int(config.demo.digits)
  return c


# Trainable sets small enough to save apart from the base model (``trained.npz``).
SAVED_SETS = ("gate", "gate+lora")


def _groups(run: str, gate_lr: float, lr: float) -> list:
  other = lr / gate_lr  # multipliers are relative to optim.lr = gate_lr
  gate = (optim.GATE, 1.0, 0.0)  # own lr, no weight decay (reference §6.3)
  if run == "gate":
    return optim.partition([gate], optim.FROZEN)
  if run == "gate+lora":
    return optim.partition([gate, (optim.LORA, other, 0.0)], optim.FROZEN)
  if run == "gate+attention":
    return optim.partition([gate, (optim.ATTN_PROJ, other)], optim.FROZEN)
  return optim.partition([gate], other)


def _trained_pattern(run: str) -> str:
  """The parameters a saved set holds: its trainable groups (``SAVED_SETS``)."""
  trained = [g[0] for g in _groups(run, 1.0, 1.0) if g[1] != optim.FROZEN]
  return "|".join(f"(?:{p})" for p in trained)


def sft_config(config, run: str, base: str) -> ml_collections.ConfigDict:
  """The ``train`` config of one S-SFT stage (trainable set ``run``) from weights ``base``."""
  d = config.demo
  c = _copy(config)
  c.job = "train"
  c.model.memory.update(dict(d.memory))
  c.model.lora_rank = int(d.lora_rank) if run == "gate+lora" else 0
  models_lib.set_init(c.init, base)
  c.data.update(source="task", seq_len=int(d.sft_len), batch_size=int(d.sft_batch),
                tasks=d.sft_tasks, task_length=0, task_samples=int(d.sft_samples),
                task_digits=int(d.digits), task_max_depth=float(d.sft_max_depth), task_mix=0.0)
  c.optim.update(lr=float(d.gate_lr), warmup_steps=int(d.sft_warmup), trainable="all",
                 groups=_groups(run, float(d.gate_lr), float(d.sft_lr)))
  c.train.update(steps=int(d.sft_steps), eval_every=0)
  c.checkpoint.update(every=max(int(d.sft_steps) // 2, 1), keep=1)
  return c


def _memory_model(config):
  return ModelConfig.from_dict(config.model).with_memory(**dict(config.demo.memory))


# ----------------------------------------------------------------------------- helpers


def _load_json(path):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def _finished_stage(record, key, path, title):
  """The saved result of a finished stage (recorded as skipped), or None."""
  done = _load_json(path)
  if done:
    _banner(f"{title} (done)")
    record["stages_skipped"].append(key)
    record[key] = done
  return done


def _save_json(path, obj):
  # atomic: a stage's output exists only once complete
  workdir_lib.write_atomic(path, json.dumps(obj, indent=2, default=float))


def _banner(text):
  tqdm.write(f"\n=== {text}")


def _train_summary(out) -> dict:
  keep = ("final_step", "loss", "eval_loss", "eval_ppl", "tokens_per_s")
  s = {k: float(out[k]) for k in keep if k in out}
  if out.get("losses"):
    s["first_loss"] = float(out["losses"][0])
  return s


def _run_training(stage_config, workdir):
  """train.run (resumes; a finished run returns at once) -> (model_config, params, summary)."""
  out = train.run(stage_config, workdir)
  model_config, _ = train.model_and_base_params(stage_config)
  return model_config, out["state"].params, _train_summary(out)


# ----------------------------------------------------------------------------- stages


def stage_pretrain(config, workdir, record):
  """-> (base model config, base params, where they came from: init source or HF dir)."""
  source = models_lib.init_source(config.init)
  if source:
    _banner(f"stage 1/6: base model from {source} (no pretraining)")
    base_config, params, _ = models_lib.load(source, tokenizer=False)
    record["pretrain"] = {"init": source, "skipped": True}
    return base_config, params, source
  stage_dir = os.path.join(workdir, "pretrain")
  hf_dir = os.path.join(stage_dir, "hf")
  done = _load_json(os.path.join(stage_dir, "summary.json"))
  if done and os.path.exists(os.path.join(hf_dir, "config.json")):
    _banner("stage 1/6: pretrain (done; loading the exported checkpoint)")
    base_config, params = convert.load_hf(hf_dir)
    record["pretrain"] = {**done, "skipped": True}
    return base_config, params, hf_dir
  _banner("stage 1/6: pretrain the base model (full attention) on the embedded corpus")
  t0 = time.perf_counter()
  base_config, params, summary = _run_training(pretrain_config(config), stage_dir)
  convert.save_hf(base_config, params, hf_dir)
  summary.update(wall_s=time.perf_counter() - t0, hf_path=hf_dir)
  _save_json(os.path.join(stage_dir, "summary.json"), summary)
  record["pretrain"] = summary
  return base_config, params, hf_dir


def _share(model_config, params, optim_config) -> dict:
  share = optim.summary(model_lib.abstract_params(model_config),
                        optim.groups_from_config(optim_config))
  gates = [float(np.mean(np.asarray(v))) for p, v in optim.flat_paths_and_leaves(params)
           if p.endswith("memory_gate/bias")]
  return dict(trainable=share["trainable"], total_params=share["total"],
              trainable_share=share["share"],
              gate_bias_mean=float(np.mean(gates)) if gates else None)


def _load_trained(config, base, run, path, sc) -> tuple:
  """A trainable set loaded instead of trained (``demo.sft_from``): the base model with
  the memory (and the adapters of ``gate+lora``), then the saved leaves -> (model config,
  params, summary)."""
  base_config, base_params = base
  rng = jax.random.key(int(config.seed))
  gate_lib.check_trained_settings(path, dict(config.demo.memory), "demo.memory")
  model_config, params = gate_lib.with_memory(base_config, base_params, rng=rng,
                                              **dict(config.demo.memory))
  if run == "gate+lora":
    model_config, params = lora.with_lora(model_config, params, rank=int(config.demo.lora_rank),
                                          rng=rng)
  params = lora.load_subset(params, path, _trained_pattern(run), run)
  summary = dict(loaded_from=os.path.relpath(path), sha256=workdir_lib.sha256_file(path),
                 **_share(model_config, params, sc.optim))
  # The training record committed beside the file (``NAME.train.json``), if any.
  trained = (_load_json(os.path.splitext(path)[0] + ".train.json") or {}).get("summary", {})
  summary.update({k: trained[k] for k in ("final_step", "first_loss", "loss", "eval_loss",
                                          "wall_s") if k in trained})
  return model_config, params, summary


def stage_sft(config, workdir, base_source, base, record) -> dict:
  """-> {run: (model config, params)} for every trainable set of demo.sft_runs.

  Each trained set that is small (``SAVED_SETS``) is also written on its own as
  ``DIR/sft_<set>/trained.npz``; ``demo.sft_from`` loads such a file instead of
  training (recorded as ``loaded_from`` with the file's sha256)."""
  models = {}
  runs = _csv(config.demo.sft_runs)
  sources = sft_sources(config.demo)
  for i, run in enumerate(runs):
    sc = sft_config(config, run, base_source)
    if run in sources:
      _banner(f"stage 2/6: S-SFT {i + 1}/{len(runs)}, trainable set {run!r}: loaded from "
              f"{sources[run]}")
      model_config, params, summary = _load_trained(config, base, run, sources[run], sc)
      record.setdefault("sft", {})[run] = summary
      models[run] = (model_config, params)
      continue
    name = "sft_" + run.replace("+", "_")
    stage_dir = os.path.join(workdir, name)
    done = _load_json(os.path.join(stage_dir, "summary.json"))
    _banner(f"stage 2/6: S-SFT {i + 1}/{len(runs)}, trainable set {run!r}"
            + (" (done; restoring the checkpoint)" if done else ""))
    t0 = time.perf_counter()
    model_config, params, summary = _run_training(sc, stage_dir)
    if done:
      summary = {**done, "skipped": True}
    else:
      summary.update(wall_s=time.perf_counter() - t0, **_share(model_config, params, sc.optim))
      if run in SAVED_SETS:
        saved = os.path.join(stage_dir, "trained.npz")
        lora.save_subset(params, saved, _trained_pattern(run), run, model_config)
        summary.update(saved=saved, sha256=workdir_lib.sha256_file(saved))
      _save_json(os.path.join(stage_dir, "summary.json"), summary)
    record.setdefault("sft", {})[run] = summary
    models[run] = (model_config, params)
  return models


def _scenario(config, method, batch, max_context):
  m = config.demo.memory
  return Scenario(segment_len=int(m.segment_len), n_sink=int(m.n_sink),
                  n_window=int(m.n_window), batch_size=batch,
                  max_new_tokens=int(config.demo.digits) + 2, short_threshold=0,
                  max_context=max_context)


def eval_models(config, base, models) -> dict:
  """method label -> (model config, params) of every evaluated model.

  Adapters are merged into the kernels (``lora.merge``: the same function), so every
  S-SFT'd model has one config and shares one compiled Engine."""
  first = _csv(config.demo.sft_runs)[0]
  base_config, base_params = base
  memory = dict(config.demo.memory)
  out = {"full": (base_config.with_memory(attention_type="full"), base_params),
         "streaming": (base_config.with_memory(**{**memory, "attention_type": "streaming"}),
                       base_params)}
  for run in _csv(config.demo.sft_runs):
    label = "edgeinfinite" if run == first else f"edgeinfinite[{run}]"
    out[label] = lora.merge(*models[run])
  return out


def _warm(engine, tok) -> None:
  """Compiles the engine's steps (one short generate), so no timed prefill counts it."""
  n = engine.scenario.segment_len + 1
  engine.generate(np.full((engine.scenario.batch_size, n), tok.eos_id or 0, np.int32), 1)


def stage_eval(config, workdir, base, models, record) -> dict:
  path = os.path.join(workdir, "eval.json")
  done = _finished_stage(record, "eval", path, "stage 3/6: passkey evaluation")
  if done:
    return done
  _banner("stage 3/6: passkey retrieval through the Engine (key outside window + segment)")
  d = config.demo
  tok = data_lib.data_tokenizer(config.data)
  lengths = [int(round(m * d.sft_len)) for m in _csv(d.eval_mults, float)]
  depths = _csv(d.eval_depths, float)
  beyond = _csv(d.beyond_lengths, int)
  max_context = -(-(max(lengths + beyond) + d.digits + 8) // d.memory.segment_len) \
      * d.memory.segment_len
  reach = evaluate.local_reach(d.memory.segment_len, d.memory.n_window)
  out = {"lengths": lengths, "depths": depths, "sft_len": int(d.sft_len), "reach": reach,
         "beyond_lengths": beyond, "beyond_depth": float(d.beyond_depth),
         "passkey": {}, "beyond": {}, "cost": {}}
  engines = {}  # one Engine (one compilation) per model config; params are swapped in
  read_by_full = {}
  for method, (mc, params) in eval_models(config, base, models).items():
    if mc not in engines:
      engines[mc] = Engine(mc, params, _scenario(config, method, int(d.eval_batch), max_context))
      _warm(engines[mc], tok)
    engine = engines[mc].with_params(params)  # shares the compiled steps: no recompile
    timings = {}
    predict = evaluate.engine_predictor(engine, tok, int(d.digits) + 2, timings)
    if method == "full":  # keep its prompts for the outside reference (below)
      predict = _keeping(predict, read_by_full)
    t0 = time.perf_counter()
    grid = evaluate.passkey_grid(predict, tok, lengths, depths, int(d.eval_samples),
                                 seed=int(d.eval_seed), digits=int(d.digits), reach=reach,
                                 batch_size=int(d.eval_batch), desc=f"passkey {method}")
    if beyond:
      out["beyond"][method] = evaluate.passkey_grid(
          predict, tok, beyond, [float(d.beyond_depth)], int(d.eval_samples),
          seed=int(d.eval_seed) + 1, digits=int(d.digits), reach=reach,  # other keys
          batch_size=int(d.eval_batch), desc=f"passkey {method} beyond")
    grid["wall_s"] = time.perf_counter() - t0
    out["passkey"][method] = grid
    if not method.startswith("edgeinfinite["):  # cost is the same for every S-SFT'd model
      out["cost"][method] = evaluate.cost_curve(
          timings, engine, lengths + beyond,
          grows_with_length=mc.memory.attention_type == "full")
      out["cost"][method]["compile_count"] = engine.compile_count()
  reference = _reference_cost(config, base[0], read_by_full, lengths + beyond)
  if reference:
    out["cost"]["transformers"] = reference
  _save_json(path, out)
  record["eval"] = out
  return out


def _keeping(predict, kept: dict):
  """``predict`` that also keeps each batch of prompts it reads, by prompt length."""
  def wrapped(prompts):
    kept.setdefault(len(prompts[0]), []).append(np.asarray(prompts, np.int32))
    return predict(prompts)
  return wrapped


def _reference_cost(config, base_config, prompts, lengths) -> dict | None:
  """transformers' prefill of the prompts the ``full`` route read (``eval.reference``),
  where PyTorch is installed and the base model is a GGUF file; else None."""
  source = models_lib.init_source(config.init)
  if reference.missing() or not prompts or not source:
    return None
  path = models_lib.resolve(source)
  if not path.endswith(".gguf"):
    return None
  _banner("stage 3/6: the same prompts through transformers (PyTorch), the outside reference")
  by_length = {}
  for n, batches in prompts.items():  # = the timed prefill, under its nominal length
    by_length.setdefault(evaluate.nominal_length(n, lengths), []).extend(
        b[:, :-1] for b in batches)
  return reference.transformers_prefill(path, by_length,
                                        evaluate.kv_bytes_per_token(base_config))


def _heldout_batches(config, n, split="heldout"):
  """The first n batches of the corpus' held-out (or training) rows, text only."""
  c = pretrain_config(config).data
  c.task_mix = 0.0
  rows = getattr(data_lib.load(c), split)
  return data_lib.eval_batches(rows, int(c.batch_size), n)


def suite_scenario(config) -> Scenario:
  """The suite's Scenario: the demo's memory sizes, batch 1, every prompt on the long
  route, room for the longest task and its tokens to generate."""
  d, m = config.demo, config.demo.memory
  tasks = _csv(d.suite_tasks)
  new = max([ruler.TOKENS_TO_GENERATE[ruler.TASKS[t][0]] for t in tasks if t in ruler.TASKS]
            + [longctx.LCC_MAX_NEW_TOKENS if longctx.LCC in tasks else 1])
  longest = max(_csv(d.suite_lengths, int) + [hi for _, hi in _bins(d.suite_lcc_bins)]
                + [int(d.suite_nll_length)])
  return Scenario(segment_len=int(m.segment_len), n_sink=int(m.n_sink),
                  n_window=int(m.n_window), batch_size=1, max_new_tokens=new,
                  short_threshold=0, max_context=-(-(longest + new) // m.segment_len)
                  * int(m.segment_len))


def _bins(text: str) -> list[tuple[int, int]]:
  """"lo-hi,..." -> [(lo, hi), ...]; ValueError on anything else."""
  out = []
  for b in _csv(text):
    lo, hi = b.split("-")
    out.append((int(lo), int(hi)))
  return out


def stage_suite(config, workdir, base, models, record) -> dict:
  """The long-context suite (``eval.longctx``): LCC, beyond-window NLL and RULER tasks
  on held-out standard-library text, every method at the first trained set's state
  bytes (``longctx.method_engines``: h2o / snapkv spend it on kept tokens)."""
  path = os.path.join(workdir, "suite.json")
  done = _finished_stage(record, "suite", path, "stage 4/6: long-context suite")
  if done:
    return done
  d = config.demo
  if not _csv(d.suite_tasks):
    return {}
  _banner("stage 4/6: long-context suite (LCC, NLL past reach, RULER) at equal state bytes")
  base_config, base_params = base
  sets = {k: v for k, v in eval_models(config, base, models).items()
          if k.startswith("edgeinfinite")}
  engines, info = longctx.method_engines(base_config, base_params, suite_scenario(config),
                                         sets)
  t0 = time.perf_counter()
  out = longctx.run_suite(
      engines, data_lib.data_tokenizer(config.data), _csv(d.suite_lengths, int),
      int(d.suite_n), int(d.eval_seed), tasks=_csv(d.suite_tasks),
      lcc_bins=_bins(d.suite_lcc_bins), nll_docs=int(d.suite_nll_docs),
      nll_length=int(d.suite_nll_length), bucket=int(d.suite_nll_bucket),
      heldout_fraction=float(config.data.heldout_fraction))
  out["config"].update(methods=info, wall_s=time.perf_counter() - t0)
  _save_json(path, out)
  record["suite"] = out
  return out


def stage_quant(config, workdir, base, models, record) -> dict:
  """Weight-only PTQ of the base model (float -> quantize -> dequantize) per preset:
  held-out loss and passkey at 8x; then the integer path's agreement with
  fake-quant on the same held-out batches (``integer_check``).
  """
  path = os.path.join(workdir, "quant.json")
  done = _finished_stage(record, "quant", path, "stage 5/6: quantization")
  if done:
    return done
  _banner("stage 5/6: post-training quantization (weights), held-out loss and passkey @8x")
  d = config.demo
  base_config, base_params = base
  batches = _heldout_batches(config, int(d.quant_eval_batches))
  mem_config, mem_params = lora.merge(*models[_csv(d.sft_runs)[0]])
  tok = data_lib.data_tokenizer(config.data)
  length = int(8 * d.sft_len)
  depths = _csv(d.quant_depths or d.eval_depths, float)
  reach = evaluate.local_reach(d.memory.segment_len, d.memory.n_window)
  scenario = _scenario(config, "edgeinfinite", int(d.eval_batch), length + 64)
  out = {"presets": {}, "heldout_batches": len(batches), "passkey_length": length}

  engine = Engine(mem_config, mem_params, scenario)

  def passkey_at_8x(params, label):
    predict = evaluate.engine_predictor(engine.with_params(params), tok, int(d.digits) + 2)
    g = evaluate.passkey_grid(predict, tok, [length], depths, int(d.eval_samples),
                              seed=int(d.eval_seed), digits=int(d.digits), reach=reach,
                              batch_size=int(d.eval_batch), desc=f"passkey {label}")
    return g["mean"]

  names = ["float"] + _csv(d.quant_presets)
  for name in tqdm(names, desc="quant presets", dynamic_ncols=True):
    t0 = time.perf_counter()
    if name == "float":
      bp, mp, bits = base_params, mem_params, 32
    else:
      qc = _quant_preset(name, base_config)
      bp = ptq.dequantize_params(ptq.quantize_params(base_params, qc))
      mp = ptq.dequantize_params(ptq.quantize_params(mem_params, qc))
      bits = qc.linear_weights.bits if qc.linear_weights is not None else 32
    ev = train.evaluate(base_config, bp, batches)
    out["presets"][name] = {"weight_bits": bits, "heldout_loss": ev["eval_loss"],
                            "heldout_ppl": ev["eval_ppl"],
                            "passkey_8x": passkey_at_8x(mp, name),
                            "wall_s": time.perf_counter() - t0}
  tokens = [b["tokens"] for b in batches]
  calib_batches = [b["tokens"] for b in _heldout_batches(config, 2, split="train")]
  out["integer_path"] = integer_check(base_config, base_params, tokens, calib_batches,
                                      _integer_modes(d))
  _save_json(path, out)
  record["quant"] = out
  return out


def _quant_preset(name, model_config):
  """A weight-only recipe of ``demo.quant_presets`` ("fine_grained" or "rtn_per_tensor",
  optionally ":4" / ":8" weight bits; defaults 4 and 8). Per-group presets get the
  largest group (<= 128) that divides every contraction dimension of the model (tiny
  models have hidden < 128)."""
  preset, _, bits = name.partition(":")
  if preset == "rtn_per_tensor":
    return qconfig.preset(preset, weight_bits=int(bits or 8))
  c = model_config
  dims = (c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size)
  group = next(g for g in (128, 64, 32, 16, 8, 4, 2, 1) if all(x % g == 0 for x in dims))
  return qconfig.preset(preset, base="w8a8" if bits == "8" else "w4a8", group_size=group)


def integer_check(base_config, base_params, heldout, calib_batches, modes) -> dict:
  """The integer path against fake-quant (``qat.integer_agreement``) for the base model
  at the ``w8a8`` preset (PTQ, calibrated), in each requantization mode of ``modes``: greedy
  agreement %, max logit difference in output steps and the integer model's held-out
  loss. Reported, never fatal: a failure is a result to show, not a crash."""
  if not modes:
    return {"status": "not run: demo.integer_modes is empty"}
  try:
    quant = qconfig.preset("w8a8")  # per-channel weights: integer-capable (per-group is not)
    blocker = qat.integer_blocker(quant)
    if blocker:
      return {"status": f"not run: {blocker}"}
    student = quantized(base_config, quant)
    params = calib.quantize_model(student, base_params, calib_batches)
    modes = {mode: qat.integer_agreement(student, params, heldout, calib_batches,
                                         requant_mode=mode)
             for mode in tqdm(modes, desc="integer path", dynamic_ncols=True)}
    return {"status": "ok", "recipe": "PTQ w8a8", "modes": modes}
  except Exception as e:  # noqa: BLE001
    return {"status": f"not run: {type(e).__name__}: {e}"}


# ----------------------------------------------------------------------------- results


def run(config, workdir: str) -> dict:
  """Runs (or resumes) every stage; returns the metrics record."""
  train.validate(config)
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  t0 = time.perf_counter()
  record: dict[str, Any] = {"stages_skipped": []}
  prev = _load_json(os.path.join(workdir, "metrics.json")) or {}
  base_config, base_params, base_source = stage_pretrain(config, workdir, record)
  base = (base_config, base_params)
  models = stage_sft(config, workdir, base_source, base, record)
  stage_eval(config, workdir, base, models, record)
  stage_suite(config, workdir, base, models, record)
  stage_quant(config, workdir, base, models, record)
  record["stages_skipped"] = (
      [k for k in ("pretrain",) if record[k].get("skipped")]
      + [f"sft[{r}]" for r, s in record["sft"].items() if s.get("skipped")]
      + record["stages_skipped"])
  record["wall_s"] = time.perf_counter() - t0  # this invocation only
  if prev.get("wall_s") and record["stages_skipped"]:
    record["first_run_wall_s"] = prev.get("first_run_wall_s", prev["wall_s"])
  _banner("stage 6/6: results")
  table = demo_report.write_results(workdir, record)
  _save_json(os.path.join(workdir, "metrics.json"), record)
  print("\n" + table, flush=True)
  print(f"results in {os.path.abspath(workdir)} (metrics.json, results.md, plots); "
        f"wall {record['wall_s']:.0f} s", flush=True)
  return record
