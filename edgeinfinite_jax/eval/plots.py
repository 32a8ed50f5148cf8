"""Plots of the demo's results (matplotlib, Agg backend: no display needed).

* ``passkey_heatmap``: accuracy over depth (rows) x length (columns), one file
  per method (``passkey_heatmap_<method>.png``).
* ``ttft_memory``: time to first token and engine state bytes against prompt
  length, one line per method (``ttft_memory.png``).
"""

from __future__ import annotations

import os
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str) -> str:
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def passkey_heatmap(grid: Mapping, path: str, title: str = "") -> str:
  """``grid`` as returned by ``evaluate.passkey_grid``; writes ``path`` (PNG)."""
  acc = np.asarray(grid["accuracy"], float).T  # [depth, length]
  lengths, depths = grid["lengths"], grid["depths"]
  fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.7 * len(depths)))
  im = ax.imshow(acc * 100, vmin=0, vmax=100, cmap="viridis", aspect="auto", origin="lower")
  ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("key depth")
  for i in range(acc.shape[0]):
    for j in range(acc.shape[1]):
      v = acc[i, j] * 100
      ax.text(j, i, f"{v:.0f}", ha="center", va="center",
              color="black" if v > 60 else "white", fontsize=9)
  fig.colorbar(im, ax=ax, label="accuracy (%)")
  ax.set_title(title or "passkey accuracy")
  return _save(fig, path)


def ttft_memory(curves: Mapping[str, Mapping], path: str) -> str:
  """``curves``: method -> ``evaluate.cost_curve`` output; writes ``path`` (PNG)."""
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
  for name, c in curves.items():
    a1.plot(c["lengths"], np.asarray(c["ttft_s"]) * 1000, marker="o", label=name)
    a2.plot(c["lengths"], np.asarray(c["kv_bytes"]) / 2**20, marker="o", label=name)
  for ax, ylabel in ((a1, "time to first token (ms)"), (a2, "KV cache + memory state (MiB)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
  a1.set_yscale("log")
  fig.suptitle("prefill cost against prompt length (Engine, this machine)")
  return _save(fig, path)


def _finish(fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> str:
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title(title)
  return _save(fig, path)


def nll_curves(methods: Mapping[str, Mapping], path: str) -> str:
  """``methods``: method -> ``longctx.nll_curve`` output; per-token NLL against position
  (bucket middles; the band is one standard error over documents) and local reach."""
  fig, ax = plt.subplots(figsize=(7, 4))
  reach = None
  for name, c in methods.items():
    mid = [(a + b) / 2 for a, b in c["buckets"]]
    mean = np.array([x["mean"] for x in c["nll"]])
    se = np.array([x["stderr"] for x in c["nll"]])
    ax.plot(mid, mean, marker=".", label=name)
    ax.fill_between(mid, mean - se, mean + se, alpha=0.15)
    reach = c["reach"]
  if reach is not None:
    ax.axvline(reach, color="grey", linestyle="--", linewidth=1, label="local reach")
  return _finish(fig, ax, path, "token position", "next-token NLL (nats)",
                 "NLL against position (held-out documents)")


def _upper(length: str) -> int:
  """A cell's length in tokens: "2048", or an LCC bin's upper end ("1024-2048", "1-2k")."""
  top = length.split("-")[-1]
  return int(top[:-1]) * 1024 if top.endswith("k") else int(top)


def scores_by_length(table: Mapping[str, Mapping[str, float]], path: str) -> str:
  """``table``: method -> {"task@length": mean score}; one line per method and task
  against length (LCC bins at their upper bound)."""
  fig, ax = plt.subplots(figsize=(7, 4))
  for method, cells in table.items():
    by_task: dict[str, list] = {}
    for cell, score in cells.items():
      task, _, length = cell.partition("@")
      by_task.setdefault(task, []).append((_upper(length), 100 * score))
    for task, pts in sorted(by_task.items()):
      pts.sort()
      ax.plot(*zip(*pts), marker="o", label=f"{method}: {task}")
  ax.set_xscale("log", base=2)
  return _finish(fig, ax, path, "prompt length (tokens)", "score (x100)",
                 "long-context tasks against length")
