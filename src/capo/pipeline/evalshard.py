"""``capo evaluate`` over any number of processes (torchrun / accelerate launch), split as generate.

The items (prompt, seed index) are cut into global chunks of ``chunk_size`` prompts (chunk c =
prompts [c*K, (c+1)*K), all their seeds); rank r of W takes the chunks with c mod W = r, samples
them with the base and then the tuned model, scores them (one reward loaded at a time) and writes
one part per chunk, ``eval/.parts-HASH/part-RRRRR-CCCCC.parquet`` (per item: the raw scores of
base and tuned for each reward and the gold verdicts, the image_msd, and the PNGs of the items
shown in grid.png). When every rank is done, the main process merges the parts in chunk order and
writes eval/ with :meth:`Evaluation.write`. Sampling and scoring batches never mix chunks, so any W gives
the same files; HASH covers every setting, the base model and the tuned weights' files, so a rerun
with the same ones (any W) skips the chunks already scored, and other settings never reuse them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capo.config import to_dict
from capo.errors import CapoError
from capo.pipeline.evaluation import GOLD, Evaluation, image_msd
from capo.pipeline.generate import png_bytes, process_state
from capo.pipeline.rundir import RunDir, shard_files, shard_name, write_table_atomic
from capo.pipeline.tuned import apply_trained

GROUPS = ("base", "tuned")
HIGHER = b"capo.higher_is_better"
Scores = dict[str, dict[str, np.ndarray]]  # group -> reward name (and GOLD) -> raw scores [n]


def bounds(ev: Evaluation) -> list[range]:
    """Item ranges of the global chunks: chunk c = every item of prompts [c*K, (c+1)*K) (items are
    prompt-major; a balanced evaluation gives prompts different numbers of seeds)."""
    firsts = [i for i, (p, _) in enumerate(ev.items) if i == 0 or p.prompt_id != ev.items[i - 1][0].prompt_id]
    starts = [*firsts[:: ev.cfg.chunk_size], len(ev.items)]
    return [range(a, b) for a, b in zip(starts, starts[1:], strict=False)]


def chunks(ev: Evaluation) -> list[Evaluation]:
    """The evaluation of each global chunk (its items); the chunks share ``ev``'s loaded rewards."""
    return [dataclasses.replace(ev, items=ev.items[r.start : r.stop]) for r in bounds(ev)]


def parts_dir(out: Path, ev: Evaluation, tuned_dir: Path) -> Path:
    """OUT/.parts-HASH (OUT: eval/ or the --tuned model's own output directory): HASH of the
    settings, the base model and the tuned weights' files."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in tuned_dir.iterdir()
                   if p.is_file())
    # "parts": the part format (2: with image_msd), so parts of an older format are not reused
    key = {"parts": 2, "spec": ev.spec, "evaluate": to_dict(ev.cfg), "names": ev.names, "steps": ev.steps,
           "guidance": ev.guidance, "tuned": str(tuned_dir.resolve()), "files": files}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return out / f".parts-{digest}"


def grid_items(ev: Evaluation) -> set[int]:
    """Indices of the items grid.png shows: the first seed of the first cfg.grid_prompts prompts."""
    return set([i for i, (_, s) in enumerate(ev.items) if s == 0][: ev.cfg.grid_prompts])


def score_chunks(ev: Evaluation, mine: dict[int, Evaluation],
                 images: dict[int, dict[str, list[Image.Image]]]) -> dict[int, Scores]:
    """Raw scores of each chunk's images per group; each reward is loaded once for all chunks and
    freed after them; batches stay within one chunk and one group."""
    out: dict[int, Scores] = {c: {g: {} for g in GROUPS} for c in mine}
    for name in ev.names:
        reward = ev.reward(name)
        for c, sub in mine.items():
            texts = [p.prompt for p, _ in sub.items]
            for g in GROUPS:
                labels = [f"{g} prompt {p.prompt_id} seed {s}" for p, s in sub.items]
                out[c][g][name] = reward.score(images[c][g], texts, labels)
        del reward
        ev.rewards.pop(name)
    for c, sub in mine.items():
        for g in GROUPS:
            if (gold := sub.gold(images[c][g])) is not None:
                out[c][g][GOLD] = gold
    return out


def part_table(ev: Evaluation, sub: Evaluation, first: int, scores: Scores,
               images: dict[str, list[Image.Image]]) -> pa.Table:
    """One chunk's part: prompt_id, seed_idx, NAME/base, NAME/tuned (rewards, then gold), image_msd,
    and png/base, png/tuned (null except for grid.png's items; ``first`` = the chunk's first item)."""
    grid = grid_items(ev)
    cols: dict[str, Any] = {"prompt_id": [p.prompt_id for p, _ in sub.items],
                            "seed_idx": [s for _, s in sub.items]}
    for name in scores["tuned"]:
        cols[f"{name}/base"], cols[f"{name}/tuned"] = scores["base"][name], scores["tuned"][name]
    cols["image_msd"] = image_msd(images["base"], images["tuned"])
    for g in GROUPS:
        cols[f"png/{g}"] = pa.array([png_bytes(im) if first + i in grid else None
                                     for i, im in enumerate(images[g])], pa.binary())
    return pa.table(cols).replace_schema_metadata({HIGHER: json.dumps(ev.higher).encode()})


def evaluate_mine(ev: Evaluation, tuned_dir: Path, where: Path) -> None:
    """Sample (base, then tuned) and score this rank's unfinished chunks; one part per chunk."""
    state, subs = process_state(), chunks(ev)
    done = shard_files(where)
    mine = {c: sub for c, sub in enumerate(subs) if c % state.num_processes == state.process_index
            and c not in done}
    if not mine:
        return
    adapter = ev.load_model()
    images: dict[int, dict[str, list[Image.Image]]] = {c: {} for c in mine}
    for g in GROUPS:
        if g == "tuned":
            apply_trained(adapter, tuned_dir).denoiser.eval()
        for c, sub in mine.items():
            images[c][g] = sub.sample(adapter, f"evaluate {g} [rank {state.process_index}, chunk {c}]")
    del adapter
    scores = score_chunks(ev, mine, images)
    ranges = bounds(ev)
    for c, sub in mine.items():
        write_table_atomic(part_table(ev, sub, ranges[c].start, scores[c], images[c]),
                           where / shard_name(state.process_index, c))


