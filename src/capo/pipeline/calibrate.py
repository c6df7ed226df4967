"""Stage ``calibrate``: raw scores -> calibrated rewards R_ca (Eq. 7) and their ensemble.

Reads every ``rewards/NAME.parquet`` (or the configured subset), builds the tables
R [P, N, L] (P prompts in prompts.parquet order, N = largest sample count, L rewards) with a
mask [P, N] for ragged N, converts raw scores into Bradley-Terry logits with each reward's
stored declaration (Eq. 2; negated for lower-is-better rewards), calibrates each reward over all
prompts at once (``capo.calibration``) and writes ``calibrated.parquet``: prompt_id, sample_idx,
one column per reward, ensemble.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capo.calibration import bt_logits, calibrate, calibrate_against, ensemble
from capo.config import doc, to_dict
from capo.errors import CapoError
from capo.pipeline.rundir import RunDir, write_table_atomic
from capo.pipeline.score import read_reward_meta

RESERVED = ("prompt_id", "sample_idx", "ensemble")
META_KEY = b"capo"


@dataclass
class CalibrateConfig:
    """Stage ``calibrate``: expected win-rates against the base model's own samples."""

    reward: list[str] = doc("rewards to calibrate, in column order (default: every scored reward)", [])
    bank: str | None = doc("run directory whose scored samples are the reference bank: each sample's "
                           "win-rate against that run's samples of the same prompt (online rounds: "
                           "the base round). Default: the run's own samples (Eq. 7)", None)

    def validate(self) -> None:
        clash = [r for r in self.reward if r in RESERVED]
        if clash:
            raise CapoError(f"config key 'reward': '{clash[0]}' is a reserved column name")


@dataclass
class Table:
    """The sample table as arrays: prompt_ids [P], mask [P, N], and per-row (p, n) indices."""

    prompt_ids: list[str]
    mask: np.ndarray
    p: np.ndarray
    n: np.ndarray


def prompt_rows(ids: pa.ChunkedArray, prompt_ids: pa.Array, path: str) -> np.ndarray:
    """Row in prompts.parquet of each id [M] int64; an id not in the run is an error naming it."""
    rows = pc.index_in(ids, value_set=prompt_ids)
    if rows.null_count:
        first = ids[int(pc.index(pc.is_null(rows), True).as_py())].as_py()
        raise CapoError(f"prompt {first} is not in this run's prompts.parquet", path=path)
    return rows.to_numpy().astype(np.int64)


def sample_table(run: RunDir) -> Table:
    """Rows of the samples as (prompt row p, sample index n) in prompts.parquet order."""
    prompt_ids = run.read_prompts().column("prompt_id").combine_chunks()
    samples = run.read_samples(["prompt_id", "sample_idx"])
    p = prompt_rows(samples.column("prompt_id"), prompt_ids, str(run.samples_dir))
    n = samples.column("sample_idx").to_numpy().astype(np.int64)
    mask = np.zeros((len(prompt_ids), int(n.max()) + 1), dtype=bool)
    mask[p, n] = True
    return Table(prompt_ids.to_pylist(), mask, p, n)


def check_counts(table: Table, run: RunDir) -> None:
    """Eq. 7 needs N >= 2 samples per prompt: a prompt with fewer is an error naming it."""
    counts = table.mask.sum(axis=1)
    few = np.flatnonzero(counts < 2)
    if few.size:
        pid = table.prompt_ids[int(few[0])]
        raise CapoError(f"prompt {pid} has {int(counts[few[0]])} sample(s); calibration needs at least 2 "
                        f"({few.size} such prompts; generate with samples_per_prompt >= 2)",
                        path=str(run.samples_dir))


def reward_logits(run: RunDir, name: str, table: Table) -> np.ndarray:
    """Bradley-Terry logits [P, N] of reward ``name`` (Eq. 2): sign * bt_scale * transform(raw)."""
    path = run.reward_path(name)
    scores = run.read_reward(name)
    meta = read_reward_meta(path)
    p = prompt_rows(scores.column("prompt_id"), pa.array(table.prompt_ids), str(path))
    n = scores.column("sample_idx").to_numpy().astype(np.int64)
    if (n >= table.mask.shape[1]).any() or not table.mask[p, n].all():
        raise CapoError("scores for samples that are not in the run (rescore after regenerating)",
                        path=str(path))
    raw = np.full(table.mask.shape, np.nan)
    raw[p, n] = scores.column("raw").to_numpy()
    missing = np.argwhere(table.mask & np.isnan(raw))
    if missing.size:
        pr, nr = missing[0]
        raise CapoError(f"no score for prompt {table.prompt_ids[pr]} sample {nr}; rerun `capo score`",
                        path=str(path))
    sign = 1.0 if meta["higher_is_better"] else -1.0
    return sign * bt_logits(raw, meta["bt_scale"], meta["transform"])


