"""Training data: the embedded corpus, local/hub datasets, packing and batches.

* ``embedded`` (the default): real English text that every Python installation
  carries, namely the docstrings and comments of the standard library plus its
  ``.txt``/``.rst`` files, read in sorted path order up to ``data.max_bytes``.
  No download, deterministic on a given Python install. Each file is a
  document; a file goes to the held-out split iff the hash of its relative
  path says so (a file is never in both splits, whatever the size cap), and
  each split fills its share of the cap.
* ``text`` / ``json`` / ``parquet``: local files through
  ``datasets.load_dataset(FORMAT, data_files=...)``, documents in
  ``data.text_field`` (``text`` files: one document per line), held out by
  the hash of the document text.
* ``hub``: ``data.path`` is passed to ``datasets.load_dataset`` as a dataset
  name (the user's network and cache; nothing here downloads by itself).
* ``task``: segmented-SFT samples from ``tasks.py`` (passkey, multi_needle,
  kv_recall, doc_qa, summarize; ``data.tasks`` = ``"passkey"`` or weighted
  ``"passkey:3,kv_recall:1"``), one sample per row, right-padded to
  ``data.seq_len``, with a ``loss_mask`` on the answer tokens only (reference
  §4.4). ``data.task_samples`` rows are drawn (depth uniform over
  ``[0, data.task_max_depth]``: a cap keeps the needle out of local reach), held out by a
  separate seed. The real-text tasks take their documents from the embedded
  corpus. With ``data.task_mix > 0`` an ``embedded`` (or file) source instead
  replaces that fraction of its rows by task samples whose loss covers every
  token (passkey-style data in pretraining); ``data.text_mix > 0`` does the
  converse for the ``task`` source: that share of its rows are packed rows of
  the embedded corpus's split, loss on every token (S-SFT that also sees
  ordinary long text, where the memory's read must not hurt).
* ``data.embedded_form``: a ``.py`` file of ``embedded`` gives its docstrings and
  comments (``prose``) or the whole file (``source``: code, as the long-context
  tasks read it); the split by path hash is the same.

Documents are tokenized as ``[bos] + ids + [eos]`` (BOS by the tokenizer's own
rule), concatenated and cut into rows ``[n, seq_len]`` int32 (the tail that does
not fill a row is dropped).

Batches are a pure function of (seed, step): ``batch_at`` draws the rows of
step s from a per-epoch permutation seeded by (seed, epoch), so a resumed run
sees exactly the batches the interrupted one would have.

"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import re
import sysconfig
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from edgeinfinite_jax.model.config import ConfigError
from edgeinfinite_jax.checkpoints import models
from edgeinfinite_jax.checkpoints.tokenizer import load_tokenizer
from edgeinfinite_jax.data import tasks as tasks_lib

SOURCES = ("embedded", "text", "json", "parquet", "hub", "task")
# Directories of the stdlib that are not prose: tests (also absent from some
# distro builds, which would make the corpus install-dependent), codec tables,
# binaries, bundled wheels, demo scripts, third-party packages.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                        "__pycache__", "lib-dynload", "ensurepip", "encodings", "turtledemo"})
# A docstring-like string starting a line, or a comment line (no re.S: a
# comment ends at its newline; the string body spans lines via [\s\S]).
_PIECE = re.compile(r'^[ \t]*[rRuU]?("""|\'\'\')([\s\S]*?)\1|^[ \t]*#+[ \t]?(.*)$', re.M)


class Split(NamedTuple):
  train: np.ndarray    # [n, seq_len] int32 (or MaskedRows)
  heldout: np.ndarray  # [m, seq_len] int32 (or MaskedRows)