def merge(ev: Evaluation, where: Path) -> tuple[tuple[list, list], Scores, np.ndarray]:
    """The parts of every chunk, in chunk order: (base and tuned images, None except grid.png's
    items), scores per group, image_msd [N]; sets ``ev.higher`` from the parts."""
    parts, n_chunks = shard_files(where), len(chunks(ev))
    if sorted(parts) != list(range(n_chunks)):
        raise CapoError(f"evaluate: {n_chunks - len(parts)} chunk(s) not scored; rerun", path=str(where))
    table = pa.concat_tables([pq.read_table(parts[c]) for c in sorted(parts)])
    if table.column("prompt_id").to_pylist() != [p.prompt_id for p, _ in ev.items] or \
            table.column("seed_idx").to_pylist() != [s for _, s in ev.items]:
        raise CapoError("evaluate: the parts hold other items than this evaluation", path=str(where))
    ev.higher.update(json.loads(table.schema.metadata[HIGHER]))
    names = [c.removesuffix("/base") for c in table.column_names if c.endswith("/base") and c != "png/base"]
    scores = {g: {n: table.column(f"{n}/{g}").to_numpy() for n in names} for g in GROUPS}
    images = tuple([None if png is None else Image.open(io.BytesIO(png))
                    for png in table.column(f"png/{g}").to_pylist()] for g in GROUPS)
    return images, scores, table.column("image_msd").to_numpy()  # type: ignore[return-value]


def evaluate_sharded(run: RunDir, ev: Evaluation, tuned_dir: Path, out: Path | None = None) -> dict[str, Any]:
    """Every rank evaluates its chunks; the main process merges them into ``out`` (default eval/:
    results.json, results.md, scores.csv, grid.png) and removes the parts; every rank returns the
    results."""
    out = out or run.eval_dir
    state, where = process_state(), parts_dir(out, ev, tuned_dir)
    evaluate_mine(ev, tuned_dir, where)
    state.wait_for_everyone()
    if state.is_main_process:
        images, scores, msd = merge(ev, where)
        ev.write(run, images, scores["base"], scores["tuned"], out, msd)
        if out == run.eval_dir:  # the run's own evaluation (what `capo run` checks)
            run.save_config("evaluate", to_dict(ev.cfg))
        for stale in out.glob(".parts-*"):
            shutil.rmtree(stale, ignore_errors=True)
    state.wait_for_everyone()
    return json.loads((out / "results.json").read_text())
