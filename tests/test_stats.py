"""capo.stats: win-rate with ties as 1/2 and prompt-resampling bootstrap intervals (Sec. 5)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from capo.errors import CapoError
from capo.stats import bootstrap_ci, mean_and_ci, win_rate, wins


def test_win_rate_by_hand():
    # tuned vs base: win, loss, tie, win -> (1 + 0 + 0.5 + 1) / 4 = 0.625 -> 62.5 %.
    assert win_rate([0.9, 0.1, 0.5, 0.7], [0.2, 0.3, 0.5, 0.6]) == 62.5
    np.testing.assert_array_equal(wins([3.0, 1.0, 2.0], [1.0, 3.0, 2.0]), [1.0, 0.0, 0.5])


def test_bootstrap_ci_by_hand():
    # Two prompts, one seed: prompt 0 wins (1), prompt 1 ties (1/2) -> per-prompt 100 and 50.
    # A replicate draws 2 prompts with replacement: mean in {50, 75, 100} with probabilities
    # 1/4, 1/2, 1/4, so with many replicates the 2.5 % / 97.5 % quantiles are 50 and 100.
    tuned, base = [[1.0], [0.0]], [[0.0], [0.0]]
    assert win_rate(tuned, base) == 75.0
    assert bootstrap_ci(tuned, base, n_boot=2000, seed=0) == (50.0, 100.0)


def test_bootstrap_ci_degenerate_and_deterministic():
    # Every prompt wins 2 of 4 seeds: each per-prompt rate is 50, so every replicate is 50.
    tuned = np.tile([1.0, 1.0, 0.0, 0.0], (30, 1))
    assert bootstrap_ci(tuned, np.full((30, 4), 0.5)) == (50.0, 50.0)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
    assert bootstrap_ci(a, b, seed=7) == bootstrap_ci(a, b, seed=7)
    low, high = bootstrap_ci(a, b, seed=7)
    assert low <= win_rate(a, b) <= high


def test_bootstrap_ci_blocks_do_not_change_shape_of_result(monkeypatch):
    # Replicates are drawn in blocks; a tiny block size still yields n_boot replicates.
    import capo.stats as stats

    monkeypatch.setattr(stats, "BOOT_BLOCK_ELEMENTS", 7)
    means = stats.bootstrap_means(np.array([0.0, 1.0, 2.0]), n_boot=10, seed=0)
    assert means.shape == (10,) and set(np.round(means * 3).astype(int)) <= set(range(7))


def test_mean_and_ci_by_hand():
    # per-prompt means: (1 + 3) / 2 = 2 and (5 + 7) / 2 = 6 -> overall mean 4; replicate
    # means lie in {2, 4, 6}.
    mean, low, high = mean_and_ci([[1.0, 3.0], [5.0, 7.0]], n_boot=2000)
    assert (mean, low, high) == (4.0, 2.0, 6.0)


def test_errors():
    with pytest.raises(CapoError, match="differ in shape"):
        win_rate(np.zeros(3), np.zeros(4))
    with pytest.raises(CapoError, match=r"tuned scores: non-finite value at index \(1, 0\)"):
        bootstrap_ci([[0.0], [np.nan]], [[0.0], [0.0]])
    with pytest.raises(CapoError, match="base scores: non-finite"):
        win_rate([0.0], [np.inf])
    with pytest.raises(CapoError, match="empty"):
        win_rate([], [])
    with pytest.raises(CapoError, match="level"):
        bootstrap_ci([[0.0]], [[1.0]], level=1.5)
    with pytest.raises(CapoError, match="n_boot"):
        bootstrap_ci([[0.0]], [[1.0]], n_boot=0)
    with pytest.raises(CapoError, match=r"\[P, S\]"):
        bootstrap_ci(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))


score_pairs = st.integers(1, 20).flatmap(
    lambda n: st.tuples(
        *(hnp.arrays(np.float64, (n, 2), elements=st.sampled_from([0.0, 0.5, 1.0])),) * 2
    )
)


@settings(max_examples=100, deadline=None)
@given(score_pairs)
def test_win_rate_symmetry_and_interval(pair):
    a, b = pair
    assert win_rate(a, b) + win_rate(b, a) == pytest.approx(100.0)
    assert win_rate(a, a) == 50.0
    low, high = bootstrap_ci(a, b, n_boot=200)
    per_prompt = 100 * wins(a, b).mean(axis=1)
    assert per_prompt.min() - 1e-9 <= low <= high <= per_prompt.max() + 1e-9


def test_missing_seeds_weigh_images_equally_by_hand():
    from capo.stats import MISSING, bootstrap_means, mean_and_ci, per_prompt_means

    # prompt 0 has 3 images (wins 1, 1, 0), prompt 1 one image (win 0): 2 wins of 4 images = 50%
    tuned = np.array([[1.0, 1.0, 0.0], [0.0, MISSING, MISSING]])
    base = np.array([[0.0, 0.0, 1.0], [1.0, MISSING, MISSING]])
    assert win_rate(tuned, base) == 50.0
    means, counts = per_prompt_means(tuned)
    assert means.tolist() == [2 / 3, 0.0] and counts.tolist() == [3.0, 1.0]
    assert per_prompt_means(np.ones((2, 2)))[1] is None
    # replicates: both prompts -> 2/4; prompt 0 twice -> 2/3; prompt 1 twice -> 0
    reps = bootstrap_means(np.array([2 / 3, 0.0]), n_boot=500, seed=1, weights=np.array([3.0, 1.0]))
    assert set(np.round(reps, 6)) == {0.0, 0.5, round(2 / 3, 6)}
    low, high = bootstrap_ci(tuned, base, n_boot=500)
    assert (low, high) == (0.0, pytest.approx(200 / 3))
    assert mean_and_ci(tuned, n_boot=50)[0] == 0.5
    with pytest.raises(CapoError, match=r"tuned scores: non-finite value at index \(1, 1\)"):
        win_rate(tuned, np.where(np.isnan(base), 0.0, base))  # NaN in one model only is an error