def check_scoring_complete(run: RunDir, names: list[str] | None) -> None:
    """Refuse to calibrate while a reward's scoring is unfinished (``names`` None: every reward
    that score started, i.e. with parts or listed in the run's score settings)."""
    started = sorted(p.name.removesuffix(".parts") for p in run.rewards_dir.glob("*.parts"))
    started += run.load_config().get("score", {}).get("reward", [])
    unfinished = [n for n in dict.fromkeys(started) if (names is None or n in names)
                  and not run.reward_path(n).is_file()]
    if unfinished:
        raise CapoError(f"reward '{unfinished[0]}' is not completely scored; rerun `capo score` (it "
                        "resumes) before calibrating", path=str(run.rewards_dir))


def calibrated(run: RunDir, name: str, table: Table, bank: str | None) -> np.ndarray:
    """R_ca [P, N] of reward ``name``: Eq. 7 among the run's samples, or against the samples of the
    same prompt in the ``bank`` run (``calibration.calibrate_against``)."""
    R = reward_logits(run, name, table)
    if bank is None:
        return calibrate(R, table.mask)
    ref = RunDir.at(bank)
    ref_table = sample_table(ref)
    rows = {pid: i for i, pid in enumerate(ref_table.prompt_ids)}
    missing = [pid for pid in table.prompt_ids if pid not in rows]
    if missing:
        raise CapoError(f"prompt {missing[0]} has no samples in the reference bank {bank}",
                        path=str(run.prompts_path))
    order = [rows[pid] for pid in table.prompt_ids]
    B = reward_logits(ref, name, ref_table)[order]
    return calibrate_against(R, B, table.mask, ref_table.mask[order])


def calibrate_run(run: RunDir, cfg: CalibrateConfig) -> dict[str, float]:
    """Write calibrated.parquet; returns summary figures (prompts, samples, rewards)."""
    names = cfg.reward or run.reward_names()
    if not names:
        raise CapoError("no reward scores; run `capo score` first", path=str(run.rewards_dir))
    check_scoring_complete(run, names if cfg.reward else None)
    table = sample_table(run)
    check_counts(table, run)
    R_ca = np.stack([calibrated(run, name, table, cfg.bank) for name in names], axis=2)
    ens = ensemble(R_ca)  # [P, N]
    columns = {"prompt_id": pa.array([table.prompt_ids[i] for i in table.p], pa.string()),
               "sample_idx": pa.array(table.n, pa.int32())}
    columns |= {name: pa.array(R_ca[table.p, table.n, j], pa.float64()) for j, name in enumerate(names)}
    columns["ensemble"] = pa.array(ens[table.p, table.n], pa.float64())
    meta = {META_KEY: json.dumps({"rewards": names}).encode()}
    write_table_atomic(pa.table(columns).replace_schema_metadata(meta), run.calibrated_path)
    run.save_config("calibrate", to_dict(cfg))
    return {"prompts": len(table.prompt_ids), "samples": len(table.p), "rewards": len(names)}


def calibrated_arrays(run: RunDir) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(prompt_ids [P], reward names [L], R_ca [P, N, L], mask [P, N]) from calibrated.parquet."""
    cal = run.read_calibrated()
    names = json.loads(cal.schema.metadata[META_KEY])["rewards"]
    prompt_ids = run.read_prompts().column("prompt_id").combine_chunks()
    p = prompt_rows(cal.column("prompt_id"), prompt_ids, str(run.calibrated_path))
    n = cal.column("sample_idx").to_numpy().astype(np.int64)
    mask = np.zeros((len(prompt_ids), int(n.max()) + 1), dtype=bool)
    mask[p, n] = True
    R_ca = np.full((*mask.shape, len(names)), np.nan)
    for j, name in enumerate(names):
        R_ca[p, n, j] = cal.column(name).to_numpy()
    return prompt_ids.to_pylist(), names, R_ca, mask
