"""Stage ``score``: one raw score per (sample, reward model), one file per reward.

Each rank scores the samples shards of its chunks (round-robin, as generate) into
``rewards/NAME.parts/part-R-C.parquet``; when every chunk is scored the main process merges the
parts into ``rewards/NAME.parquet`` (prompt_id, sample_idx, raw) and removes the parts. The
reward's Bradley-Terry declaration (bt_scale, transform, higher_is_better) is stored in the
file's schema metadata, so calibrate needs no reward weights. Finished files and parts are
skipped on a rerun (resume).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from capo.config import doc, to_dict
from capo.errors import CapoError
from capo.pipeline.generate import check_device, process_state
from capo.pipeline.rundir import RunDir, read_parquet, shard_files, shard_name, shard_rows, write_table_atomic
from capo.rewards.base import RewardModel, available_rewards, load_reward, reward_options

DEFAULT_REWARDS = ["shapes-alignment", "shapes-aesthetic", "shapes-preference"]
META_KEY = b"capo"


@dataclass
class ScoreConfig:
    """Stage ``score``: raw scores of every sample by each reward model."""

    reward: list[str] = doc("reward models to score with (registry names; repeat the flag)", DEFAULT_REWARDS)
    batch_size: int | None = doc("images per reward batch (default: the reward's own)", None, ge=1)
    device: str = doc("device passed to rewards that take one: auto, cpu, cuda, ...", "auto")
    reward_options: dict = doc("per-reward loader options, e.g. {mps: {checkpoint: /ckpt/mps.pth}, "
                               "vqascore: {model: llava-hf/llava-1.5-13b-hf}} (docs/rewards.md)", {})

    def validate(self) -> None:
        if not self.reward:
            raise CapoError("config key 'reward' needs at least one reward model")
        if len(set(self.reward)) != len(self.reward):
            raise CapoError(f"config key 'reward' lists a reward twice: {self.reward}")
        check_reward_options(self.reward_options)
        check_device(self.device)


def reward_meta(reward: RewardModel) -> dict[str, Any]:
    """The reward's Bradley-Terry declaration (docs/design.md §2.6, Eq. 2) as stored in its score file,
    with the hub commits its weights were loaded at (capo.rewards.hub)."""
    return {"reward": reward.name, "bt_scale": float(reward.bt_scale), "transform": reward.transform,
            "higher_is_better": bool(reward.higher_is_better),
            "hub_revisions": dict(getattr(reward, "hub_revisions", {}))}


def read_reward_meta(table_or_path: pa.Table | Path) -> dict[str, Any]:
    schema = table_or_path.schema if isinstance(table_or_path, pa.Table) else pq.read_schema(table_or_path)
    if not schema.metadata or META_KEY not in schema.metadata:
        raise CapoError("score file has no reward metadata (bt_scale, transform)", path=str(table_or_path))
    return json.loads(schema.metadata[META_KEY])


def check_complete(run: RunDir) -> dict[int, Path]:
    """Sample shards of a finished generate; missing chunks are an error (rerun generate)."""
    shards = run.sample_shards()
    if not shards:
        raise CapoError("no samples; run `capo generate` first", path=str(run.samples_dir))
    n_prompts = run.read_prompts().num_rows
    chunk = run.load_config().get("generate", {}).get("chunk_size")
    expected = -(-n_prompts // chunk) if chunk else max(shards) + 1
    missing = sorted(set(range(expected)) - set(shards))
    if missing:
        raise CapoError(f"generate is incomplete ({len(missing)} of {expected} chunks missing, first "
                        f"{missing[0]}); rerun `capo generate`", path=str(run.samples_dir))
    return shards


def score_shard(reward: RewardModel, shard: Path, prompts: dict[str, str]) -> pa.Table:
    """Raw scores of one samples shard as a table with the reward's metadata."""
    t = read_parquet(shard, ["prompt_id", "sample_idx", "image"]).to_pydict()
    ids, idxs = t["prompt_id"], t["sample_idx"]
    images = [Image.open(io.BytesIO(im["bytes"])).convert("RGB") for im in t["image"]]
    labels = [f"prompt {i} sample {s}" for i, s in zip(ids, idxs, strict=True)]
    raw = reward.score(images, [prompts[i] for i in ids], labels, str(shard))
    meta = {META_KEY: json.dumps(reward_meta(reward)).encode()}
    schema = pa.schema([("prompt_id", pa.string()), ("sample_idx", pa.int32()), ("raw", pa.float32())],
                       metadata=meta)
    return pa.table({"prompt_id": ids, "sample_idx": idxs, "raw": raw}, schema=schema)


