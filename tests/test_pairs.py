"""capo.pairs: best/worst, SUM and frontier-based rejection sampling (Sec. 4.3)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from capo.errors import CapoError
from capo.pairs import (
    PAIR_RULES,
    best_worst,
    draw_pair,
    frontier_sets,
    select,
    weighted_ensemble,
    weighted_sum,
)

# Two rewards, five samples (values in (0, 1) like calibrated rewards):
#   x0 = (0.8, 0.7)   x1 = (0.5, 0.9)   x2 = (0.4, 0.3)   x3 = (0.1, 0.6)   x4 = (0.95, 0.05)
# Dominance (>= in both, > in one): x0 > x2 (0.8>=0.4, 0.7>=0.3), x0 > x3 (0.8>=0.1, 0.7>=0.6),
# x1 > x2 (0.5>=0.4, 0.9>=0.3), x1 > x3 (0.5>=0.1, 0.9>=0.6). x0 vs x1 incomparable
# (0.8>0.5 but 0.7<0.9), x2 vs x3 incomparable (0.4>0.1 but 0.3<0.6). x4 is incomparable with
# every other sample (first reward highest, second lowest).
# U (dominated by nobody) = {x0, x1, x4};  D (dominates nobody) = {x2, x3, x4}.
# X+ = U \ D = {x0, x1};  X- = D \ U = {x2, x3};  x4 lies on both fronts and is dropped.
FRONTS = np.array([[[0.8, 0.7], [0.5, 0.9], [0.4, 0.3], [0.1, 0.6], [0.95, 0.05]]])


def test_frs_hand_example_drops_sample_on_both_fronts():
    pos, neg = frontier_sets(FRONTS)
    np.testing.assert_array_equal(pos[0], [True, True, False, False, False])
    np.testing.assert_array_equal(neg[0], [False, False, True, True, False])


def test_frs_weak_dominance_needs_one_strict_reward():
    # x0 = (0.5, 0.75) dominates x1 = (0.5, 0.25): equal in reward 0, better in reward 1.
    # Identical samples x2 = x3 = (0.25, 0.5) do not dominate each other, but both are
    # dominated by x0 (0.5>=0.25, 0.75>=0.5), and x1 vs x2 is incomparable (0.5>0.25, 0.25<0.5).
    # U = {x0}; D = {x1, x2, x3}; X+ = {x0}; X- = {x1, x2, x3}.
    R = np.array([[[0.5, 0.75], [0.5, 0.25], [0.25, 0.5], [0.25, 0.5]]])
    pos, neg = frontier_sets(R)
    np.testing.assert_array_equal(pos[0], [True, False, False, False])
    np.testing.assert_array_equal(neg[0], [False, True, True, True])


def test_frs_fallback_to_ensemble_best_worst_and_tie():
    # Row 0: x0 = (0.25, 0.75), x1 = (0.75, 0.5) are incomparable, so U = D = {x0, x1} and
    #        X+ = X- = {} -> fall back to the ensemble: x0 (0.25+0.75)/2 = 0.5,
    #        x1 (0.75+0.5)/2 = 0.625 -> x+ = x1, x- = x0.
    # Row 1: x0 = (0.25, 0.75), x1 = (0.75, 0.25): ensemble 0.5 and 0.5 tie -> all False.
    R = np.array([[[0.25, 0.75], [0.75, 0.5]], [[0.25, 0.75], [0.75, 0.25]]])
    pos, neg = frontier_sets(R)
    np.testing.assert_array_equal(pos, [[False, True], [False, False]])
    np.testing.assert_array_equal(neg, [[True, False], [False, False]])


def test_frs_masked_sample_ignored_and_single_valid_row_empty():
    # Row 0: the hand example with x0 masked out. Then U = {x1, x4}, D = {x2, x3, x4}
    #        (x1 still dominates x2, x3) -> X+ = {x1}, X- = {x2, x3}; x0 never selected.
    # Row 1: one valid sample -> no pair, all False.
    R = np.concatenate([FRONTS, FRONTS])
    mask = np.ones((2, 5), dtype=bool)
    mask[0, 0] = False
    mask[1, 1:] = False
    R[0, 0] = np.nan  # garbage in a masked entry is fine
    pos, neg = frontier_sets(R, mask)
    np.testing.assert_array_equal(pos, [[False, True, False, False, False], [False] * 5])
    np.testing.assert_array_equal(neg, [[False, False, True, True, False], [False] * 5])


def test_best_worst_by_hand():
    # Row 0: [0.2, 0.9, 0.1] -> best x1, worst x2.
    # Row 1: all tie -> not ok, indices -1.
    # Row 2: x0 masked (0.99 would be best) -> among x1, x2: best x2 (0.6), worst x1 (0.4).
    R = np.array([[0.2, 0.9, 0.1], [0.5, 0.5, 0.5], [0.99, 0.4, 0.6]])
    mask = np.array([[True] * 3, [True] * 3, [False, True, True]])
    pos, neg, ok = best_worst(R, mask)
    np.testing.assert_array_equal(pos, [1, -1, 2])
    np.testing.assert_array_equal(neg, [2, -1, 1])
    np.testing.assert_array_equal(ok, [True, False, True])


def test_weighted_sum_by_hand():
    # x0 = (0.9, 0.1), x1 = (0.4, 0.5), x2 = (0.2, 0.6).
    # uniform (1/2, 1/2): 0.5, 0.45, 0.4 -> best x0, worst x2.
    # weights (0, 1): 0.1, 0.5, 0.6 -> best x2, worst x0.
    R = np.array([[[0.9, 0.1], [0.4, 0.5], [0.2, 0.6]]])
    assert [int(a[0]) for a in weighted_sum(R)[:2]] == [0, 2]
    assert [int(a[0]) for a in weighted_sum(R, weights=[0.0, 1.0])[:2]] == [2, 0]
    with pytest.raises(CapoError, match="weights must be 2 finite numbers"):
        weighted_sum(R, weights=[1.0, 2.0, 3.0])


def test_weighted_ensemble_by_hand():
    # One prompt, rewards (A, B) of x0, x1, x2: (0.2, 0.6), (0.8, 0.4), (0.5, 0.5). Weights (3, 1):
    # (3 · 0.2 + 0.6)/4 = 0.3, (3 · 0.8 + 0.4)/4 = 0.7, (1.5 + 0.5)/4 = 0.5; uniform: 0.4, 0.6, 0.5.
    R = np.array([[[0.2, 0.6], [0.8, 0.4], [0.5, 0.5]]])
    np.testing.assert_allclose(weighted_ensemble(R, np.array([3.0, 1.0])), [[0.3, 0.7, 0.5]])
    np.testing.assert_allclose(weighted_ensemble(R), [[0.4, 0.6, 0.5]])
    with pytest.raises(CapoError, match="positive sum"):
        weighted_ensemble(R, np.array([1.0, -1.0]))


def test_pair_rules_table_and_options():
    assert set(PAIR_RULES) == {"best_worst", "sum", "frs"}
    R = np.array([[[0.9, 0.1], [0.4, 0.5], [0.2, 0.6]]])
    pos, neg = PAIR_RULES["best_worst"](R)  # reward 0: best x0 (0.9), worst x2 (0.2)
    np.testing.assert_array_equal(pos, [[True, False, False]])
    np.testing.assert_array_equal(neg, [[False, False, True]])
    pos, neg = PAIR_RULES["best_worst"](R, None, reward=1)  # reward 1: best x2, worst x0
    np.testing.assert_array_equal(pos, [[False, False, True]])
    np.testing.assert_array_equal(neg, [[True, False, False]])
    pos, neg = select("sum", R, weights=[0.0, 1.0])
    np.testing.assert_array_equal(pos, [[False, False, True]])
    pos, neg = select("frs", R)  # all three incomparable -> ensemble: 0.5, 0.45, 0.4
    np.testing.assert_array_equal(pos, [[True, False, False]])
    np.testing.assert_array_equal(neg, [[False, False, True]])
    with pytest.raises(CapoError, match="unknown pair rule 'pareto'"):
        select("pareto", R)
    with pytest.raises(CapoError, match=r"no option\(s\) \['reward'\]"):
        select("frs", R, reward=0)
    with pytest.raises(CapoError, match="reward index 2 out of range"):
        select("best_worst", R, reward=2)


def test_draw_pair_uniform_over_sets():
    rng = np.random.default_rng(0)
    pos = np.array([True, True, False, False])
    neg = np.array([False, False, False, True])
    draws = [draw_pair(pos, neg, rng) for _ in range(400)]
    assert {i for i, _ in draws} == {0, 1} and {j for _, j in draws} == {3}
    assert 150 < sum(i == 0 for i, _ in draws) < 250  # ~Binomial(400, 1/2)
    with pytest.raises(CapoError, match="empty"):
        draw_pair(pos, np.zeros(4, dtype=bool), rng)


def test_errors():
    with pytest.raises(CapoError, match="L = 0"):
        frontier_sets(np.zeros((2, 3, 0)))
    with pytest.raises(CapoError, match=r"\[P, N, L\]"):
        frontier_sets(np.zeros((2, 3)))
    with pytest.raises(CapoError, match="mask must be bool"):
        frontier_sets(np.zeros((2, 3, 2)), np.ones((3, 2), dtype=bool))
    R = np.zeros((2, 3, 2))
    R[1, 2, 0] = np.nan
    with pytest.raises(CapoError, match="prompt row 1: sample 2 has a non-finite"):
        frontier_sets(R)
    with pytest.raises(CapoError, match="prompt row 1"):
        best_worst(R[:, :, 0])


# ---- properties, checked against a brute-force reading of Sec. 4.3 ----


def _dominates(a, b):
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(
        x > y for x, y in zip(a, b, strict=True)
    )


def _brute_fronts(points):
    """(U, D) index sets for a list of reward vectors, by the definition."""
    n = len(points)
    upper = {k for k in range(n) if not any(_dominates(points[i], points[k]) for i in range(n))}
    lower = {i for i in range(n) if not any(_dominates(points[i], points[k]) for k in range(n))}
    return upper, lower


@st.composite
def multi_rewards(draw):
    P, N, L = draw(st.integers(1, 4)), draw(st.integers(1, 7)), draw(st.integers(1, 3))
    # a coarse grid makes ties and dominance common
    R = draw(hnp.arrays(np.float64, (P, N, L), elements=st.sampled_from([0.0, 0.25, 0.5, 1.0])))
    mask = draw(hnp.arrays(np.bool_, (P, N)))
    return R, mask


@settings(max_examples=200, deadline=None)
@given(multi_rewards())
def test_frs_properties(case):
    R, mask = case
    pos, neg = frontier_sets(np.where(mask[:, :, None], R, np.nan), mask)
    for p in range(len(R)):
        valid = np.flatnonzero(mask[p])
        pts = [tuple(R[p, k]) for k in valid]
        upper, lower = _brute_fronts(pts)
        got_pos = {int(np.flatnonzero(valid == k)[0]) for k in np.flatnonzero(pos[p])}
        got_neg = {int(np.flatnonzero(valid == k)[0]) for k in np.flatnonzero(neg[p])}
        assert not (pos[p] & ~mask[p]).any() and not (neg[p] & ~mask[p]).any()
        assert not (pos[p] & neg[p]).any()
        if upper - lower:  # a dominance pair exists: exactly the fronts
            assert got_pos == upper - lower and got_neg == lower - upper
            assert all(k in upper for k in got_pos)  # X+ non-dominated
            assert all(k in lower for k in got_neg)  # X- dominates nobody
        else:  # fallback: one-hot best/worst of the ensemble, or nothing on a tie
            assert len(got_pos) == len(got_neg) <= 1
            if got_pos:
                mean = R[p, valid].mean(axis=1)
                assert mean[got_pos.pop()] == mean.max() > mean.min() == mean[got_neg.pop()]
        # computing on the valid subset alone gives the same sets
        if len(valid):
            alone_pos, alone_neg = frontier_sets(R[p, valid][None])
            np.testing.assert_array_equal(alone_pos[0], pos[p, valid])
            np.testing.assert_array_equal(alone_neg[0], neg[p, valid])


@settings(max_examples=200, deadline=None)
@given(multi_rewards())
def test_rules_select_one_hot_valid_pairs(case):
    R, mask = case
    for name in ("best_worst", "sum"):
        pos, neg = PAIR_RULES[name](R, mask)
        assert (pos.sum(axis=1) == neg.sum(axis=1)).all() and pos.sum(axis=1).max(initial=0) <= 1
        assert not (pos & ~mask).any() and not (neg & ~mask).any()
        assert not (pos & neg).any()
    pos_idx, neg_idx, ok = best_worst(R[:, :, 0], mask)
    for p in np.flatnonzero(ok):
        vals = R[p, mask[p], 0]
        assert R[p, pos_idx[p], 0] == vals.max() > vals.min() == R[p, neg_idx[p], 0]
    assert (ok == [len(set(R[p, mask[p], 0])) >= 2 for p in range(len(R))]).all()
