"""Preference pair selection (docs/design.md §2.8, paper Sec. 4.3): best/worst, weighted SUM, and FRS.

numpy only. Shapes: P prompts, N samples, L reward models; mask [P, N] bool marks valid samples.
Every rule in PAIR_RULES gives (positive [P, N] bool, negative [P, N] bool), where a prompt with no
usable pair (fewer than 2 valid samples, or all valid samples tie) has all-False rows, and the
calibrated reward [P, N] its pairs train towards; it declares the options it takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from capo.calibration import check_rewards, ensemble, prompt_chunks
from capo.errors import CapoError


def best_worst(
    R_ca: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Single-reward rejection sampling (Sec. 4.3): x+ = argmax R_ca, x- = argmin R_ca per prompt.

    R_ca [P, N]. Returns pos_idx [P] int64, neg_idx [P] int64 (first index on ties; -1 where not
    ok) and ok [P] bool, False where the prompt has < 2 valid samples or its valid samples all tie.
    """
    R_ca = np.asarray(R_ca, dtype=np.float64)
    if R_ca.ndim != 2:
        raise CapoError(f"best_worst expects calibrated rewards [P, N], got shape {R_ca.shape}")
    mask = check_rewards(R_ca, mask, min_valid=0)
    best = np.where(mask, R_ca, -np.inf)
    worst = np.where(mask, R_ca, np.inf)
    pos_idx = best.argmax(axis=1)
    neg_idx = worst.argmin(axis=1)
    rows = np.arange(len(R_ca))
    ok = (mask.sum(axis=1) >= 2) & (best[rows, pos_idx] > worst[rows, neg_idx])
    return np.where(ok, pos_idx, -1), np.where(ok, neg_idx, -1), ok