class MaskedRows(NamedTuple):
  """Rows with a per-token loss mask (1 = the target counts), e.g. S-SFT samples.

  ``batch_at`` / ``eval_batches`` return ``{"tokens", "loss_mask"}`` for them;
  ``train.cross_entropy`` then counts only the masked targets.
  """
  tokens: np.ndarray     # [n, seq_len] int32
  loss_mask: np.ndarray  # [n, seq_len] float32

  @property
  def shape(self):
    return self.tokens.shape

  def rows(self, idx) -> dict[str, np.ndarray]:
    return {"tokens": self.tokens[idx], "loss_mask": self.loss_mask[idx]}


def n_rows(rows) -> int:
  return len(rows.tokens) if isinstance(rows, MaskedRows) else len(rows)


def _take(rows, idx) -> dict[str, np.ndarray]:
  return rows.rows(idx) if isinstance(rows, MaskedRows) else {"tokens": rows[idx]}


# ----------------------------------------------------------------------------- corpus


def stdlib_files(root: str | None = None) -> list[str]:
  """Sorted relative paths of the stdlib's .py/.txt/.rst files we read."""
  root = root or sysconfig.get_paths()["stdlib"]
  out = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("config-"))
    out += [os.path.relpath(os.path.join(d, f), root) for f in files
            if f.endswith((".py", ".txt", ".rst"))]
  return sorted(out)


def prose(source: str) -> str:
  """Docstrings and comment blocks of Python source, in file order."""
  pieces, comment = [], []
  for m in _PIECE.finditer(source):
    if m.group(2) is not None:  # a triple-quoted string
      if comment:
        pieces.append("\n".join(comment))
        comment = []
      pieces.append(m.group(2).strip("\n"))
    else:
      comment.append(m.group(3))
  if comment:
    pieces.append("\n".join(comment))
  return "\n\n".join(p for p in pieces if p.strip())


def is_heldout(key: str, fraction: float) -> bool:
  """Stable split: the first 4 bytes of sha1(key) as a fraction of 2**32."""
  h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:4], "big")
  return h < fraction * 2**32


# What a ``.py`` file of the embedded corpus contributes: its docstrings and comments
# (``prose``, the default: English text), or the whole file (``source``: code, what the
# long-context tasks evaluate on). ``.txt``/``.rst`` files are whole either way.
EMBEDDED_FORMS = ("prose", "source")


@functools.lru_cache(maxsize=4)
def _embedded(max_bytes: int, heldout_fraction: float, root: str | None, form: str
              ) -> dict[bool, tuple[tuple[str, str], ...]]:
  """{held out?: ((relative path, text), ...)} in sorted path order (see below)."""
  if form not in EMBEDDED_FORMS:
    raise ConfigError(f"data.embedded_form={form!r}: must be one of {EMBEDDED_FORMS}")
  root = root or sysconfig.get_paths()["stdlib"]
  budget = {True: int(max_bytes * heldout_fraction)}
  budget[False] = max_bytes - budget[True]
  docs: dict[bool, list[tuple[str, str]]] = {True: [], False: []}
  for rel in stdlib_files(root):
    held = is_heldout(rel, heldout_fraction)
    if budget[held] <= 0:
      if budget[not held] <= 0:
        break
      continue
    with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
      raw = f.read()
    text = prose(raw) if rel.endswith(".py") and form == "prose" else raw
    if not text.strip():
      continue
    encoded = text.encode("utf-8")
    if len(encoded) > budget[held]:
      text = encoded[:budget[held]].decode("utf-8", errors="ignore")
    docs[held].append((rel, text))
    budget[held] -= len(encoded)
  return {k: tuple(v) for k, v in docs.items()}


