"""generate(36) against prefill + 35 decode calls, in one process, on the bench's model.

    .venv/bin/python experiments/generate_vs_steps.py [CHECKOUT]

The 55M model of ``make bench`` (``bench.plan.full_plan``, random weights), the
``full`` and ``edgeinfinite`` routes at a 1024-token context: ``bench.workers``'
generate-vs-steps measurement (both compiled first, then 3 alternating pairs; the
medians and the median ratio). ``CHECKOUT``: import the package from another
checkout (e.g. a ``git worktree`` of an earlier commit) to compare two versions of
the engine on the same machine in the same minutes.
"""

import sys

if len(sys.argv) > 1:
  sys.path.insert(0, sys.argv[1])

import jax  # noqa: E402
import numpy as np  # noqa: E402

import edgeinfinite_jax  # noqa: E402
from edgeinfinite_jax import Engine, Scenario, with_memory  # noqa: E402
from edgeinfinite_jax.bench import plan as plan_lib, workers  # noqa: E402
from edgeinfinite_jax.model.config import ModelConfig  # noqa: E402


def main():
  print("package from", edgeinfinite_jax.__file__)
  config = ModelConfig(**dict(plan_lib.full_plan().model))
  params = workers.random_params(config, 0)
  segment = 512
  prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, 1024)).astype(np.int32)
  for method in ("full", "edgeinfinite"):
    if method == "full":
      c, p = config.with_memory(attention_type="full"), params
    else:
      c, p = with_memory(config, params, rng=jax.random.key(1), attention_type=method,
                         segment_len=segment, n_sink=4, n_window=1024)
    engine = Engine(c, p, Scenario(segment_len=segment, n_sink=4, n_window=1024, batch_size=1,
                                   max_new_tokens=40, short_threshold=0, max_context=2048))
    engine.prefill(prompt)  # compiles the steps
    r = workers._generate_vs_steps(engine, prompt, 36, 3)
    print(method, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})


if __name__ == "__main__":
  main()
