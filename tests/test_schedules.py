"""Schedules and ε-conversion (docs/design.md §2.1, §2.2): hand-derived values, derivatives, round trips."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from capo.errors import CapoError
from capo.schedules import (
    PREDICTIONS,
    FlowSchedule,
    VPSchedule,
    add_noise,
    per_sample_error,
    target_of,
    to_epsilon,
)

D = torch.float64


def test_vp_lambda_of_known_alphabar():
    # λ = log(ᾱ / (1 − ᾱ)): ᾱ = 0.8 -> log(0.8/0.2) = log 4; ᾱ = 0.5 -> 0; ᾱ = 0.2 -> −log 4.
    # T = 4, so t = index / 4. Central difference at index 1: (λ[2] − λ[0]) / (2/4)
    # = (−log 4 − log 4) / 0.5 = −4 log 4; one-sided at index 0: (λ[1] − λ[0]) / (1/4) = −4 log 4.
    sched = VPSchedule.from_alphas_cumprod([0.8, 0.5, 0.2, 0.1])
    alpha, sigma, lam, dlam = sched(torch.tensor([0.0, 0.25, 0.5], dtype=D))
    torch.testing.assert_close(alpha, torch.tensor([0.8, 0.5, 0.2], dtype=D).sqrt())
    torch.testing.assert_close(sigma, torch.tensor([0.2, 0.5, 0.8], dtype=D).sqrt())
    torch.testing.assert_close(lam, torch.tensor([math.log(4), 0.0, -math.log(4)], dtype=D))
    torch.testing.assert_close(dlam[:2], torch.full((2,), -4 * math.log(4), dtype=D))
    assert sched.num_train_timesteps == 4
    assert sched(torch.tensor([0.25]))[0].dtype == torch.float32


def test_vp_finite_difference_is_exact_for_linear_log_snr():
    # λ(t) = 6 − 12 t, i.e. ᾱ(t) = sigmoid(6 − 12 t): λ' = −12 exactly, and a central
    # difference of a linear function is exact.
    T = 1000
    t = torch.arange(T, dtype=D) / T
    sched = VPSchedule.from_alphas_cumprod(torch.sigmoid(6 - 12 * t))
    _, _, lam, dlam = sched(t)
    torch.testing.assert_close(lam, 6 - 12 * t)
    torch.testing.assert_close(dlam, torch.full_like(t, -12.0))


def test_vp_finite_difference_matches_linear_beta_schedule():
    # Continuous VP-SDE with β(t) = β0 + (β1 − β0) t linear in t:
    # log ᾱ(t) = −(β0 t + ½ (β1 − β0) t²), λ = log ᾱ − log(1 − ᾱ), so
    # λ' = (log ᾱ)' · (1 + ᾱ/(1 − ᾱ)) = −(β0 + (β1 − β0) t) / (1 − ᾱ).
    b0, b1, T = 0.1, 20.0, 1000
    t = torch.arange(T, dtype=D) / T
    ac = torch.exp(-(b0 * t + 0.5 * (b1 - b0) * t**2))
    sched = VPSchedule.from_alphas_cumprod(ac.numpy())
    # A central difference errs by λ''' h²/6 (h = 1/T). Near t = 0, λ ≈ −log(β0 t) has
    # λ' ≈ −1/t, λ''' ≈ −2/t³: relative error ≈ h²/(3 t²), below 1.4e-4 from t = 0.05 on.
    inner = t[50:-1]
    analytic = -(b0 + (b1 - b0) * inner) / (1 - ac[50:-1])
    torch.testing.assert_close(sched(inner)[3], analytic, rtol=2e-4, atol=0)


def test_vp_zero_terminal_snr_is_kept_out_of_range():
    # ᾱ[-1] = 0 gives λ = −∞ there: the default t_max stops one index before.
    ac = np.linspace(0.99, 0.0, 10)
    sched = VPSchedule.from_alphas_cumprod(ac)
    assert sched.t_max == pytest.approx(0.8)
    assert torch.isfinite(torch.stack(sched(torch.arange(9, dtype=D) / 10))).all()
    with pytest.raises(CapoError, match="t_max"):
        VPSchedule.from_alphas_cumprod(ac, t_max=0.9)


def test_vp_rejects_bad_tables():
    with pytest.raises(CapoError, match="alphas_cumprod"):
        VPSchedule.from_alphas_cumprod([1.0, 0.0])


def test_vp_timestep_index_and_sampling():
    sched = VPSchedule.from_alphas_cumprod(np.linspace(0.999, 0.01, 1000), t_min=0.2, t_max=0.4)
    assert sched.timestep_index(torch.tensor([0.5, 0.2004, 0.9999])).tolist() == [500, 200, 999]
    g = torch.Generator().manual_seed(0)
    t = sched.sample_t(4096, generator=g)
    assert t.shape == (4096,) and t.dtype == torch.float32
    assert t.min() >= 0.2 and t.max() <= 0.4
    idx = t.double() * 1000
    torch.testing.assert_close(idx, idx.round())  # on the grid index / T
    assert set(sched.timestep_index(t).tolist()) == set(range(200, 401))
    again = sched.sample_t(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_flow_lambda_hand_values():
    # shift 1, u = 0.5: s = 0.5, λ = 2 log(0.5/0.5) = 0.
    # shift 3, u = 0.5: s = 3·0.5 / (1 + 2·0.5) = 0.75, λ = 2 log(0.25/0.75) = −2 log 3.
    u = torch.tensor([0.5], dtype=D)
    a1, s1, lam1, _ = FlowSchedule(1.0)(u)
    a3, s3, lam3, _ = FlowSchedule(3.0)(u)
    assert (a1.item(), s1.item(), lam1.item()) == pytest.approx((0.5, 0.5, 0.0))
    assert (a3.item(), s3.item(), lam3.item()) == pytest.approx((0.25, 0.75, -2 * math.log(3)))
    assert FlowSchedule(3.0).sigma_of(u).item() == pytest.approx(0.75)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_lambda_derivative(shift):
    # (1 − s)/s = (1 − u)/(k u), so λ = 2 log((1 − u)/u) − 2 log k and
    # λ'_u = −2 / (u (1 − u)) for every shift k; also checked against a central difference.
    sched = FlowSchedule(shift)
    u = torch.linspace(0.01, 0.99, 99, dtype=D)
    _, _, lam, dlam = sched(u)
    torch.testing.assert_close(lam, 2 * torch.log((1 - u) / u) - 2 * math.log(shift))
    torch.testing.assert_close(dlam, -2 / (u * (1 - u)))
    h = 1e-6
    fd = (sched(u + h)[2] - sched(u - h)[2]) / (2 * h)
    torch.testing.assert_close(dlam, fd, rtol=1e-6, atol=0)


def test_flow_sampling_range_and_bad_args():
    sched = FlowSchedule(3.0, t_min=0.1, t_max=0.3)
    t = sched.sample_t(1000, generator=torch.Generator().manual_seed(1))
    assert t.min() >= 0.1 and t.max() <= 0.3 and t.dtype == torch.float32
    with pytest.raises(CapoError):
        FlowSchedule(1.0, t_min=0.0)
    with pytest.raises(CapoError):
        FlowSchedule(0.0)


def _schedules():
    ac = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=D) ** 2, 0)
    return {"vp": VPSchedule.from_alphas_cumprod(ac), "flow": FlowSchedule(3.0)}


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_to_epsilon_round_trip(kind):
    # Outputs built by hand from known x, ε: v = α ε − σ x, flow velocity u = ε − x.
    # x_t = α x + σ ε; ε̂ from v: σ x_t + α v = σα x + σ² ε + α² ε − ασ x = ε (α² + σ² = 1);
    # ε̂ from u: x_t + (1 − s) u = (1 − s) x + s ε + (1 − s)(ε − x) = ε.
    sched = _schedules()["flow" if kind == "flow" else "vp"]
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = sched.sample_t(6, generator=g)
    alpha, sigma, _, _ = (v.view(-1, 1, 1, 1) for v in sched(t))
    out = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x, "flow": eps - x}[kind]
    x_t = add_noise(x, eps, t, sched)
    torch.testing.assert_close(x_t, alpha * x + sigma * eps)
    torch.testing.assert_close(target_of(x, eps, t, kind, sched), out)
    torch.testing.assert_close(to_epsilon(out, x_t, t, kind, sched), eps, rtol=1e-5, atol=1e-5)


def test_to_epsilon_half_precision_output_is_converted_in_float32():
    sched = _schedules()["vp"]
    t = torch.tensor([0.5, 0.7])
    out = torch.ones(2, 3, dtype=torch.bfloat16)
    assert to_epsilon(out, out, t, "v_prediction", sched).dtype == torch.float32


def test_unknown_prediction_type():
    assert set(PREDICTIONS) == {"epsilon", "v_prediction", "flow"}
    with pytest.raises(CapoError, match="sample"):
        to_epsilon(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0.5]), "sample",
                   FlowSchedule())


def test_per_sample_error_hand_value():
    # Sample 0: differences (1, 1, 1, 1) -> mean 1; sample 1: (2, 0, 0, 2) -> (4 + 4)/4 = 2.
    eps = torch.zeros(2, 1, 2, 2)
    eps_hat = torch.tensor([[[[1.0, -1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, -2.0]]]])
    assert per_sample_error(eps_hat, eps).tolist() == [1.0, 2.0]


@settings(max_examples=50, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.2, 5.0))
def test_flow_alpha_sigma_are_the_interpolation(u, shift):
    # Flow: α + σ = 1 with σ = s(u) ∈ [0, 1], monotone in u.
    alpha, sigma, _, _ = FlowSchedule(shift)(torch.tensor([u], dtype=D))
    assert alpha.item() + sigma.item() == pytest.approx(1.0)
    assert 0.0 <= sigma.item() <= 1.0


@pytest.mark.parametrize("sched", [VPSchedule.from_alphas_cumprod([0.8, 0.5, 0.2, 0.1]),
                                   FlowSchedule(shift=3.0)], ids=["vp", "flow"])
def test_output_fields_are_named(sched):
    # Noise(alpha, sigma, lam, dlam): the fields are the tuple's entries, and λ = log(α² / σ²)
    t = torch.tensor([0.3, 0.6])
    noise = sched(t)
    assert tuple(noise) == (noise.alpha, noise.sigma, noise.lam, noise.dlam)
    torch.testing.assert_close(noise.lam, torch.log(noise.alpha**2 / noise.sigma**2))