def check_reward_options(options: dict) -> None:
    """``reward_options`` must map reward names to mappings of options."""
    for name, opts in options.items():
        if not isinstance(opts, dict):
            raise CapoError(f"config key 'reward_options.{name}' must be a mapping of options, got {opts!r}")


def load_scorer(name: str, cfg: ScoreConfig) -> RewardModel:
    """The reward ``name`` with its ``reward_options``, on the configured device if its loader
    takes one (prompt-blind numpy rewards do not), with the configured batch size."""
    options = dict(cfg.reward_options.get(name, {}))
    accepted = reward_options(name)
    if cfg.device != "auto" and (accepted is None or "device" in accepted):
        options.setdefault("device", cfg.device)
    reward = load_reward(name, **options)
    if cfg.batch_size is not None:
        reward.batch_size = cfg.batch_size
    return reward


def _whole(path: Path, rows: int | None, state: Any = None) -> bool:
    """Whether a score file holds its expected rows; a damaged one is removed and scored again
    (a shared file by the main process once every rank has looked at it; ``state`` None: a part
    of this rank's own chunk)."""
    if shard_rows(path) == rows:
        return True
    if state is not None:
        state.wait_for_everyone()
    if (state is None or state.is_main_process) and path.is_file():
        print(f"capo score: {path}: damaged or incomplete; scoring it again", file=sys.stderr)
        path.unlink()
    if state is not None:
        state.wait_for_everyone()
    return False


def _merge(run: RunDir, name: str, parts_dir: Path, n_chunks: int) -> None:
    parts = shard_files(parts_dir)
    if len(parts) != n_chunks:
        return  # another rank failed; its chunks are scored on the rerun
    table = pa.concat_tables([read_parquet(parts[c]) for c in sorted(parts)])
    write_table_atomic(table, run.reward_path(name))
    shutil.rmtree(parts_dir, ignore_errors=True)


def score(run: RunDir, cfg: ScoreConfig) -> dict[str, int]:
    """Score every sample with each reward of ``cfg``; returns reward -> samples scored now."""
    state = process_state()
    unknown = [n for n in cfg.reward if n not in available_rewards()]
    if unknown:
        raise CapoError(f"unknown reward '{unknown[0]}' (available: {', '.join(available_rewards())})")
    shards = check_complete(run)
    prompts = dict(zip(*run.read_prompts().select(["prompt_id", "prompt"]).to_pydict().values(), strict=True))
    mine = [c for c in sorted(shards) if c % state.num_processes == state.process_index]
    rows = {c: shard_rows(shards[c]) for c in shards}
    counts: dict[str, int] = {}
    for name in cfg.reward:
        counts[name] = 0
        parts_dir = run.rewards_dir / f"{name}.parts"
        if run.reward_path(name).is_file() and _whole(run.reward_path(name), sum(rows.values()), state):
            continue
        parts = shard_files(parts_dir)
        todo = [c for c in mine if c not in parts or not _whole(parts[c], rows[c])]
        reward = load_scorer(name, cfg) if todo else None
        for c in tqdm(todo, desc=f"score {name}", unit="chunk", disable=not state.is_local_main_process):
            table = score_shard(reward, shards[c], prompts)
            write_table_atomic(table, parts_dir / shard_name(state.process_index, c))
            counts[name] += table.num_rows
        del reward
        state.wait_for_everyone()
        if state.is_main_process:
            _merge(run, name, parts_dir, len(shards))
        state.wait_for_everyone()
    if state.is_main_process:
        run.save_config("score", to_dict(cfg))
    return counts