def weighted_sum(
    R_ca: np.ndarray, weights: np.ndarray | None = None, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SUM rule (Sec. 4.3): best/worst of sum_j w_j R_ca^(j); R_ca [P, N, L], weights [L] (1/L each).

    Returns (pos_idx [P], neg_idx [P], ok [P]) as ``best_worst``.
    """
    R_ca = _check_multi(R_ca)
    w = _sum_weights(R_ca.shape[2], weights)
    mask = check_rewards(R_ca, mask, min_valid=0)
    total = np.where(mask[:, :, None], R_ca, 0.0) @ w  # sum_j w_j R_ca^(j)  [P, N]
    return best_worst(total, mask)


def weighted_ensemble(R_ca: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """SUM's training target (Sec. 4.3): R_w(x) = Σ_j w_j R_ca^(j)(x) / Σ_j w_j, [P, N, L] -> [P, N].

    The weighted mean of the calibrated rewards: a win-rate like each R_ca^(j), ranked as SUM
    ranks (same order for Σ_j w_j > 0), and the ensemble (1/L) Σ_j R_ca^(j) for uniform weights
    (the default). NaN (invalid) entries stay NaN.
    """
    R_ca = _check_multi(R_ca)
    if weights is None:
        return ensemble(R_ca)
    w = _sum_weights(R_ca.shape[2], weights)
    return (R_ca @ w) / w.sum()


def _sum_weights(L: int, weights: np.ndarray | None) -> np.ndarray:
    """SUM's weights w [L]: 1/L each by default, else L finite numbers with Σ_j w_j > 0."""
    w = np.full(L, 1.0 / L) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (L,) or not np.isfinite(w).all() or not w.sum() > 0:
        raise CapoError(f"weights must be {L} finite numbers (one per reward) with a positive sum, "
                        f"got {weights!r}")
    return w


def _check_multi(R_ca: np.ndarray) -> np.ndarray:
    R_ca = np.asarray(R_ca, dtype=np.float64)
    if R_ca.ndim != 3:
        raise CapoError(f"expected calibrated rewards [P, N, L], got shape {R_ca.shape}")
    if R_ca.shape[2] == 0:
        raise CapoError("calibrated rewards have L = 0 reward models")
    return R_ca


def _one_hot(idx: np.ndarray, ok: np.ndarray, n: int) -> np.ndarray:
    """bool [P, N]: True at column idx[p] of each ok row p; all-False rows where not ok."""
    return (np.arange(n)[None, :] == idx[:, None]) & ok[:, None]


def dominance(R_ca: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """dom [C, N, N] bool: x_i dominates x_k (Sec. 4.3) among valid samples of each prompt.

    x_i dominates x_k iff R_ca^(j)(x_i) >= R_ca^(j)(x_k) for every j and > for at least one j;
    "> for some j" is "not (x_k >= x_i for every j)". R_ca [C, N, L], mask [C, N].
    """
    Rt = np.ascontiguousarray(np.moveaxis(R_ca, 2, 1))  # [C, L, N]: contiguous all(), 6x faster
    at_least_as_good = (Rt[:, :, :, None] >= Rt[:, :, None, :]).all(axis=1)  # [C, i, k]
    better_somewhere = ~at_least_as_good.transpose(0, 2, 1)
    return at_least_as_good & better_somewhere & mask[:, :, None] & mask[:, None, :]


def frontier_sets(
    R_ca: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Frontier-based rejection sampling, FRS (Sec. 4.3): (X+ [P, N] bool, X- [P, N] bool).

    U = non-dominated valid samples (upper front); D = valid samples dominating no other (lower
    front); X+ = U \\ D, X- = D \\ U. If X+ or X- is empty (every pair incomparable), fall back to
    best/worst of the ensemble (1/L) sum_j R_ca^(j); if that ties too, the row is all False.
    R_ca [P, N, L], mask [P, N] or None.
    """
    R_ca = _check_multi(R_ca)
    mask = check_rewards(R_ca, mask, min_valid=0)
    P, N, L = R_ca.shape
    positive = np.zeros((P, N), dtype=bool)
    negative = np.zeros((P, N), dtype=bool)
    for rows in prompt_chunks(P, N * N * L):
        dom = dominance(R_ca[rows], mask[rows])
        upper = mask[rows] & ~dom.any(axis=1)  # nobody dominates x_k
        lower = mask[rows] & ~dom.any(axis=2)  # x_i dominates nobody
        positive[rows] = upper & ~lower
        negative[rows] = lower & ~upper
    empty = ~positive.any(axis=1) | ~negative.any(axis=1)
    if empty.any():
        pos_idx, neg_idx, ok = best_worst(ensemble(R_ca[empty]), mask[empty])
        positive[empty] = _one_hot(pos_idx, ok, N)
        negative[empty] = _one_hot(neg_idx, ok, N)
    return positive, negative


def _best_worst_rule(
    R_ca: np.ndarray, mask: np.ndarray | None = None, reward: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """best/worst on reward ``reward`` of R_ca [P, N, L], as one-hot (positive, negative) masks."""
    R_ca = _check_multi(R_ca)
    if not -R_ca.shape[2] <= reward < R_ca.shape[2]:
        raise CapoError(f"pair rule 'best_worst': reward index {reward} out of range for L = "
                        f"{R_ca.shape[2]}")
    pos_idx, neg_idx, ok = best_worst(R_ca[:, :, reward], mask)
    return _one_hot(pos_idx, ok, R_ca.shape[1]), _one_hot(neg_idx, ok, R_ca.shape[1])


def _sum_rule(
    R_ca: np.ndarray, mask: np.ndarray | None = None, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """SUM on R_ca [P, N, L] with weights [L] (uniform by default), as one-hot masks."""
    pos_idx, neg_idx, ok = weighted_sum(R_ca, weights, mask)
    N = np.shape(R_ca)[1]
    return _one_hot(pos_idx, ok, N), _one_hot(neg_idx, ok, N)


def _reward_target(R_ca: np.ndarray, reward: int = 0) -> np.ndarray:
    """best_worst's target: the chosen reward's R_ca^(reward) [P, N] of R_ca [P, N, L]."""
    return _check_multi(R_ca)[:, :, reward]


@dataclass(frozen=True)
class PairRule:
    """A pair rule (Sec. 4.3): ``sets(R_ca [P, N, L], mask, **options)`` -> (X+, X-) [P, N] bool,
    ``target(R_ca, **options)`` -> the calibrated reward [P, N] its pairs train towards, and the
    keyword ``options`` both take."""

    sets: Callable[..., tuple[np.ndarray, np.ndarray]]
    target: Callable[..., np.ndarray]
    options: tuple[str, ...] = ()

    def __call__(self, R_ca: np.ndarray, mask: np.ndarray | None = None,
                 **options: object) -> tuple[np.ndarray, np.ndarray]:
        return self.sets(R_ca, mask, **options)


PAIR_RULES: dict[str, PairRule] = {
    "best_worst": PairRule(_best_worst_rule, _reward_target, ("reward",)),
    "sum": PairRule(_sum_rule, weighted_ensemble, ("weights",)),
    "frs": PairRule(frontier_sets, lambda R_ca: ensemble(_check_multi(R_ca))),
}


def pair_rule(rule: str, **opts: object) -> PairRule:
    """PAIR_RULES[rule], after checking ``opts`` against its options; unknown rule names or options
    are CapoErrors."""
    if rule not in PAIR_RULES:
        raise CapoError(f"unknown pair rule '{rule}'; choose from {sorted(PAIR_RULES)}")
    allowed = PAIR_RULES[rule].options
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise CapoError(f"pair rule '{rule}' has no option(s) {unknown}; allowed: {sorted(allowed)}")
    return PAIR_RULES[rule]


def select(
    rule: str, R_ca: np.ndarray, mask: np.ndarray | None = None, **opts: object
) -> tuple[np.ndarray, np.ndarray]:
    """(X+, X-) of rule ``rule`` with options ``opts`` (see ``pair_rule``)."""
    return pair_rule(rule, **opts).sets(R_ca, mask, **opts)


def draw_pair(
    positive_row: np.ndarray, negative_row: np.ndarray, rng: np.random.Generator
) -> tuple[int, int]:
    """Draw x+ ~ Uniform(X+) and x- ~ Uniform(X-) for one prompt (Sec. 4.3); returns (i, j)."""
    pos = np.flatnonzero(positive_row)
    neg = np.flatnonzero(negative_row)
    if pos.size == 0 or neg.size == 0:
        raise CapoError("draw_pair: this prompt has an empty positive or negative set")
    return int(rng.choice(pos)), int(rng.choice(neg))
