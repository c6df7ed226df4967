"""``capo verify --run DIR``: what in a run directory is missing, damaged or stale, and the command
that repairs it (docs/failures.md).

Every Parquet file is read whole with its page checksums verified, and its rows compared with
what the stage writes; model/ and each checkpoint are compared with their manifest (sizes and
SHA-256). A derived file older than its input is stale. Nothing is changed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from capo.errors import CapoError
from capo.pipeline.checkpoint import checkpoints, read_position
from capo.pipeline.integrity import LEFTOVERS, damage, parquet_damage
from capo.pipeline.rundir import RunDir, shard_files, shard_rows


@dataclass(frozen=True)
class Finding:
    """One problem: its kind (missing | damaged | stale | unfinished | leftover), path, and repair."""

    kind: str
    path: Path
    problem: str
    repair: str

    def line(self) -> str:
        return f"{self.kind:10s} {self.path}: {self.problem} -> {self.repair}"


def _parquet(path: Path, rows: int | None, repair: str) -> Iterator[Finding]:
    problem = parquet_damage(path, full=True)
    if problem is None and rows is not None and shard_rows(path) != rows:
        problem = f"{shard_rows(path)} rows, expected {rows}"
    if problem is not None:
        yield Finding("damaged", path, problem, repair)


def _chunks(run: RunDir) -> Iterator[Finding]:
    """samples/ and embeddings/: every chunk present and whole."""
    gen = run.load_config().get("generate", {})
    if not run.prompts_path.is_file():
        if run.samples_dir.is_dir():
            yield Finding("missing", run.prompts_path, "no prompts", "capo generate --run RUN")
        return
    yield from _parquet(run.prompts_path, None, "capo generate --run RUN")
    n, k, per = shard_rows(run.prompts_path) or 0, gen.get("chunk_size") or 1, gen.get("samples_per_prompt")
    for directory, factor in ((run.samples_dir, per), (run.embeddings_dir, 1)):
        shards = shard_files(directory)
        for c in range(-(-n // k)):
            size = min(k, n - c * k)
            if c not in shards:
                yield Finding("missing", directory, f"chunk {c}", "capo generate --run RUN (it resumes)")
            else:
                rows = size * factor if factor else None
                yield from _parquet(shards[c], rows, "capo generate --run RUN (regenerates it)")


def _rewards(run: RunDir) -> Iterator[Finding]:
    gen = run.load_config().get("generate", {})
    prompts = shard_rows(run.prompts_path) if run.prompts_path.is_file() else None
    total = prompts * gen["samples_per_prompt"] if prompts and gen.get("samples_per_prompt") else None
    for name in run.load_config().get("score", {}).get("reward", []):
        if not run.reward_path(name).is_file():
            yield Finding("missing", run.reward_path(name), f"reward '{name}'", "capo score --run RUN")
    for parts in sorted(run.rewards_dir.glob("*.parts")):
        kind = "leftover" if parts.with_suffix(".parquet").is_file() else "unfinished"
        yield Finding(kind, parts, "scoring parts", "capo score --run RUN (it resumes and cleans up)")
    for name in run.reward_names():
        yield from _parquet(run.reward_path(name), total, "capo score --run RUN (rescores it)")


def _stale(path: Path, inputs: list[Path], repair: str) -> Iterator[Finding]:
    newer = [p for p in inputs if p.exists() and p.stat().st_mtime > path.stat().st_mtime]
    if newer:
        yield Finding("stale", path, f"older than {newer[0]}", repair)


def _calibrated(run: RunDir) -> Iterator[Finding]:
    """calibrated.parquet intact, with a row per sample and a column per reward of the run's
    calibrate settings (default: every reward scored)."""
    path, repair = run.calibrated_path, "capo calibrate --run RUN"
    if not path.is_file():
        return
    found = list(_parquet(path, None, repair))
    yield from found
    if found:
        return
    samples = sum(shard_rows(p) or 0 for p in run.sample_shards().values())
    wanted = run.load_config().get("calibrate", {}).get("reward") or run.reward_names()
    meta = pq.read_schema(path).metadata or {}
    have = json.loads(meta.get(b"capo", b"{}")).get("rewards", [])
    missing = [r for r in wanted if r not in have]
    if missing or shard_rows(path) != samples:
        problem = (f"reward '{missing[0]}' not calibrated" if missing
                   else f"{shard_rows(path)} rows for {samples} samples")
        yield Finding("stale", path, problem, repair)


def _derived(run: RunDir) -> Iterator[Finding]:
    """pairs.parquet, model/ (its manifest), eval/ (not older than the model)."""
    if run.pairs_path.is_file():
        yield from _parquet(run.pairs_path, None, "capo select --run RUN")
    model = run.model_dir / "train_summary.json"
    if run.model_dir.is_dir():
        problem = damage(run.model_dir) if model.is_file() else "train_summary.json: missing"
        if problem is not None:
            yield Finding("damaged", run.model_dir, problem,
                          "remove model/, then capo train --run RUN --resume")
    results = run.eval_dir / "results.json"
    if results.is_file() and model.is_file():
        yield from _stale(results, [model], "capo evaluate --run RUN")


def _checkpoints(run: RunDir) -> Iterator[Finding]:
    for _, path in sorted(checkpoints(run).items()):
        saved, problem = read_position(path)
        if saved is None:
            yield Finding("damaged", path, str(problem),
                          "remove it (resume uses the newest intact checkpoint)")


def _leftovers(run: RunDir) -> Iterator[Finding]:
    for pattern in LEFTOVERS:
        for p in sorted(run.root.rglob(pattern)):
            yield Finding("leftover", p, "temporary file of an interrupted write",
                          "removed by the next capo command on this run")


CHECKS = (_chunks, _rewards, _calibrated, _derived, _checkpoints, _leftovers)


def verify(run: RunDir) -> list[Finding]:
    """Every problem found in ``run`` (an empty list: the run is whole)."""
    if not run.root.is_dir():
        raise CapoError("no such run directory", path=str(run.root))
    return [f for check in CHECKS for f in check(run)]


def verify_command(args: argparse.Namespace) -> None:
    run = RunDir.at(args.run)
    findings = verify(run)
    for f in findings:
        print(f.line().replace("--run RUN", f"--run {run.root}"))
    if findings:
        raise CapoError(f"{len(findings)} problem(s), listed above with the command that repairs each",
                        path=str(run.root))
    print(f"capo verify: {run.root}: every file whole (Parquet page checksums, model and checkpoint "
          "manifests)")


def register(sub: Any) -> None:
    """``capo verify --run DIR``."""
    p = sub.add_parser("verify", description=__doc__.split("\n\n")[0],
                       help="report missing, damaged or stale files of a run and how to repair them")
    p.add_argument("--run", "--run-dir", dest="run", required=True, metavar="DIR", help="run directory")
    p.set_defaults(func=verify_command)
