"""The outside reference for the demo's cost rows: transformers on the same GGUF file.

Where PyTorch, transformers and accelerate are installed (the ``test`` extra; the
demo itself never needs them), the demo times the very prompts its ``full`` route
read through ``transformers.AutoModelForCausalLM.from_pretrained(dir,
gguf_file=...)`` (its own GGUF reader and dequantizer, so the weights are the same
by an independent path), float32, SDPA attention, as many threads as this process
may use: ``model(prompt, use_cache=True, logits_to_keep=1)``, what ``generate``
runs as its prefill. ``make bench`` is the controlled comparison (separate
processes, repeats, working memory); this row puts the demo's own numbers next to
the runtime most users know.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Mapping, Sequence

import numpy as np

MODULES = ("torch", "transformers", "accelerate")  # accelerate: transformers' GGUF loader asks


def missing() -> list[str]:
  """The reference's packages that are not importable (none: it can run)."""
  return [m for m in MODULES if importlib.util.find_spec(m) is None]


def _threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def transformers_prefill(gguf_path: str, prompts: Mapping[int, Sequence[np.ndarray]],
                         kv_bytes_per_token: int) -> dict:
  """Times the prefill of each prompt (``{length: [int32 [batch, time] arrays]}``)
  through transformers -> a cost curve with ``evaluate.cost_curve``'s keys (``ttft_s``:
  median over the prompts of a length, ``ttft_spread_s``: min and max; the KV cache
  of ``kv_bytes_per_token`` per token and row, as the engine's ``full`` route counts it).
  """
  import torch  # optional (the test extra): only this reference needs it
  import transformers  # optional (the test extra), as torch
  torch.set_num_threads(_threads())
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
      dtype=torch.float32, attn_implementation="sdpa").eval()
  out = {"lengths": [], "ttft_s": [], "ttft_spread_s": [], "state_bytes": [], "kv_bytes": [],
         "prompts": [], "threads": torch.get_num_threads(),
         "transformers": transformers.__version__, "torch": torch.__version__}
  with torch.inference_mode():
    model(torch.zeros((1, 128), dtype=torch.long), use_cache=True, logits_to_keep=1)  # warm-up
    for n in sorted(prompts):
      times = []
      for p in prompts[n]:
        ids = torch.from_numpy(np.asarray(p, np.int64))
        t0 = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - t0)
      kv = kv_bytes_per_token * int(np.asarray(prompts[n][0]).size)
      out["lengths"].append(int(n))
      out["ttft_s"].append(float(np.median(times)))
      out["ttft_spread_s"].append([float(min(times)), float(max(times))])
      out["state_bytes"].append(kv)
      out["kv_bytes"].append(kv)
      out["prompts"].append(len(times))
  return out
