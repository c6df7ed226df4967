"""Prompt sets: files (txt, CSV, JSONL, Parquet) and the built-in shapes-world splits.

A prompt file is one prompt per line (``.txt``; blank lines are skipped) or a table with a
``prompt`` column and optional ``prompt_id``, ``category`` and ``split`` columns (``.csv``,
``.jsonl``, ``.parquet``); other columns are kept as JSON ``metadata``. Without a ``prompt_id``
column the id is a hash of the text, so seeds (derived from ids) do not depend on row order.
Errors name the file and the row: 1-based line numbers for txt/CSV/JSONL, 1-based record
numbers for Parquet. Built-in sets: ``shapes:train``, ``shapes:val``, ``shapes:test`` (disjoint;
``shapes:heldout`` is the test set's earlier name), ``shapes:all``. ``balanced_plan`` gives the
seeds per prompt of a category-balanced (GenEval-style) evaluation.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capo.config import quote
from capo.errors import CapoError

KNOWN_COLUMNS = ("prompt_id", "prompt", "category", "split")

PROMPTS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("split", pa.string()),
        ("category", pa.string()),
        ("metadata", pa.string()),
    ]
)


@dataclass(frozen=True)
class Prompt:
    """One prompt of a set; ``metadata`` holds any extra columns of the file."""

    prompt_id: str
    prompt: str
    category: str = ""
    split: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def text_id(text: str) -> str:
    """Stable id of a prompt text: ``p-`` + 12 hex digits of its BLAKE2b hash."""
    return "p-" + hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


# --- readers: each yields (row number, record dict) -------------------------------------------
def _txt_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            yield line_no, {"prompt": line.strip()}


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        _require_prompt_column(reader.fieldnames or [], path)
        for rec in reader:
            yield reader.line_num, dict(rec)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CapoError(f"invalid JSON ({e.msg})", path=str(path), row=line_no) from None
        if not isinstance(rec, dict) or "prompt" not in rec:
            raise CapoError("expected a JSON object with a 'prompt' key", path=str(path), row=line_no)
        yield line_no, rec


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise CapoError(f"not a readable Parquet file ({str(e).splitlines()[0]})", path=str(path)) from None
    _require_prompt_column(table.column_names, path)
    yield from enumerate(table.to_pylist(), start=1)


def _require_prompt_column(columns: list[str], path: Path) -> None:
    if "prompt" not in columns:
        raise CapoError(f"no 'prompt' column (columns: {', '.join(columns) or 'none'})", path=str(path))


#: file suffix -> row reader
READERS: dict[str, Callable[[Path], Iterator[tuple[int, dict[str, Any]]]]] = {
    ".txt": _txt_rows,
    ".csv": _csv_rows,
    ".jsonl": _jsonl_rows,
    ".parquet": _parquet_rows,
}


def _shapes_set(split: str) -> Callable[[], list[Prompt]]:
    def load() -> list[Prompt]:
        from capo.shapes.world import make_prompts

        return [Prompt(s.prompt_id, s.text, s.category, split) for s in make_prompts(split)]

    return load


#: images [N] -> gold verdicts [N] (1.0 = correct), for one image per prompt given
GoldCheck = Callable[[Sequence[Any]], np.ndarray]


def _shapes_gold(prompts: list[Prompt]) -> GoldCheck | None:
    """The shapes world's exact checker for prompts of its grammar (None if one does not parse)."""
    from capo.shapes.checker import check_all
    from capo.shapes.world import parse_prompt

    try:
        specs = [parse_prompt(p.prompt) for p in prompts]
    except CapoError:
        return None
    return lambda images: check_all(images, specs).astype(np.float64)


#: world -> its gold metric: prompts [N] -> the checker of images of those prompts, or None when the
#: prompts are not of the world's grammar (the world of a model: capo.models.base.WORLDS)
GOLD_CHECKERS: dict[str, Callable[[list[Prompt]], GoldCheck | None]] = {"shapes": _shapes_gold}


def gold_checker(world: str | None, prompts: list[Prompt]) -> GoldCheck | None:
    """The gold metric of ``world`` (a model's, capo.models.base.WORLDS) for ``prompts``, if any."""
    return GOLD_CHECKERS[world](prompts) if world in GOLD_CHECKERS else None


#: built-in prompt sets
BUILTIN_SETS: dict[str, Callable[[], list[Prompt]]] = {
    "shapes:train": _shapes_set("train"),
    "shapes:val": _shapes_set("val"),
    "shapes:test": _shapes_set("test"),
    "shapes:heldout": _shapes_set("heldout"),
    "shapes:all": _shapes_set("all"),
}


def _to_prompt(rec: dict[str, Any], path: Path, row: int) -> Prompt:
    text = rec.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise CapoError("empty prompt", path=str(path), row=row)
    text = text.strip()
    pid = rec.get("prompt_id")
    pid = text_id(text) if pid is None or str(pid).strip() == "" else str(pid).strip()
    extra = {k: v for k, v in rec.items() if k not in KNOWN_COLUMNS}
    return Prompt(pid, text, str(rec.get("category") or ""), str(rec.get("split") or ""), extra)


