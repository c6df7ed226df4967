"""Stage ``select``: training pairs from calibrated rewards (Sec. 4.3) -> pairs.parquet.

Rules (``capo.pairs.PAIR_RULES``, each with its options and its target): ``best_worst`` on one
reward, ``sum`` of weighted rewards, ``frs`` (frontier-based rejection sampling). For every prompt
with a usable pair the file lists the positive set X+ and negative set X- (sample indices) and the
target calibrated reward of each listed sample: the chosen reward's R_ca for best_worst, the
weighted ensemble Σ_j w_j R_ca^(j) / Σ_j w_j for sum (the ensemble for uniform weights), the
ensemble R_ca for frs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from capo.config import doc, to_dict
from capo.errors import CapoError
from capo.pairs import PAIR_RULES, pair_rule
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
        given = [k for k, v in (("reward", self.reward is not None), ("weights", self.weights)) if v]
        for key in (k for k in given if k not in PAIR_RULES[self.rule].options):  # the rule's options
            owners = " | ".join(r for r, rule in PAIR_RULES.items() if key in rule.options)
            raise CapoError(f"config key '{key}' applies to rule {owners} only, not '{self.rule}'")


def rule_options(cfg: SelectConfig, names: list[str]) -> dict[str, Any]:
    """The options of rule ``cfg.rule`` (``PAIR_RULES[rule].options``) from the config, for the
    calibrated rewards ``names``: reward -> its column index, weights -> float64 [L] (None: uniform)."""
    return {key: OPTIONS[key](cfg, names) for key in PAIR_RULES[cfg.rule].options}


def _reward_index(cfg: SelectConfig, names: list[str]) -> int:
    reward = cfg.reward or names[0]
    if reward not in names:
        raise CapoError(f"config key 'reward': '{reward}' is not calibrated (calibrated: {', '.join(names)})")
    return names.index(reward)


def _weights(cfg: SelectConfig, names: list[str]) -> np.ndarray | None:
    if cfg.weights and len(cfg.weights) != len(names):
        raise CapoError(f"config key 'weights' has {len(cfg.weights)} values for {len(names)} rewards "
                        f"({', '.join(names)})")
    return np.asarray(cfg.weights, dtype=np.float64) if cfg.weights else None


#: rule option -> its value from the config key of the same name
OPTIONS: dict[str, Callable[[SelectConfig, list[str]], Any]] = {"reward": _reward_index, "weights": _weights}


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
    opts = rule_options(cfg, names)
    rule = pair_rule(cfg.rule, **opts)
    positive, negative = rule.sets(R_ca, mask, **opts)
    table = pairs_table(prompt_ids, positive, negative, rule.target(R_ca, **opts), cfg.rule)
    write_table_atomic(table, run.pairs_path)
    run.save_config("select", to_dict(cfg))
    kept = table.num_rows
    sizes = [np.mean([len(x) for x in table.column(c).to_pylist()]) if kept else 0.0
             for c in ("positives", "negatives")]
    return {"prompts": len(prompt_ids), "kept": kept, "mean_pos": float(sizes[0]),
            "mean_neg": float(sizes[1])}
