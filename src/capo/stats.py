"""Evaluation statistics (docs/design.md §2.10, paper Sec. 5): win-rate vs base, bootstrap CIs.

numpy only. tuned/base scores are [P, S]: P held-out prompts, S seeds (same noise for both models).
A category-balanced evaluation gives prompts different numbers of seeds: its [P, S_max] arrays hold
NaN in both tuned and base where a prompt has no such seed (``MISSING``); means are then over the
images present (each image weighs the same) and the bootstrap resamples prompts with their images.
"""

from __future__ import annotations

import numpy as np

from capo.errors import CapoError

# Bootstrap replicates are drawn in blocks so an index block holds about this many entries.
BOOT_BLOCK_ELEMENTS = 1 << 22
MISSING = float("nan")  # a seed a prompt does not have (NaN in both tuned and base)


def _check_pair(tuned: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tuned = np.asarray(tuned, dtype=np.float64)
    base = np.asarray(base, dtype=np.float64)
    if tuned.shape != base.shape:
        raise CapoError(f"tuned scores {tuned.shape} and base scores {base.shape} differ in shape")
    if tuned.size == 0 or np.isnan(tuned).all():
        raise CapoError("no scores to compare (empty arrays)")
    missing = np.isnan(tuned) & np.isnan(base)
    for name, x in (("tuned", tuned), ("base", base)):
        if not (np.isfinite(x) | missing).all():
            where = np.argwhere(~(np.isfinite(x) | missing))[0]
            raise CapoError(f"{name} scores: non-finite value at index {tuple(int(k) for k in where)}")
    return tuned, base


def wins(tuned: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Per-comparison win score (Sec. 5): 1 where tuned > base, 1/2 on a tie, 0 otherwise
    (NaN where both are ``MISSING``)."""
    tuned, base = _check_pair(tuned, base)
    score = (tuned > base) + 0.5 * (tuned == base)
    return np.where(np.isnan(tuned), np.nan, score)


def win_rate(tuned: np.ndarray, base: np.ndarray) -> float:
    """Win-rate (%) of tuned over base: 100 * mean(1[tuned > base] + 1/2 * 1[tuned == base]) over
    the images present."""
    return float(100.0 * np.nanmean(wins(tuned, base)))


def _as_prompt_matrix(x: np.ndarray) -> np.ndarray:
    """[P] -> [P, 1]; [P, S] unchanged; anything else is an error."""
    if x.ndim == 1:
        return x[:, None]
    if x.ndim != 2:
        raise CapoError(f"expected scores [P, S] (prompts x seeds), got shape {x.shape}")
    return x


def bootstrap_means(
    per_prompt: np.ndarray, n_boot: int = 1000, seed: int = 0, weights: np.ndarray | None = None
) -> np.ndarray:
    """[n_boot] means of per_prompt [P] over prompts resampled with replacement (vectorised).

    With ``weights`` [P] (a prompt's number of images) each replicate is the weighted mean
    Σ_i w_i m_i / Σ_i w_i over the resampled prompts i, i.e. the mean over their images.
    """
    if n_boot < 1:
        raise CapoError(f"n_boot must be >= 1, got {n_boot}")
    P = len(per_prompt)
    rng = np.random.default_rng(seed)
    block = max(1, BOOT_BLOCK_ELEMENTS // P)
    means = np.empty(n_boot)
    for start in range(0, n_boot, block):
        stop = min(start + block, n_boot)
        idx = rng.integers(0, P, size=(stop - start, P))  # resampled prompt indices
        if weights is None:
            means[start:stop] = per_prompt[idx].mean(axis=1)
        else:
            means[start:stop] = (weights[idx] * per_prompt[idx]).sum(axis=1) / weights[idx].sum(axis=1)
    return means


def per_prompt_means(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(per-prompt means [P], image counts [P] or None when every prompt has all S seeds) of
    x [P, S] that may hold ``MISSING`` entries."""
    x = _as_prompt_matrix(np.asarray(x, dtype=np.float64))
    present = ~np.isnan(x)
    if present.all():
        return x.mean(axis=1), None
    counts = present.sum(axis=1).astype(np.float64)
    return np.where(present, x, 0.0).sum(axis=1) / np.maximum(counts, 1.0), counts


def _percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile bootstrap interval [(1 - level)/2, (1 + level)/2] quantiles of ``samples``."""
    if not 0.0 < level < 1.0:
        raise CapoError(f"confidence level must be in (0, 1), got {level}")
    low, high = np.quantile(samples, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def bootstrap_ci(
    tuned: np.ndarray,
    base: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI (%) of the win-rate, resampling prompts: tuned/base [P, S] (or [P]).

    Each replicate draws P prompts with replacement and takes 100 * the mean of their per-prompt
    win scores (each the mean over S seeds; with ``MISSING`` seeds, the mean over the replicate's
    images). Deterministic given ``seed``.
    """
    per_prompt, counts = per_prompt_means(_as_prompt_matrix(wins(tuned, base)))
    return _percentile_interval(bootstrap_means(100.0 * per_prompt, n_boot, seed, counts), level)


def mean_and_ci(
    scores: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): mean score over [P, S] (or [P]) with a prompt-resampling bootstrap CI."""
    scores = np.asarray(scores, dtype=np.float64)
    _check_pair(scores, scores)
    per_prompt, counts = per_prompt_means(scores)
    low, high = _percentile_interval(bootstrap_means(per_prompt, n_boot, seed, counts), level)
    return float(per_prompt.mean() if counts is None else np.nanmean(scores)), low, high