def check_unique(prompts: list[Prompt], path: str, rows: list[int] | None = None) -> None:
    """Duplicate prompt texts or ids are errors naming the row of the repeat and of the first."""
    rows = rows or list(range(1, len(prompts) + 1))
    seen_text: dict[str, int] = {}
    seen_id: dict[str, int] = {}
    for p, row in zip(prompts, rows, strict=True):
        if p.prompt in seen_text:
            raise CapoError(f"duplicate prompt {quote(p.prompt)} (first at row {seen_text[p.prompt]})",
                            path=path, row=row)
        if p.prompt_id in seen_id:
            raise CapoError(f"duplicate prompt_id {quote(p.prompt_id)} (first at row {seen_id[p.prompt_id]})",
                            path=path, row=row)
        seen_text[p.prompt] = seen_id[p.prompt_id] = row


def load_prompts(source: str) -> list[Prompt]:
    """Prompts of a built-in set name or a file; empty sets and duplicates are CapoErrors."""
    if source in BUILTIN_SETS:
        return BUILTIN_SETS[source]()
    path = Path(source)
    if not path.is_file():
        known = ", ".join(BUILTIN_SETS)
        raise CapoError(f"prompt file not found (built-in sets: {known})", path=source)
    if path.suffix.lower() not in READERS:
        known = ", ".join(READERS)
        raise CapoError(f"unknown prompt file type '{path.suffix}' (known: {known})", path=source)
    prompts, rows = [], []
    try:
        for row, rec in READERS[path.suffix.lower()](path):
            prompts.append(_to_prompt(rec, path, row))
            rows.append(row)
    except UnicodeDecodeError as e:
        raise CapoError(f"not UTF-8 text (byte {e.start} of a line: {e.reason})", path=source) from None
    if not prompts:
        raise CapoError("no prompts in file", path=source)
    check_unique(prompts, source, rows)
    return prompts


def subset(prompts: list[Prompt], limit: int | None, seed: int = 0) -> list[Prompt]:
    """A deterministic, category-balanced subset of ``limit`` prompts (all when ``limit`` is None).

    Within each category prompts are ordered by a hash of (seed, prompt_id); categories are then
    interleaved round-robin (in order of first appearance) and the first ``limit`` are kept, in
    their original order.
    """
    if limit is None or limit >= len(prompts):
        return list(prompts)
    if limit < 1:
        raise CapoError(f"config key 'num_prompts' must be >= 1, got {limit}")
    by_cat: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    queues = [_hash_order(v, seed) for v in by_cat.values()]
    chosen: set[str] = set()
    for depth in range(max(len(q) for q in queues)):
        for q in queues:
            if depth < len(q) and len(chosen) < limit:
                chosen.add(q[depth].prompt_id)
    return [p for p in prompts if p.prompt_id in chosen]


def _hash_order(prompts: list[Prompt], seed: int) -> list[Prompt]:
    key = lambda p: hashlib.blake2b(f"{seed}/{p.prompt_id}".encode(), digest_size=8).digest()  # noqa: E731
    return sorted(prompts, key=key)


def balanced_plan(prompts: list[Prompt], images_per_category: int, seed: int = 0) -> list[tuple[Prompt, int]]:
    """GenEval-style balance: (prompt, seeds) such that every category has ``images_per_category``
    images. A category of n prompts uses min(n, N) of them (ordered by a hash of (seed,
    prompt_id)), N = images_per_category, each with N // m seeds and the first N % m one more
    (m the prompts used), so small categories get more seeds per prompt. File order is kept.
    """
    if images_per_category < 1:
        raise CapoError(f"config key 'images_per_category' must be >= 1, got {images_per_category}")
    by_cat: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    seeds: dict[str, int] = {}
    for group in by_cat.values():
        used = _hash_order(group, seed)[:images_per_category]
        m = len(used)
        for i, p in enumerate(used):
            seeds[p.prompt_id] = images_per_category // m + (i < images_per_category % m)
    return [(p, seeds[p.prompt_id]) for p in prompts if p.prompt_id in seeds]


def prompts_table(prompts: list[Prompt]) -> pa.Table:
    """prompts.parquet rows (``PROMPTS_SCHEMA``) in the given order."""
    return pa.table(
        {
            "prompt_id": [p.prompt_id for p in prompts],
            "prompt": [p.prompt for p in prompts],
            "split": [p.split for p in prompts],
            "category": [p.category for p in prompts],
            "metadata": [json.dumps(p.metadata, default=str, sort_keys=True) for p in prompts],
        },
        schema=PROMPTS_SCHEMA,
    )


def from_table(table: pa.Table) -> list[Prompt]:
    """Inverse of ``prompts_table``."""
    cols = table.to_pydict()
    return [
        Prompt(pid, text, cat or "", split or "", json.loads(meta or "{}"))
        for pid, text, split, cat, meta in zip(
            cols["prompt_id"], cols["prompt"], cols["split"], cols["category"], cols["metadata"], strict=True
        )
    ]
