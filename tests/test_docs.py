"""The docs run: every code block marked runnable in README.md and docs/*.md executes, and
every relative link in them resolves.

A block is marked by an HTML comment on the line right before its fence::

    <!-- runnable -->
    ```python
    ...
    ```

``<!-- runnable requires=mod_a,mod_b -->`` skips the block where one of those modules is
not installed (the exporters, the runtimes). ``<!-- runnable base-install -->`` marks a
block on the real model that ``test_base_install`` runs in the torch-free base install
(the README's generate command); this file leaves it to that test. Python blocks run in a subprocess with this
interpreter; bash blocks with ``bash -e``, ``python`` and ``.venv/bin/python`` being this
interpreter too. Each runs in a scratch directory (``experiments/`` linked in, so the
commands' relative config paths work and their workdirs land in the scratch), in tiny
mode (``EDGEINFINITE_TINY=1``; ``TMPDIR`` inside the scratch) with XLA's cheap compiles, within ``BLOCK_TIMEOUT_S``.
Mark only blocks of a few seconds: together they should stay under about a minute on
2 cores. Real-model and long runs stay unmarked.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest

import fast_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
BLOCK_TIMEOUT_S = 240  # one block, on a loaded 2-core machine; quiet, each takes ~5-15 s

MARKER = re.compile(r"^\s*<!--\s*runnable\b(.*?)-->\s*$")
REQUIRES = re.compile(r"^\s*(base-install\s*)?(?:requires=([\w.]+(?:,[\w.]+)*))?\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")


class Block:
  def __init__(self, path: str, line: int, lang: str, code: str, requires: tuple[str, ...],
               base_install: bool = False):
    self.path, self.line, self.lang, self.code, self.requires = path, line, lang, code, requires
    self.base_install = base_install

  @property
  def id(self) -> str:
    return f"{os.path.relpath(self.path, ROOT)}:{self.line}"


def extract(path: str) -> tuple[list[Block], list[str]]:
  """The marked blocks of a markdown file, and the errors of malformed markers."""
  lines = open(path, encoding="utf-8").read().splitlines()
  blocks, errors = [], []
  where = lambda i: f"{os.path.relpath(path, ROOT)}:{i + 1}"
  for i, line in enumerate(lines):
    m = MARKER.match(line)
    if not m:
      continue
    args = REQUIRES.match(m.group(1))
    fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
    if args is None:
      errors.append(f"{where(i)}: bad marker arguments {m.group(1).strip()!r} "
                    "(expected '[base-install] [requires=mod,mod]')")
    elif fence is None or fence.group(1) not in ("python", "bash"):
      errors.append(f"{where(i)}: a runnable marker must sit right before a ```python "
                    "or ```bash fence")
    else:
      end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
      if end is None:
        errors.append(f"{where(i)}: the marked block is never closed")
        continue
      requires = tuple(args.group(2).split(",")) if args.group(2) else ()
      blocks.append(Block(path, i + 2, fence.group(1), "\n".join(lines[i + 2:end]) + "\n",
                          requires, base_install=bool(args.group(1))))
  return blocks, errors


def all_blocks() -> list[Block]:
  return [b for path in DOCS for b in extract(path)[0]]


def scratch_dir(tmp_path, python: str = sys.executable) -> str:
  """A working directory where the docs' relative paths resolve: experiments/ linked in,
  and .venv/bin/python (and python, python3 on PATH) running ``python``."""
  work = tmp_path / "work"
  (work / ".venv" / "bin").mkdir(parents=True)
  os.symlink(os.path.join(ROOT, "experiments"), work / "experiments")
  for name in ("python", "python3"):
    shim = work / ".venv" / "bin" / name
    shim.write_text(f'#!/bin/sh\nexec "{python}" "$@"\n')
    shim.chmod(0o755)
  return str(work)


def run_block(block: Block, cwd: str, python: str = sys.executable,
              tiny: bool = True) -> subprocess.CompletedProcess:
  env = fast_compile.fast_env(
      JAX_PLATFORMS="cpu", TMPDIR=cwd, **({"EDGEINFINITE_TINY": "1"} if tiny else {}),
      PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
      PATH=os.pathsep.join([os.path.join(cwd, ".venv", "bin"), os.environ.get("PATH", "")]))
  script = os.path.join(cwd, "block.py" if block.lang == "python" else "block.sh")
  with open(script, "w", encoding="utf-8") as f:
    f.write(block.code)
  argv = [python, script] if block.lang == "python" else ["bash", "-e", script]
  return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=BLOCK_TIMEOUT_S)


# ------------------------------------------------------------------------ the blocks


def test_markers_are_well_formed_and_the_readme_has_a_runnable_block():
  errors = [e for path in DOCS for e in extract(path)[1]]
  assert not errors, "\n".join(errors)
  blocks = all_blocks()
  assert any(b.path.endswith("README.md") and b.lang == "python" for b in blocks)
  assert {b.lang for b in blocks} == {"python", "bash"}


def test_a_failing_block_fails_and_a_malformed_marker_is_reported(tmp_path):
  doc = tmp_path / "doc.md"
  doc.write_text("<!-- runnable -->\n```bash\ntrue\nfalse\necho never\n```\n\n"
                 "<!-- runnable -->\n```python\nraise SystemExit('boom')\n```\n\n"
                 "<!-- runnable -->\ntext, not a fence\n\n"
                 "<!-- runnable needs=x -->\n```bash\ntrue\n```\n")
  blocks, errors = extract(str(doc))
  assert [(b.lang, b.line) for b in blocks] == [("bash", 2), ("python", 9)]
  assert len(errors) == 2 and "right before" in errors[0] and "bad marker" in errors[1]
  work = scratch_dir(tmp_path)
  bash = run_block(blocks[0], work)
  assert bash.returncode != 0 and "never" not in bash.stdout  # bash -e stops at `false`
  py = run_block(blocks[1], work)
  assert py.returncode != 0 and "boom" in py.stderr


@pytest.mark.slow  # subprocesses importing JAX and compiling: ~5-15 s each
@pytest.mark.parametrize("block", all_blocks(), ids=lambda b: b.id)
def test_runnable_block(block, tmp_path):
  if block.base_install:
    pytest.skip("the real model in the base install: test_base_install runs it")
  missing = [m for m in block.requires if importlib.util.find_spec(m) is None]
  if missing:
    pytest.skip(f"needs {', '.join(missing)}")
  start = time.monotonic()
  proc = run_block(block, scratch_dir(tmp_path))
  wall = time.monotonic() - start
  assert proc.returncode == 0, (
      f"{block.id}: the {block.lang} block failed (exit {proc.returncode}, {wall:.1f} s)\n"
      f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")


# ------------------------------------------------------------------------ the links

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose_lines(path: str):
  """(line number, text) of the lines outside fenced code blocks, inline code removed."""
  inside = False
  for i, line in enumerate(open(path, encoding="utf-8").read().splitlines(), 1):
    if line.lstrip().startswith("```"):
      inside = not inside
      continue
    if not inside:
      yield i, re.sub(r"`[^`]*`", "", line)


def anchors(path: str) -> set[str]:
  """GitHub's heading anchors of a markdown file (inline code keeps its text)."""
  out, inside = set(), False
  for line in open(path, encoding="utf-8").read().splitlines():
    if line.lstrip().startswith("```"):
      inside = not inside
      continue
    m = None if inside else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if m:
      text = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower())
      out.add(text.replace(" ", "-"))
  return out


