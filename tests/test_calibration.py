"""capo.calibration: Eq. 2 (Bradley-Terry logits), Eq. 7 (calibrated reward), ensemble."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from capo.calibration import (
    TRANSFORMS,
    bt_logits,
    calibrate,
    calibrate_against,
    ensemble,
    sigmoid,
    valid_prompts,
)
from capo.errors import CapoError

# sigmoid values used below: sigmoid(1) = 0.7310585786300049, sigmoid(2) = 0.8807970779778823,
# sigmoid(-1) = 1 - sigmoid(1) = 0.2689414213699951, sigmoid(-2) = 0.11920292202211757.
S1, S2 = 0.7310585786300049, 0.8807970779778823


def test_sigmoid_values_and_extremes():
    assert sigmoid(np.array([0.0]))[0] == 0.5
    np.testing.assert_allclose(sigmoid(np.array([1.0, 2.0, -1.0])), [S1, S2, 1 - S1], rtol=1e-15)
    # far tails: no NaN, no overflow error; exp(1000) overflows to inf and 1/(1+inf) = 0.
    tails = sigmoid(np.array([-1000.0, 1000.0, -40.0]))
    assert tails[0] == 0.0 and tails[1] == 1.0
    np.testing.assert_allclose(tails[2], math.exp(-40.0), rtol=1e-12)  # ~ e^x for x << 0


def test_calibrate_three_samples_by_hand():
    # R = [0, 1, 2], N - 1 = 2:
    # R_ca(x0) = (sigmoid(0-1) + sigmoid(0-2)) / 2 = (0.26894142 + 0.11920292) / 2 = 0.19407217
    # R_ca(x1) = (sigmoid(1-0) + sigmoid(1-2)) / 2 = (0.73105858 + 0.26894142) / 2 = 0.5
    # R_ca(x2) = (sigmoid(2-0) + sigmoid(2-1)) / 2 = (0.88079708 + 0.73105858) / 2 = 0.80592783
    expected = [((1 - S1) + (1 - S2)) / 2, 0.5, (S2 + S1) / 2]
    np.testing.assert_allclose(expected, [0.19407217169605632, 0.5, 0.8059278283039436])
    out = calibrate(np.array([[0.0, 1.0, 2.0]]))
    np.testing.assert_allclose(out[0], expected, rtol=1e-14)


def test_calibrate_two_prompts_and_ragged_mask():
    # Row 0: N = 2, R = [3, 3] -> both sigmoid(0) / 1 = 0.5 (a tie is a coin flip).
    # Row 1: samples 0 and 2 valid, R = [0, *, 1] -> x0: sigmoid(-1) / 1, x2: sigmoid(1) / 1;
    #        the invalid middle entry (any garbage, even NaN) is ignored and comes back NaN.
    R = np.array([[3.0, 3.0, 7.0], [0.0, np.nan, 1.0]])
    mask = np.array([[True, True, False], [True, False, True]])
    out = calibrate(R, mask)
    np.testing.assert_allclose(out[0, :2], [0.5, 0.5])
    np.testing.assert_allclose(out[1, [0, 2]], [1 - S1, S1], rtol=1e-14)
    assert np.isnan(out[0, 2]) and np.isnan(out[1, 1])


def test_calibrate_shift_invariant():
    # Eq. 7 depends only on differences R_i - R_j.
    R = np.array([[0.3, -1.2, 2.5, 0.0]])
    np.testing.assert_allclose(calibrate(R + 100.0), calibrate(R), atol=1e-12)


def test_calibrate_chunks_agree(monkeypatch):
    # Results must not depend on how prompts are chunked.
    import capo.calibration as cal

    R = np.random.default_rng(0).normal(size=(50, 6))
    full = calibrate(R)
    monkeypatch.setattr(cal, "CHUNK_ELEMENTS", 70)  # 70 // 36 = 1 prompt per chunk
    np.testing.assert_array_equal(calibrate(R), full)


def test_bt_logits_identity_and_scale():
    # HPSv2-style cosine similarity with bt_scale 100: 0.25 -> 25.
    np.testing.assert_allclose(bt_logits(np.array([0.25, -0.5]), scale=100.0), [25.0, -50.0])


def test_bt_logits_logit_by_hand():
    # logit(0.5) = log(0.5/0.5) = 0; logit(0.8) = log(0.8/0.2) = log 4 = 1.3862943611198906;
    # logit(0.2) = -log 4; with scale 2: [0, 2.7725887222397811, -2.7725887222397811].
    # p = 1 is clipped to 1 - 1e-6: logit = log((1 - 1e-6) / 1e-6) = 13.815509557963773.
    out = bt_logits(np.array([0.5, 0.8, 0.2, 1.0, 0.0]), scale=2.0, transform="logit")
    log4 = math.log(4.0)
    np.testing.assert_allclose(out[:3], [0.0, 2 * log4, -2 * log4], atol=1e-14)
    np.testing.assert_allclose(out[3], 2 * 13.815509557963773, rtol=1e-9)
    np.testing.assert_allclose(out[4], -2 * 13.815509557963773, rtol=1e-9)
    assert set(TRANSFORMS) == {"identity", "logit", "logit_of_square"}


def test_bt_logits_logit_of_square_by_hand():
    # s = sqrt(0.8): s² = 0.8, logit = log 4; s = 0.5: s² = 0.25, logit = log(0.25 / 0.75) = -log 3.
    out = bt_logits(np.array([math.sqrt(0.8), 0.5]), transform="logit_of_square")
    np.testing.assert_allclose(out, [math.log(4.0), -math.log(3.0)], atol=1e-12)
    with pytest.raises(CapoError, match="logit_of_square"):
        bt_logits(np.array([1.5]), transform="logit_of_square")


def test_bt_logits_errors():
    with pytest.raises(CapoError, match="unknown reward transform 'tanh'"):
        bt_logits(np.zeros(2), transform="tanh")
    with pytest.raises(CapoError, match="probabilities"):
        bt_logits(np.array([0.5, 1.5]), transform="logit")
    with pytest.raises(CapoError, match="bt_scale"):
        bt_logits(np.zeros(2), scale=0.0)


def test_ensemble_mean_over_rewards():
    # [P=1, N=2, L=3]: x0 -> (0.2 + 0.5 + 0.8) / 3 = 0.5, x1 -> (0.1 + 0.1 + 0.4) / 3 = 0.2.
    R_ca = np.array([[[0.2, 0.5, 0.8], [0.1, 0.1, 0.4]]])
    np.testing.assert_allclose(ensemble(R_ca), [[0.5, 0.2]])
    with pytest.raises(CapoError, match="L = 0"):
        ensemble(np.zeros((2, 3, 0)))
    with pytest.raises(CapoError, match=r"\[P, N, L\]"):
        ensemble(np.zeros((2, 3)))


def test_valid_prompts():
    mask = np.array([[True, True, False], [True, False, False], [False, False, False]])
    np.testing.assert_array_equal(valid_prompts(mask), [True, False, False])
    np.testing.assert_array_equal(valid_prompts(mask, min_samples=1), [True, True, False])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_calibrate_non_finite_names_row(bad):
    R = np.zeros((3, 4))
    R[2, 1] = bad
    with pytest.raises(CapoError, match="prompt row 2: sample 1 has a non-finite reward"):
        calibrate(R)


def test_calibrate_too_few_samples_names_row():
    mask = np.ones((3, 4), dtype=bool)
    mask[1, 1:] = False
    with pytest.raises(CapoError, match="prompt row 1: 1 valid samples, need at least 2"):
        calibrate(np.zeros((3, 4)), mask)
    with pytest.raises(CapoError, match="prompt row 0: 1 valid samples"):
        calibrate(np.zeros((2, 1)))


def test_calibrate_shape_errors():
    with pytest.raises(CapoError, match=r"\[P, N\]"):
        calibrate(np.zeros((2, 3, 1)))
    with pytest.raises(CapoError, match="mask must be bool"):
        calibrate(np.zeros((2, 3)), np.ones((2, 4), dtype=bool))
    with pytest.raises(CapoError, match="mask must be bool"):
        calibrate(np.zeros((2, 3)), np.ones((2, 3), dtype=int))


rewards = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=9),
    elements=st.floats(-10, 10, allow_nan=False),
)


@settings(max_examples=150, deadline=None)
@given(rewards)
def test_calibrate_properties(R):
    out = calibrate(R)
    # Win-rates of logits within [-10, 10] lie strictly inside (0, 1).
    assert np.all(out > 0) and np.all(out < 1)
    # sigma(a) + sigma(-a) = 1, so the N(N-1)/2 pairs share total 1 each: the mean is 1/2.
    np.testing.assert_allclose(out.mean(axis=1), 0.5, atol=1e-12)
    # Order of raw rewards within a prompt is kept (ties map to equal values).
    for r, c in zip(R, out, strict=True):
        for i in range(len(r)):
            for k in range(len(r)):
                if r[i] == r[k]:
                    assert abs(c[i] - c[k]) <= 1e-12
                elif r[i] > r[k]:
                    assert c[i] >= c[k] - 1e-12
                    if r[i] - r[k] >= 1e-6:
                        assert c[i] > c[k]


@st.composite
def ragged(draw):
    P = draw(st.integers(1, 5))
    N = draw(st.integers(2, 8))
    R = draw(hnp.arrays(np.float64, (P, N), elements=st.floats(-10, 10)))
    mask = draw(hnp.arrays(np.bool_, (P, N)))
    for p in range(P):  # ensure >= 2 valid samples per prompt
        mask[p, draw(st.lists(st.integers(0, N - 1), min_size=2, max_size=2, unique=True))] = True
    return R, mask


@settings(max_examples=150, deadline=None)
@given(ragged())
def test_calibrate_mask_equals_valid_subset(case):
    R, mask = case
    garbage = np.where(mask, R, np.nan)  # whatever sits in invalid entries is ignored
    out = calibrate(garbage, mask)
    assert np.all(np.isnan(out[~mask]))
    for p in range(len(R)):
        alone = calibrate(R[p, mask[p]][None, :])[0]
        np.testing.assert_allclose(out[p, mask[p]], alone, atol=1e-12)
        np.testing.assert_allclose(out[p, mask[p]].mean(), 0.5, atol=1e-12)


def test_calibrate_against_bank_by_hand():
    # samples R = [0, 2] of one prompt, bank B = [1, -1, 0] (the base round's logits):
    # R_ca(x0) = (sigmoid(0-1) + sigmoid(0+1) + sigmoid(0)) / 3 = ((1 - S1) + S1 + 0.5) / 3 = 0.5
    # R_ca(x1) = (sigmoid(2-1) + sigmoid(2+1) + sigmoid(2)) / 3 = (S1 + 0.95257413 + S2) / 3
    S3 = 0.9525741268224334
    out = calibrate_against(np.array([[0.0, 2.0]]), np.array([[1.0, -1.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.5, (S1 + S3 + S2) / 3]], rtol=1e-15)
    # a masked bank entry is left out of the mean: bank [1, (-1 masked), 0] -> / 2
    masked = calibrate_against(np.array([[0.0, 2.0]]), np.array([[1.0, np.nan, 0.0]]),
                               bank_mask=np.array([[True, False, True]]))
    np.testing.assert_allclose(masked, [[((1 - S1) + 0.5) / 2, (S1 + S2) / 2]], rtol=1e-15)


def test_calibrate_against_own_samples_is_eq7_by_hand():
    # bank = the samples [0, 1, 2] themselves: j != i, exactly test_calibrate_three_samples_by_hand
    R = np.array([[0.0, 1.0, 2.0]])
    np.testing.assert_allclose(calibrate_against(R, R, own=True),
                               [[((1 - S1) + (1 - S2)) / 2, 0.5, (S2 + S1) / 2]], rtol=1e-15)


@settings(max_examples=150, deadline=None)
@given(ragged())
def test_calibrate_against_own_bank_equals_calibrate(case):
    R, mask = case
    garbage = np.where(mask, R, np.nan)
    np.testing.assert_allclose(calibrate_against(garbage, garbage, mask, mask, own=True),
                               calibrate(garbage, mask), atol=1e-12)


def test_calibrate_against_errors_name_row():
    with pytest.raises(CapoError, match="prompt row 1: no bank sample"):
        calibrate_against(np.zeros((2, 2)), np.zeros((2, 1)), bank_mask=np.array([[True], [False]]))
    with pytest.raises(CapoError, match="R \\[P, N\\] and bank \\[P, M\\]"):
        calibrate_against(np.zeros((2, 2)), np.zeros((3, 2)))
    with pytest.raises(CapoError, match="prompt row 0: sample 1 has a non-finite"):
        calibrate_against(np.array([[0.0, np.nan]]), np.zeros((1, 2)))