def embedded_documents(max_bytes: int, heldout_fraction: float = 0.05,
                       root: str | None = None, form: str = "prose"
                       ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(train texts, held-out texts) of the stdlib files, in sorted path order.

  A file is held out iff ``is_heldout(relative path)``. Each split fills its
  own share of ``max_bytes`` (held-out: ``heldout_fraction``), so a small cap
  still yields both splits; the last document of a split is cut to fit.
  ``form``: ``EMBEDDED_FORMS``.
  """
  docs = _embedded(int(max_bytes), float(heldout_fraction), root, form)
  return tuple(t for _, t in docs[False]), tuple(t for _, t in docs[True])


def embedded_paths(max_bytes: int, heldout_fraction: float = 0.05, root: str | None = None,
                   form: str = "prose") -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(train, held-out) relative paths of the files ``embedded_documents`` reads: what a
  run on that corpus saw, so an evaluation can prove it reads none of them."""
  docs = _embedded(int(max_bytes), float(heldout_fraction), root, form)
  return tuple(r for r, _ in docs[False]), tuple(r for r, _ in docs[True])


# The held-out share of the embedded corpus: ``data.heldout_fraction``'s default
# (configs/schema.py), which the trained gates and the demo use. Evaluation text
# drawn with it is never in their training split.
HELDOUT_FRACTION = 0.05


@functools.lru_cache(maxsize=4)
def heldout_sources(heldout_fraction: float, root: str | None = None
                    ) -> tuple[tuple[str, str], ...]:
  """(relative path, raw text) of every stdlib file ``embedded_documents`` holds out at
  ``heldout_fraction`` (``is_heldout(path)``; whole files, before the prose filter),
  in sorted path order: evaluation text no training split of that fraction reads."""
  root = root or sysconfig.get_paths()["stdlib"]
  out = []
  for rel in stdlib_files(root):
    if is_heldout(rel, heldout_fraction):
      with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
        out.append((rel, f.read()))
  return tuple(out)


# ----------------------------------------------------------------------------- datasets


def data_files(path: str) -> list[str]:
  """Comma-separated paths and globs -> sorted existing files (error if none)."""
  files = []
  for part in (p.strip() for p in path.split(",") if p.strip()):
    hits = sorted(glob.glob(os.path.expanduser(part)))
    if not hits:
      raise ConfigError(f"data.path={path!r}: {part!r} matches no file")
    files += hits
  if not files:
    raise ConfigError(f"data.path={path!r}: must name at least one file")
  return files


def dataset_documents(data_config) -> list[str]:
  """Texts from a ``datasets`` source, up to ``data.max_bytes`` (split by text hash)."""
  import datasets  # heavy import, only when needed
  c = data_config
  if c.source == "hub":
    ds = datasets.load_dataset(c.path, split=c.split)
  else:
    ds = datasets.load_dataset(c.source, data_files=data_files(c.path), split="train")
  if c.text_field not in ds.column_names:
    raise ConfigError(f"data.text_field={c.text_field!r}: no such column in {c.path!r} "
                      f"(columns: {ds.column_names})")
  docs, total = [], 0
  for text in ds[c.text_field]:
    if not text or not str(text).strip():
      continue
    text = str(text)
    docs.append(text)
    total += len(text.encode("utf-8"))
    if total >= c.max_bytes:
      break
  return docs


# ----------------------------------------------------------------------------- packing


def pack(docs: Sequence[str], seq_len: int, tokenizer) -> np.ndarray:
  """[bos] doc [eos] ... (BOS by the tokenizer's rule) concatenated and cut into ``[n, seq_len]`` int32 rows."""
  ids = [np.asarray(tokenizer.encode(d) + [tokenizer.eos_id], np.int32)
         for d in docs]
  flat = np.concatenate(ids) if ids else np.zeros((0,), np.int32)
  n = len(flat) // seq_len
  return flat[:n * seq_len].reshape(n, seq_len)


def data_tokenizer(data_config):
  """The tokenizer ``data.tokenizer`` names: "byte", a named model (``models.MODELS``,
  its GGUF file's tokenizer), a ``.gguf`` file or a local tokenizer directory."""
  return load_tokenizer(models.resolve(data_config.tokenizer))


def load(data_config, tokenizer=None) -> Split:
  """Train and held-out rows for ``config.data`` (validated first)."""
  validate(data_config)
  c = data_config
  if tokenizer is None:
    tokenizer = data_tokenizer(c)
  if c.source == "task":
    return task_split(c, tokenizer)
  if c.source == "embedded":
    train, held = embedded_documents(int(c.max_bytes), float(c.heldout_fraction),
                                     form=c.get("embedded_form", "prose"))
  else:
    docs = dataset_documents(c)
    train = [t for t in docs if not is_heldout(t, c.heldout_fraction)]
    held = [t for t in docs if is_heldout(t, c.heldout_fraction)]
  split = Split(pack(train, c.seq_len, tokenizer), pack(held, c.seq_len, tokenizer))
  if len(split.train) < 1:
    raise ConfigError(f"data.max_bytes={c.max_bytes}: gives no training row of "
                      f"seq_len={c.seq_len} tokens from source {c.source!r}")
  if float(c.get("task_mix", 0.0)) > 0:
    split = _mix_tasks(split, c, tokenizer)
  return split


# ----------------------------------------------------------------------------- task data


def parse_task_mix(spec: str) -> list[tuple[str, float]]:
  """``"passkey"`` / ``"passkey:3,kv_recall:1"`` -> [(task, weight)] (validated)."""
  out = []
  for item in (x.strip() for x in str(spec).split(",")):
    if not item:
      continue
    name, _, w = item.partition(":")
    name = name.strip()
    if name not in tasks_lib.TASKS:
      raise ConfigError(f"data.tasks={spec!r}: unknown task {name!r}; known: "
                        f"{sorted(tasks_lib.TASKS)}")
    try:
      weight = float(w) if w else 1.0
    except ValueError:
      raise ConfigError(f"data.tasks={spec!r}: weight of {name!r} must be a number") from None
    if weight <= 0:
      raise ConfigError(f"data.tasks={spec!r}: weight of {name!r} must be > 0")
    out.append((name, weight))
  if not out:
    raise ConfigError(f"data.tasks={spec!r}: must name at least one task")
  return out


def task_samples(data_config, tokenizer, n: int, seed: int, length: int | None = None):
  """``n`` task samples (``tasks.Sample``) of ``data.tasks``, depth uniform over
  ``[0, data.task_max_depth]``.

  Sample i is a pure function of (seed, i): its task is drawn from the weights,
  then the generator gets (seed, i). ``length`` defaults to ``data.task_length``
  or, if 0, ``data.seq_len``.
  """
  c = data_config
  mix = parse_task_mix(c.get("tasks", "passkey"))
  names = [m[0] for m in mix]
  p = np.asarray([m[1] for m in mix]) / sum(m[1] for m in mix)
  length = int(length or c.get("task_length", 0) or c.seq_len)
  corpus = None
  if any(t in ("doc_qa", "summarize") for t in names):
    corpus = list(embedded_documents(int(c.max_bytes), float(c.heldout_fraction))[0])
  digits = int(c.get("task_digits", 5))
  max_depth = float(c.get("task_max_depth", 1.0))
  out = []
  for i in range(n):
    r = np.random.default_rng([seed, i, 7])
    task = names[int(r.choice(len(names), p=p))]
    depth = max_depth * float(r.random())
    kw = {}
    if task in ("passkey", "multi_needle"):
      kw["digits"] = digits
    if corpus is not None and task in ("doc_qa", "summarize"):
      kw["corpus"] = corpus
    out.append(tasks_lib.TASKS[task](tokenizer, length, depth, seed, i, **kw))
  return out


def task_rows(samples, seq_len: int, pad_id: int, answer_only: bool = True) -> MaskedRows:
  """Samples -> right-padded MaskedRows (loss on the answer, or on every real token)."""
  b = tasks_lib.make_batch(samples, seq_len, pad_id)
  mask = b["loss_mask"]
  if not answer_only:
    mask = (b["tokens"] != pad_id).astype(np.float32)
  return MaskedRows(b["tokens"], mask)


def task_split(data_config, tokenizer) -> Split:
  """The ``task`` source: S-SFT rows with answer-only loss masks; with ``data.text_mix``
  that share of them replaced by rows of the embedded corpus's own split (loss on every
  token), so the memory also learns where its read hurts ordinary text."""
  c = data_config
  n = int(c.get("task_samples", 1024))
  n_held = max(1, int(round(n * float(c.heldout_fraction)))) if c.heldout_fraction else 0
  seed = int(c.get("task_seed", 0))
  train = task_rows(task_samples(c, tokenizer, n, seed), c.seq_len, tokenizer.pad_id)
  held = task_rows(task_samples(c, tokenizer, n_held, seed + 1_000_003), c.seq_len,
                   tokenizer.pad_id)
  share = float(c.get("text_mix", 0.0))
  if share > 0:
    docs = embedded_documents(int(c.max_bytes), float(c.heldout_fraction),
                              form=c.get("embedded_form", "prose"))
    text = [pack(d, c.seq_len, tokenizer) for d in docs]
    for rows, name in zip(text, ("train", "held-out")):
      if len(rows) < 1:
        raise ConfigError(f"data.text_mix={share}: the embedded corpus's {name} split "
                          f"(data.max_bytes={c.max_bytes}) gives no row of {c.seq_len} tokens")
    train = _mix(train, lambda k, salt: _full_loss(_draw(text[0], k, seed, salt)), share, seed,
                 0)
    held = _mix(held, lambda k, salt: _full_loss(_draw(text[1], k, seed, salt)), share, seed,
                1_000_003)
  return Split(train, held)


def _full_loss(rows: np.ndarray) -> MaskedRows:
  """Packed text rows with every target counted (packing leaves no padding)."""
  return MaskedRows(rows, np.ones(rows.shape, np.float32))


def _draw(rows: np.ndarray, k: int, seed: int, salt: int) -> np.ndarray:
  """``k`` rows drawn without replacement while they last (then again)."""
  r = np.random.default_rng([seed, salt, 13])
  idx = np.concatenate([r.permutation(len(rows)) for _ in range(-(-k // len(rows)))])[:k]
  return rows[idx]


def _mix(rows: MaskedRows, draw, share: float, seed: int, salt: int) -> MaskedRows:
  """``rows`` with ``round(share * n)`` of them, at seeded places, replaced by
  ``draw(k, salt)`` (MaskedRows of the same width)."""
  k = int(round(len(rows.tokens) * share))
  if k == 0:
    return rows
  new = draw(k, salt)
  pos = np.random.default_rng([seed, salt, 11]).choice(len(rows.tokens), k, replace=False)
  tokens, mask = rows.tokens.copy(), rows.loss_mask.copy()
  tokens[pos], mask[pos] = new.tokens, new.loss_mask
  return MaskedRows(tokens, mask)


def _mix_tasks(split: Split, data_config, tokenizer) -> Split:
  """Replaces ``data.task_mix`` of the text rows by task rows (loss on every token)."""
  c = data_config
  seed = int(c.get("task_seed", 0))

  def draw(k, salt):
    return task_rows(task_samples(c, tokenizer, k, seed + salt, length=c.seq_len), c.seq_len,
                     tokenizer.pad_id, answer_only=False)

  share = float(c.task_mix)
  return Split(_mix(_full_loss(split.train), draw, share, seed, 0),
               _mix(_full_loss(split.heldout), draw, share, seed, 1_000_003))


def validate(data_config, n_batch_shards: int = 1, check_paths: bool = True) -> None:
  """Value rules of ``config.data``; errors name key, value and rule."""
  c = data_config
  if c.source not in SOURCES:
    raise ConfigError(f"data.source={c.source!r}: must be one of {SOURCES}")
  for key in ("seq_len", "batch_size", "max_bytes"):
    v = c[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise ConfigError(f"data.{key}={v!r}: must be a positive integer")
  if c.seq_len < 2:
    raise ConfigError(f"data.seq_len={c.seq_len}: must be >= 2 (next-token targets)")
  if not 0.0 <= c.heldout_fraction < 1.0:
    raise ConfigError(f"data.heldout_fraction={c.heldout_fraction!r}: must be in [0, 1)")
  if c.batch_size % n_batch_shards:
    raise ConfigError(f"data.batch_size={c.batch_size}: must be divisible by the number of "
                      f"batch shards {n_batch_shards} (mesh data*fsdp)")
  if c.source in ("text", "json", "parquet"):
    if not c.path:
      raise ConfigError(f"data.path='': must name the {c.source} file(s) when "
                        f"data.source={c.source!r}")
    if check_paths:
      data_files(c.path)
  elif c.source == "hub" and not c.path:
    raise ConfigError("data.path='': must name a dataset when data.source='hub'")
  if not c.text_field:
    raise ConfigError("data.text_field='': must name the text column")
  if c.get("embedded_form", "prose") not in EMBEDDED_FORMS:
    raise ConfigError(f"data.embedded_form={c.embedded_form!r}: must be one of "
                      f"{EMBEDDED_FORMS}")
  v = c.get("text_mix", 0.0)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
    raise ConfigError(f"data.text_mix={v!r}: must be a number in [0, 1)")
  if v and c.source != "task":
    raise ConfigError(f"data.text_mix={v!r}: mixes text into data.source='task' only "
                      f"(data.source={c.source!r}; a text source takes data.task_mix)")
  if c.source == "task" or float(c.get("task_mix", 0.0)) > 0:
    parse_task_mix(c.get("tasks", "passkey"))
    if not 0.0 <= float(c.get("task_mix", 0.0)) <= 1.0:
      raise ConfigError(f"data.task_mix={c.task_mix!r}: must be in [0, 1]")
    for key in ("task_samples", "task_digits"):
      v = c.get(key, 1)
      if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"data.{key}={v!r}: must be a positive integer")
    v = c.get("task_length", 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > c.seq_len:
      raise ConfigError(f"data.task_length={v!r}: must be in [0, data.seq_len={c.seq_len}] "
                        "(0 = seq_len)")
    v = c.get("task_max_depth", 1.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
      raise ConfigError(f"data.task_max_depth={v!r}: must be a number in (0, 1]")


# ----------------------------------------------------------------------------- batches


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def batch_rows(n_rows: int, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Row indices of global step ``step``: a pure function of its arguments."""
  i = np.arange(step * batch_size, (step + 1) * batch_size)
  epoch, j = np.divmod(i, n_rows)
  return np.array([_permutation(n_rows, seed, int(e))[k] for e, k in zip(epoch, j)])


def batch_at(rows: np.ndarray, step: int, batch_size: int, seed: int,
             shard: slice = slice(None)) -> dict[str, np.ndarray]:
  """The global batch of ``step`` (or this host's ``shard`` of its rows)."""
  idx = batch_rows(n_rows(rows), step, batch_size, seed)[shard]
  return _take(rows, idx)


def iterate(rows: np.ndarray, batch_size: int, seed: int, start_step: int = 0,
            shard: slice = slice(None)) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """(step, batch) from ``start_step`` on, forever; resumable by construction."""
  step = start_step
  while True:
    yield step, batch_at(rows, step, batch_size, seed, shard)
    step += 1


def eval_batches(rows: np.ndarray, batch_size: int, n_batches: int,
                 shard: slice = slice(None)) -> list[dict[str, np.ndarray]]:
  """The first ``n_batches`` full batches of held-out rows, in order (fixed set)."""
  n = min(n_batches, n_rows(rows) // batch_size)
  return [_take(rows, np.arange(b * batch_size, (b + 1) * batch_size)[shard]) for b in range(n)]