def test_anchor_slugs_follow_github():
  readme = anchors(os.path.join(ROOT, "README.md"))
  assert {"where-it-stands-read-this-first", "layout", "two-commands"} <= readme
  assert "benchmarks-make-bench" in anchors(os.path.join(ROOT, "docs", "benchmarks.md"))


def broken_links(path: str) -> list[str]:
  """Relative links of a markdown file whose file, or heading anchor, does not exist."""
  bad = []
  for n, line in prose_lines(path):
    for target in LINK.findall(line):
      if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
        continue
      file_part, _, fragment = target.partition("#")
      dest = path if not file_part else os.path.normpath(
          os.path.join(os.path.dirname(path), file_part))
      if not os.path.exists(dest):
        bad.append(f"line {n}: {target} (no such file: {os.path.relpath(dest, ROOT)})")
      elif fragment and dest.endswith(".md") and fragment not in anchors(dest):
        bad.append(f"line {n}: {target} (no heading #{fragment} in "
                   f"{os.path.relpath(dest, ROOT)})")
  return bad


def test_broken_links_are_found(tmp_path):
  (tmp_path / "other.md").write_text("# A heading: `code`\n")
  doc = tmp_path / "doc.md"
  doc.write_text("[ok](other.md) [ok](other.md#a-heading-code) [ok](#top) [web](https://x.org)\n"
                 "# Top\n[gone](missing.md) ![img](pic.png) [bad anchor](other.md#nope)\n"
                 "```\n[in code](ignored.md)\n```\n")
  bad = broken_links(str(doc))
  assert len(bad) == 3, bad
  assert "missing.md" in bad[0] and "pic.png" in bad[1] and "#nope" in bad[2]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(path):
  bad = broken_links(path)
  assert not bad, f"{os.path.relpath(path, ROOT)}: broken links:\n" + "\n".join(bad)
