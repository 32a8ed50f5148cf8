"""A run's workdir across processes and restarts: its record, its lock decisions,
and restoring the newest intact checkpoint (the contract in ``workdir.py``).

Multi-process runs decide all of this on process 0 (``main_decides``), which alone
writes files other than orbax's; every process learns the outcome, so none goes
on into a collective the others never reach.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from edgeinfinite_jax import configs
from edgeinfinite_jax.model.config import ModelConfig
from edgeinfinite_jax.train import workdir as workdir_lib


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  """Atomic (tmp dir + rename) saves, keeping the last ``checkpoint.keep``."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options)


def from_main(value: int) -> int:
  """Process 0's ``value`` on every process (one process: ``value``)."""
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def main_decides(fn, workdir: str):
  """``fn()`` on process 0 only; a WorkdirError / CheckpointError it raises is
  raised on every process (the others point to process 0's message), so no
  process goes on into a collective the others never reach."""
  error, result = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except (workdir_lib.WorkdirError, workdir_lib.CheckpointError) as e:
      error = e
  if not from_main(int(error is None)):
    raise error or workdir_lib.WorkdirError(
        f"workdir {workdir}: process 0 stopped the run; its output says why")
  return result


def prepare_workdir(workdir: str, config, model_config: ModelConfig, fresh: bool) -> None:
  """Process 0: refuse a config that changes the recorded run (or, ``fresh``,
  move that run aside), then record this one."""
  config_json = config.to_json_best_effort(indent=2, sort_keys=True)
  if fresh:
    moved = workdir_lib.move_aside(workdir)
    if moved:
      print(f"train.fresh: moved the previous run of {workdir} to {moved}", flush=True)
  else:
    # defaults: a workdir recorded before a key existed resumes under its default
    workdir_lib.check_run(workdir, json.loads(config_json), model_config.to_dict(),
                          configs.base_config().to_dict(), ModelConfig().to_dict())
  workdir_lib.write_record(workdir, config_json, model_config.to_dict())


def _reject(directory: str, step: int, reason: str, rejected: list) -> None:
  moved = workdir_lib.quarantine(directory, step)
  rejected.append(f"step {step}: {reason} (moved to {moved})")
  print(f"warning: checkpoint {os.path.join(directory, str(step))} is bad: {reason}; moved "
        f"to {moved}; falling back to the checkpoint before it", file=sys.stderr, flush=True)


def _pick_checkpoint(directory: str, rejected: list) -> int:
  """Process 0: the newest step whose manifest verifies (-1: none saved yet);
  failing ones are moved aside. Raises CheckpointError when steps existed but
  none is intact: a workdir with checkpoints never silently starts over."""
  for step in workdir_lib.checkpoint_steps(directory):
    reason = workdir_lib.verify(os.path.join(directory, str(step)))
    if reason is None:
      return step
    _reject(directory, step, reason, rejected)
  if rejected:
    raise workdir_lib.CheckpointError(
        f"no intact checkpoint in {directory}; every one was moved aside (never deleted):\n  "
        + "\n  ".join(rejected)
        + "\nRestore one by hand (move a corrupt-<step> back to <step>) or start over with "
          "train.fresh=True")
  return -1


def restore(workdir: str, config, abstract_state):
  """(manager, state) from the newest intact checkpoint; (None, None) if none.

  A step whose checksum manifest fails is skipped for the one before it. A
  step without a manifest that orbax cannot read is skipped the same way in a
  one-process run; with a manifest that verifies, or with several processes
  (which must agree on one step), such a failure stops the run with orbax's
  reason in one line.
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  rejected: list[str] = []
  while True:
    step = main_decides(lambda: _pick_checkpoint(directory, rejected), workdir)
    step = from_main(-1 if step is None else step)  # None: not process 0
    if step < 0:
      return None, None
    mngr = checkpoint_manager(workdir, config)
    try:
      return mngr, mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # orbax / TensorStore errors come in many types
      mngr.close()
      step_dir = os.path.join(directory, str(step))
      reason = f"orbax cannot restore it: {workdir_lib.one_line(e)}"
      if workdir_lib.has_manifest(step_dir):
        raise workdir_lib.CheckpointError(
            f"checkpoint {step_dir}: {reason}; its files match their sha256 manifest, so it "
            "is intact but does not fit this run (model or optimizer shapes?)") from e
      if jax.process_count() > 1:
        raise workdir_lib.CheckpointError(f"checkpoint {step_dir}: {reason}") from e
      _reject(directory, step, reason, rejected)
