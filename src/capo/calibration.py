"""Calibrated rewards (docs/design.md §2.6, §2.7; paper Sec. 4.2): raw scores -> Bradley-Terry
logits -> win-rates.

numpy only. Shapes: P prompts, N samples per prompt, L reward models. A boolean mask [P, N]
marks the valid samples of ragged prompts; invalid entries of every output are NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from capo.errors import CapoError

# Pairwise work is done on blocks of prompts so memory stays ~ CHUNK_ELEMENTS floats per array.
CHUNK_ELEMENTS = 1 << 20


def _identity(raw: np.ndarray, eps: float) -> np.ndarray:
    """transform(raw) = raw."""
    return raw


def _logit(raw: np.ndarray, eps: float) -> np.ndarray:
    """transform(p) = log(p / (1 - p)) with p clipped to [eps, 1 - eps] (probabilities, e.g. P(yes))."""
    if np.any(raw < 0) or np.any(raw > 1):
        raise CapoError("transform 'logit' expects probabilities in [0, 1], got values outside")
    p = np.clip(raw, eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def _logit_of_square(raw: np.ndarray, eps: float) -> np.ndarray:
    """transform(s) = logit(s²): s the geometric mean of two token probabilities (t2v_metrics'
    VQAScore over "Yes", "</s>"), so s² = P(Yes) · P(</s> | Yes) is the answer's probability."""
    if np.any(raw < 0) or np.any(raw > 1):
        raise CapoError("transform 'logit_of_square' expects values in [0, 1], got values outside")
    return _logit(raw * raw, eps)


TRANSFORMS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "identity": _identity,
    "logit": _logit,
    "logit_of_square": _logit_of_square,
}


def bt_logits(
    raw: np.ndarray, scale: float = 1.0, transform: str = "identity", eps: float = 1e-6
) -> np.ndarray:
    """Bradley-Terry logit of a raw score (Eq. 2): R = scale * transform(raw), any shape, float64.

    P(x > x' | c) = sigmoid(R(x) - R(x')). NaN entries (missing scores) pass through unchanged.
    """
    if transform not in TRANSFORMS:
        raise CapoError(f"unknown reward transform '{transform}'; choose from {sorted(TRANSFORMS)}")
    if not np.isfinite(scale) or scale <= 0:
        raise CapoError(f"bt_scale must be a positive finite number, got {scale!r}")
    return scale * TRANSFORMS[transform](np.asarray(raw, dtype=np.float64), eps)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic sigmoid(x) = 1 / (1 + exp(-x)), float64, any shape.

    exp(-x) overflows to inf for x < -709 and 1 / (1 + inf) = 0 is the correct limit, so only
    the overflow warning is silenced; there is never a NaN (a two-branch form is 2x slower).
    """
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def prompt_chunks(n_prompts: int, per_prompt: int) -> Iterator[slice]:
    """Slices of prompts whose pairwise arrays hold about CHUNK_ELEMENTS elements each."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_prompt))
    for start in range(0, n_prompts, step):
        yield slice(start, min(start + step, n_prompts))


def valid_prompts(mask: np.ndarray, min_samples: int = 2) -> np.ndarray:
    """bool [P]: prompts with at least ``min_samples`` valid samples (Eq. 7 needs N_valid >= 2)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.bool_:
        raise CapoError(f"mask must be a bool array [P, N], got {mask.dtype} {mask.shape}")
    return mask.sum(axis=1) >= min_samples


def check_rewards(R: np.ndarray, mask: np.ndarray | None, min_valid: int = 2) -> np.ndarray:
    """Validate rewards [P, N] or [P, N, L] and mask [P, N]; returns the bool mask [P, N].

    Errors name the first bad prompt row: shape mismatch, non-finite valid entry, too few samples.
    """
    if R.ndim not in (2, 3):
        raise CapoError(f"rewards must be [P, N] or [P, N, L], got shape {R.shape}")
    if R.ndim == 3 and R.shape[2] == 0:
        raise CapoError("rewards have L = 0 reward models")
    mask = np.ones(R.shape[:2], dtype=bool) if mask is None else np.asarray(mask)
    if mask.shape != R.shape[:2] or mask.dtype != np.bool_:
        raise CapoError(f"mask must be bool {R.shape[:2]}, got {mask.dtype} {mask.shape}")
    finite = np.isfinite(R) if R.ndim == 2 else np.isfinite(R).all(axis=2)
    bad = np.flatnonzero((mask & ~finite).any(axis=1))
    if bad.size:
        p = int(bad[0])
        n = int(np.flatnonzero(mask[p] & ~finite[p])[0])
        raise CapoError(f"prompt row {p}: sample {n} has a non-finite reward (NaN/inf)")
    few = np.flatnonzero(~valid_prompts(mask, min_valid))
    if few.size:
        p = int(few[0])
        raise CapoError(
            f"prompt row {p}: {int(mask[p].sum())} valid samples, need at least {min_valid} "
            f"({few.size} such prompts; drop them with capo.calibration.valid_prompts)"
        )
    return mask


def calibrate(R: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Calibrated reward, Eq. 7: R_ca(x_i) = 1/(N_valid - 1) * sum_{j != i, valid} sigmoid(R_i - R_j).

    R [P, N] Bradley-Terry logits (see ``bt_logits``), mask [P, N] bool or None (all valid).
    Returns R_ca [P, N] float64 in [0, 1] (strictly inside unless logits differ by > ~36), mean
    1/2 over each prompt's valid samples; NaN where invalid. Vectorised over prompts; the loop
    visits each unordered pair (k, j > k) once, as sigmoid(R_j - R_k) = 1 - sigmoid(R_k - R_j).
    """
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2:
        raise CapoError(f"calibrate expects rewards [P, N], got shape {R.shape}")
    mask = check_rewards(R, mask)
    P, N = R.shape
    R_ca = np.full((P, N), np.nan)
    for rows in prompt_chunks(P, N * N):
        r, valid = np.where(mask[rows], R[rows], 0.0), mask[rows]
        total = np.zeros_like(r)  # sum_{j != i, valid} sigmoid(R_i - R_j)  [C, N]
        for k in range(N - 1):
            both_valid = valid[:, k, None] & valid[:, k + 1 :]  # [C, N-k-1]
            win_k = sigmoid(r[:, k, None] - r[:, k + 1 :]) * both_valid  # P(x_k > x_j)
            total[:, k] += win_k.sum(axis=1)
            total[:, k + 1 :] += both_valid - win_k  # P(x_j > x_k) = 1 - P(x_k > x_j)
        n_valid = valid.sum(axis=1, keepdims=True)
        R_ca[rows] = np.where(valid, total / (n_valid - 1), np.nan)
    return R_ca


