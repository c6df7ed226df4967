"""The run directory (docs/design.md §1.1): layout, atomic Parquet shard writing, and readers.

Layout under ``RUN``::

    config.yaml                         resolved config of every stage that ran
    base_model.json                     the --model spec generation used (evaluate/train reuse it)
    prompts.parquet                     prompt_id, prompt, split, category, metadata (JSON)
    samples/part-RRRRR-CCCCC.parquet    prompt_id, sample_idx, seed, image (PNG), latent, shape, dtype
    embeddings/part-RRRRR-CCCCC.parquet prompt_id, embeddings (safetensors bytes)
    rewards/NAME.parquet                prompt_id, sample_idx, raw (+ bt_scale/transform metadata)
    calibrated.parquet                  prompt_id, sample_idx, one column per reward, ensemble
    pairs.parquet                       prompt_id, positives, negatives, pos_rca, neg_rca, rule
    trainset/                           the pairs' latents and embeddings as memory-mapped Arrow
                                        IPC (written by the first train, capo.pipeline.pairstore)
    model/                              final tuned weights (train)
    eval/                               results.json, results.md, grid.png

Shards are named by rank R and *global* prompt chunk C (chunk C = prompts [C*K, (C+1)*K)); a chunk
is done when any ``part-*-C.parquet`` exists, so a rerun with another world size resumes cleanly.
Every file is written to a temporary name and renamed, so a crash never leaves a half file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from capo.devices import DTYPES
from capo.errors import CapoError

SHARD_RE = re.compile(r"^part-(\d{5})-(\d{5})\.parquet$")

#: Hugging Face ``datasets`` feature metadata: decode the ``image`` column as images
HF_IMAGE_METADATA = {
    b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()
}

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

SAMPLES_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("seed", pa.int64()),
        ("image", IMAGE_TYPE),
        ("latent", pa.binary()),
        ("latent_shape", pa.list_(pa.int32())),
        ("latent_dtype", pa.string()),
    ],
    metadata=HF_IMAGE_METADATA,
)
EMBEDDINGS_SCHEMA = pa.schema([("prompt_id", pa.string()), ("embeddings", pa.binary())])
PAIRS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("positives", pa.list_(pa.int32())),
        ("negatives", pa.list_(pa.int32())),
        ("pos_rca", pa.list_(pa.float32())),
        ("neg_rca", pa.list_(pa.float32())),
        ("rule", pa.string()),
    ]
)

def shard_name(rank: int, chunk: int) -> str:
    """File name of the shard that ``rank`` wrote for global prompt chunk ``chunk``."""
    return f"part-{rank:05d}-{chunk:05d}.parquet"


def shard_files(directory: Path) -> dict[int, Path]:
    """chunk -> shard file in ``directory`` (lowest rank if a chunk has several; tmp files ignored)."""
    found: dict[int, Path] = {}
    if not directory.is_dir():
        return found
    for p in sorted(directory.iterdir()):
        m = SHARD_RE.match(p.name)
        if m and int(m.group(2)) not in found:
            found[int(m.group(2))] = p
    return found


def shard_rows(path: Path) -> int | None:
    """Rows recorded in a Parquet file's footer; None if the footer is unreadable (truncated)."""
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException):
        return None


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, write_page_checksum=True)  # a CRC per page: `capo verify` checks them
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_table(path: Path, what: str, stage: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Read one Parquet file; a missing file names the stage that writes it."""
    if not path.is_file():
        raise CapoError(f"no {what}; run `capo {stage}` first", path=str(path))
    table = read_parquet(path)
    missing = [c for c in (columns or ()) if c not in table.column_names]
    if missing:
        raise CapoError(f"missing column '{missing[0]}' (file from an incompatible stage?)", path=str(path))
    return table


def read_parquet(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """``pq.read_table`` with every page checked against its CRC; a damaged file (truncated, a
    flipped byte, not Parquet) is a one-line error naming it."""
    try:
        return pq.read_table(path, columns=list(columns) if columns is not None else None,
                             page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CapoError(f"damaged Parquet file ({str(e).splitlines()[0][:120]}); `capo verify --run RUN` "
                        "names the command that rewrites it", path=str(path)) from None


def encode_latents(latents: torch.Tensor) -> tuple[list[bytes], list[int], str]:
    """[B, C, H, W] tensor -> (per-row C-order raw bytes, shape [C, H, W], dtype name)."""
    dtype = next(k for k, v in DTYPES.items() if v == latents.dtype)
    lat = latents.detach().cpu().contiguous()
    raw = lat.view(torch.int16) if lat.dtype == torch.bfloat16 else lat
    arr = raw.numpy()
    return [arr[i].tobytes() for i in range(arr.shape[0])], list(lat.shape[1:]), dtype


def decode_latent(raw: bytes, shape: Sequence[int], dtype: str) -> torch.Tensor:
    """Inverse of ``encode_latents`` for one row: raw bytes -> tensor of ``shape``."""
    tdtype = DTYPES[dtype]
    buf = torch.frombuffer(bytearray(raw), dtype=torch.int16 if tdtype == torch.bfloat16 else tdtype)
    return buf.view(tdtype).reshape(tuple(shape)).clone()


def encode_embeddings(emb: dict[str, torch.Tensor]) -> list[bytes]:
    """Batch-first embedding dict -> one safetensors blob per row."""
    batch = next(iter(emb.values())).shape[0]
    return [st_save({k: v[i].detach().cpu().contiguous() for k, v in emb.items()}) for i in range(batch)]


def decode_embeddings(blobs: Sequence[bytes]) -> dict[str, torch.Tensor]:
    """safetensors blobs (one per row) -> batch-first dict of stacked tensors."""
    rows = [st_load(b) for b in blobs]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def samples_table(
    prompt_ids: Sequence[str], sample_idx: Sequence[int], seeds: Sequence[int], pngs: Sequence[bytes],
    latents: torch.Tensor,
) -> pa.Table:
    """One samples shard (``SAMPLES_SCHEMA``) from B rows; ``latents`` is [B, C, H, W]."""
    raw, shape, dtype = encode_latents(latents)
    n = len(prompt_ids)
    return pa.table(
        {
            "prompt_id": pa.array(prompt_ids, pa.string()),
            "sample_idx": pa.array(sample_idx, pa.int32()),
            "seed": pa.array(seeds, pa.int64()),
            "image": pa.array([{"bytes": b, "path": None} for b in pngs], IMAGE_TYPE),
            "latent": pa.array(raw, pa.binary()),
            "latent_shape": pa.array([shape] * n, pa.list_(pa.int32())),
            "latent_dtype": pa.array([dtype] * n, pa.string()),
        },
        schema=SAMPLES_SCHEMA,
    )


def embeddings_table(prompt_ids: Sequence[str], emb: dict[str, torch.Tensor]) -> pa.Table:
    """One embeddings shard (``EMBEDDINGS_SCHEMA``): one safetensors blob per prompt."""
    return pa.table({"prompt_id": pa.array(prompt_ids, pa.string()),
                     "embeddings": pa.array(encode_embeddings(emb), pa.binary())}, schema=EMBEDDINGS_SCHEMA)


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory and the readers/writers of its files."""

    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike) -> RunDir:
        return cls(Path(path))

    config_path = property(lambda self: self.root / "config.yaml")
    base_model_path = property(lambda self: self.root / "base_model.json")
    prompts_path = property(lambda self: self.root / "prompts.parquet")
    samples_dir = property(lambda self: self.root / "samples")
    embeddings_dir = property(lambda self: self.root / "embeddings")
    rewards_dir = property(lambda self: self.root / "rewards")
    calibrated_path = property(lambda self: self.root / "calibrated.parquet")
    pairs_path = property(lambda self: self.root / "pairs.parquet")
    model_dir = property(lambda self: self.root / "model")
    checkpoints_dir = property(lambda self: self.root / "checkpoints")
    eval_dir = property(lambda self: self.root / "eval")

    def reward_path(self, name: str) -> Path:
        return self.rewards_dir / f"{name}.parquet"

    # --- config and model spec -------------------------------------------------------------
    def save_config(self, section: str, values: dict[str, Any]) -> None:
        """Merge one stage's resolved config into config.yaml (other sections kept)."""
        data = self.load_config()
        data[section] = values
        write_text_atomic(yaml.safe_dump(data, sort_keys=False), self.config_path)

    def load_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            return {}
        try:
            return yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            raise CapoError("unreadable run record (not YAML); restore or remove it",
                            path=str(self.config_path)) from None

    def write_base_model(self, spec: dict[str, Any]) -> None:
        """Record the base model (keys: model, family, path, options) for later stages."""
        write_text_atomic(json.dumps(spec, indent=1), self.base_model_path)

    def read_base_model(self) -> dict[str, Any]:
        if not self.base_model_path.is_file():
            raise CapoError("no base model recorded; run `capo generate` first",
                            path=str(self.base_model_path))
        return json.loads(self.base_model_path.read_text())

    # --- prompts ----------------------------------------------------------------------------
    def read_prompts(self) -> pa.Table:
        """prompt_id, prompt, split, category, metadata, in generation order."""
        return read_table(self.prompts_path, "prompts", "generate", ["prompt_id", "prompt"])

    # --- samples ----------------------------------------------------------------------------
    def sample_shards(self) -> dict[int, Path]:
        return shard_files(self.samples_dir)

    def read_samples(self, columns: Sequence[str] | None = None) -> pa.Table:
        """All sample rows in prompt order then sample_idx (chunk order = prompt order)."""
        shards = self.sample_shards()
        if not shards:
            raise CapoError("no samples; run `capo generate` first", path=str(self.samples_dir))
        cols = list(columns) if columns is not None else None
        tables = [read_parquet(shards[c], cols) for c in sorted(shards)]
        return pa.concat_tables(tables)

    def read_latents(
        self, keys: Iterable[tuple[str, int]] | None = None
    ) -> dict[tuple[str, int], torch.Tensor]:
        """(prompt_id, sample_idx) -> final latent [C, H, W]; only ``keys`` if given (saves memory)."""
        wanted = set(keys) if keys is not None else None
        out: dict[tuple[str, int], torch.Tensor] = {}
        cols = ["prompt_id", "sample_idx", "latent", "latent_shape", "latent_dtype"]
        shards = self.sample_shards()
        for chunk in sorted(shards):
            t = read_parquet(shards[chunk], cols).to_pydict()
            for pid, idx, raw, shape, dtype in zip(*(t[c] for c in cols), strict=True):
                if wanted is None or (pid, idx) in wanted:
                    out[(pid, idx)] = decode_latent(raw, shape, dtype)
        if wanted is not None and len(out) < len(wanted):
            missing = sorted(wanted - set(out))[0]
            raise CapoError(f"no latent for prompt {missing[0]} sample {missing[1]}",
                            path=str(self.samples_dir))
        return out

    # --- embeddings -------------------------------------------------------------------------
    def read_embeddings(self, prompt_ids: Iterable[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """prompt_id -> embedding dict (tensors without the batch dim), as cached by generate."""
        wanted = set(prompt_ids) if prompt_ids is not None else None
        shards = shard_files(self.embeddings_dir)
        if not shards:
            raise CapoError("no cached embeddings; run `capo generate` first", path=str(self.embeddings_dir))
        out: dict[str, dict[str, torch.Tensor]] = {}
        for chunk in sorted(shards):
            t = read_parquet(shards[chunk]).to_pydict()
            for pid, blob in zip(t["prompt_id"], t["embeddings"], strict=True):
                if wanted is None or pid in wanted:
                    out[pid] = st_load(blob)
        if wanted is not None and len(out) < len(wanted):
            missing = sorted(wanted - set(out))[0]
            raise CapoError(f"no cached embedding for prompt {missing}", path=str(self.embeddings_dir))
        return out

    # --- rewards, calibrated, pairs -----------------------------------------------------------
    def reward_names(self) -> list[str]:
        """Rewards with a finished file, sorted by name."""
        if not self.rewards_dir.is_dir():
            return []
        return sorted(p.stem for p in self.rewards_dir.glob("*.parquet") if not p.name.startswith("."))

    def read_reward(self, name: str) -> pa.Table:
        return read_table(self.reward_path(name), f"scores for reward '{name}'", "score",
                          ["prompt_id", "sample_idx", "raw"])

    def read_calibrated(self) -> pa.Table:
        return read_table(self.calibrated_path, "calibrated rewards", "calibrate",
                          ["prompt_id", "sample_idx", "ensemble"])

    def read_pairs(self) -> pa.Table:
        """pairs.parquet (schema ``PAIRS_SCHEMA``): per prompt, X+ / X- sample indices and their R_ca."""
        return read_table(self.pairs_path, "pairs", "select", PAIRS_SCHEMA.names)

