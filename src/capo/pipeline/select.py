"""Stage ``select``: training pairs from calibrated rewards (Sec. 4.3) -> pairs.parquet.

Rules (``capo.pairs.PAIR_RULES``): ``best_worst`` on one reward, ``sum`` of weighted rewards,
``frs`` (frontier-based rejection sampling). For every prompt with a usable pair the file lists
the positive set X+ and negative set X- (sample indices) and the target calibrated reward of each
listed sample: the chosen reward's R_ca for best_worst, the weighted ensemble Σ_j w_j R_ca^(j) / Σ_j w_j
for sum (the ensemble for uniform weights), the ensemble R_ca for frs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from capo.calibration import ensemble
from capo.config import doc, to_dict
from capo.errors import CapoError
from capo.pairs import PAIR_RULES, select, weighted_ensemble
from capo.pipeline.calibrate import calibrated_arrays
from capo.pipeline.rundir import PAIRS_SCHEMA, RunDir, write_table_atomic


@dataclass
class SelectConfig:
    """Stage ``select``: which samples of each prompt form the preference pairs."""

    rule: str = doc("pair rule", "frs", choices=PAIR_RULES)
    reward: str | None = doc("best_worst: the reward whose R_ca ranks samples (default: the first)", None)
    weights: list[float] = doc("sum: one weight per reward, in calibrated.parquet column order "
                               "(default: uniform)", [])

    def validate(self) -> None:
        if self.reward is not None and self.rule != "best_worst":
            raise CapoError(f"config key 'reward' applies to rule best_worst only, not '{self.rule}'")
        if self.weights and self.rule != "sum":
            raise CapoError(f"config key 'weights' applies to rule sum only, not '{self.rule}'")


def _best_worst(cfg: SelectConfig, names: list[str], R_ca: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    reward = cfg.reward or names[0]
    if reward not in names:
        raise CapoError(f"config key 'reward': '{reward}' is not calibrated (calibrated: {', '.join(names)})")
    j = names.index(reward)
    return {"reward": j}, R_ca[:, :, j]


def _sum(cfg: SelectConfig, names: list[str], R_ca: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    if cfg.weights and len(cfg.weights) != len(names):
        raise CapoError(f"config key 'weights' has {len(cfg.weights)} values for {len(names)} rewards "
                        f"({', '.join(names)})")
    weights = np.asarray(cfg.weights, dtype=np.float64) if cfg.weights else None
    return {"weights": weights}, weighted_ensemble(R_ca, weights)


def _frs(cfg: SelectConfig, names: list[str], R_ca: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    return {}, ensemble(R_ca)


RuleOptions = Callable[[SelectConfig, list[str], np.ndarray], tuple[dict[str, Any], np.ndarray]]

#: rule -> (rule options, target R_ca [P, N]) from the config and the calibrated table
RULE_OPTIONS: dict[str, RuleOptions] = {
    "best_worst": _best_worst,
    "sum": _sum,
    "frs": _frs,
}


def pairs_table(prompt_ids: list[str], positive: np.ndarray, negative: np.ndarray, target: np.ndarray,
                rule: str) -> pa.Table:
    """pairs.parquet rows for prompts with a non-empty X+ and X- (``PAIRS_SCHEMA``)."""
    keep = np.flatnonzero(positive.any(axis=1) & negative.any(axis=1))
    pos = [np.flatnonzero(positive[p]) for p in keep]
    neg = [np.flatnonzero(negative[p]) for p in keep]
    return pa.table(
        {
            "prompt_id": [prompt_ids[p] for p in keep],
            "positives": [x.tolist() for x in pos],
            "negatives": [x.tolist() for x in neg],
            "pos_rca": [target[p, x].tolist() for p, x in zip(keep, pos, strict=True)],
            "neg_rca": [target[p, x].tolist() for p, x in zip(keep, neg, strict=True)],
            "rule": [rule] * len(keep),
        },
        schema=PAIRS_SCHEMA,
    )


def select_pairs(run: RunDir, cfg: SelectConfig) -> dict[str, float]:
    """Write pairs.parquet; returns counts: prompts, kept, mean |X+|, mean |X-|."""
    prompt_ids, names, R_ca, mask = calibrated_arrays(run)
    opts, target = RULE_OPTIONS[cfg.rule](cfg, names, R_ca)
    positive, negative = select(cfg.rule, R_ca, mask, **opts)
    table = pairs_table(prompt_ids, positive, negative, target, cfg.rule)
    write_table_atomic(table, run.pairs_path)
    run.save_config("select", to_dict(cfg))
    kept = table.num_rows
    sizes = [np.mean([len(x) for x in table.column(c).to_pylist()]) if kept else 0.0
             for c in ("positives", "negatives")]
    return {"prompts": len(prompt_ids), "kept": kept, "mean_pos": float(sizes[0]),
            "mean_neg": float(sizes[1])}