def ensemble(R_ca: np.ndarray) -> np.ndarray:
    """Ensemble calibrated reward (Sec. 4.3): R_ca(x) = (1/L) sum_j R_ca^(j)(x); [P, N, L] -> [P, N].

    NaN (invalid) entries stay NaN.
    """
    R_ca = np.asarray(R_ca, dtype=np.float64)
    if R_ca.ndim != 3:
        raise CapoError(f"ensemble expects calibrated rewards [P, N, L], got shape {R_ca.shape}")
    if R_ca.shape[2] == 0:
        raise CapoError("ensemble over L = 0 reward models")
    return R_ca.mean(axis=2)


def calibrate_against(
    R: np.ndarray, bank: np.ndarray, mask: np.ndarray | None = None, bank_mask: np.ndarray | None = None,
    own: bool = False,
) -> np.ndarray:
    """Calibrated reward against a reference bank (Eq. 7 with the base round as the bank; online
    rounds): R_ca(x_i) = 1/M_valid * sum_{m valid} sigmoid(R_i - B_m), B the bank's logits of the
    same prompt (the base model's samples).

    R [P, N] logits of the samples, bank [P, M] logits of the bank, masks bool (None: all valid).
    ``own``: the bank holds the samples themselves (bank[p, n] is x_{p,n}, M = N); each sample is
    then compared with the others only (j != i, denominator M_valid - 1): today's Eq. 7, ``calibrate``.
    Returns R_ca [P, N] float64 in [0, 1]; NaN where invalid. A prompt whose valid samples meet an
    empty bank is an error naming its row.
    """
    R, bank = np.asarray(R, dtype=np.float64), np.asarray(bank, dtype=np.float64)
    if R.ndim != 2 or bank.ndim != 2 or bank.shape[0] != R.shape[0]:
        raise CapoError(f"calibrate_against expects R [P, N] and bank [P, M], got {R.shape} and {bank.shape}")
    if own and bank.shape != R.shape:
        raise CapoError(f"own=True needs the bank to be the samples themselves, got {R.shape} and "
                        f"{bank.shape}")
    mask = check_rewards(R, mask, min_valid=0)
    bank_mask = check_rewards(bank, bank_mask, min_valid=0)
    P, N = R.shape
    M = bank.shape[1]
    others = bank_mask.sum(axis=1)[:, None] - (mask if own else 0)  # M_valid (- 1 for own)  [P, N]
    empty = np.flatnonzero((mask & (others < 1)).any(axis=1))
    if empty.size:
        raise CapoError(f"prompt row {int(empty[0])}: no bank sample to compare with "
                        f"({empty.size} such prompts)")
    R_ca = np.full((P, N), np.nan)
    for rows in prompt_chunks(P, N * M):
        r, b = np.where(mask[rows], R[rows], 0.0), np.where(bank_mask[rows], bank[rows], 0.0)
        wins = sigmoid(r[:, :, None] - b[:, None, :]) * bank_mask[rows][:, None, :]  # [C, N, M]
        if own:
            wins[:, np.arange(N), np.arange(N)] = 0.0  # j != i
        R_ca[rows] = np.where(mask[rows], wins.sum(axis=2) / np.maximum(others[rows], 1), np.nan)
    return R_ca
