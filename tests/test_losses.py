"""Implicit reward and DPO / IPO / CaPO losses (paper Sec. 3, Eq. 5, 8; docs/design.md §2.4, §2.5)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from capo.losses import LOSSES, capo_loss, dpo_loss, implicit_reward, ipo_loss
from capo.schedules import VPSchedule, add_noise, per_sample_error, to_epsilon
from capo.weighting import constant

floats = st.floats(-50.0, 50.0, allow_nan=False)


def test_implicit_reward_hand_value():
    # R = f (e_ref − e_θ): f = 2, e_ref = 0.5, e_θ = 0.3 -> 0.4; a worse policy gives R < 0.
    r = implicit_reward(torch.tensor([0.3, 0.7]), torch.tensor([0.5, 0.5]), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(r, torch.tensor([0.4, -0.2]))


def test_hand_values():
    d = torch.tensor([0.0, 0.25, 0.1])
    # DPO at Δ = 0: −log σ(0) = log 2.
    assert dpo_loss(d, 2.0)[0].item() == pytest.approx(math.log(2))
    # IPO at β = 2, Δ = 0.25: (1 − 0.5)² = 0.25.
    assert ipo_loss(d, 2.0)[1].item() == pytest.approx(0.25)
    # CaPO at β = 2, Δ = 0.1, ΔR_ca = 0.3: (0.3 − 0.2)² = 0.01.
    assert capo_loss(d, torch.full((3,), 0.3), 2.0)[2].item() == pytest.approx(0.01)


def test_dpo_is_stable_for_large_margins():
    # −log σ(−10⁴) = 10⁴ + log(1 + e^−10⁴) = 10⁴; −log σ(10⁴) = 0 (no inf, no nan).
    out = dpo_loss(torch.tensor([-1e4, 1e4]), 1.0)
    assert out.tolist() == [1e4, 0.0]


def test_losses_are_per_pair():
    d, r = torch.randn(7), torch.rand(7)
    for name, fn in LOSSES.items():
        assert fn(d, r, 3.0).shape == (7,), name


def test_table_has_uniform_signature():
    d, r = torch.randn(5), torch.rand(5) * 2 - 1
    torch.testing.assert_close(LOSSES["dpo"](d, r, 0.7), dpo_loss(d, 0.7))
    torch.testing.assert_close(LOSSES["ipo"](d, r, 0.7), ipo_loss(d, 0.7))
    torch.testing.assert_close(LOSSES["capo"](d, r, 0.7), capo_loss(d, r, 0.7))


def test_dpo_matches_diffusion_dpo_under_constant_weighting_and_shared_noise():
    # Diffusion-DPO (Wallace et al., reference train.py): with e = ‖ε̂ − ε‖² mean per sample,
    #   model_diff = e_θ(x_w) − e_θ(x_l), ref_diff = e_ref(x_w) − e_ref(x_l),
    #   loss = −log σ(−(β_DPO/2) · (model_diff − ref_diff)).
    # Ours with f = 1: Δ_θ = (e_ref(x_w) − e_θ(x_w)) − (e_ref(x_l) − e_θ(x_l))
    #   = −(model_diff − ref_diff), so −log σ(β Δ_θ) is the same loss with β_DPO = 2β.
    g = torch.Generator().manual_seed(0)
    sched = VPSchedule.from_alphas_cumprod(
        torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0))
    x_w, x_l = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    eps = torch.randn(8, 4, 8, 8, generator=g)  # one noise shared by the pair, as Diffusion-DPO
    t = sched.sample_t(8, generator=g)
    policy = torch.nn.Conv2d(4, 4, 3, padding=1)
    ref = torch.nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        errs = {}
        for name, x in (("w", x_w), ("l", x_l)):
            x_t = add_noise(x, eps, t, sched)
            for who, net in (("theta", policy), ("ref", ref)):
                errs[who, name] = per_sample_error(to_epsilon(net(x_t), x_t, t, "epsilon", sched), eps)
    beta_dpo, f_t = 5000.0, constant()(sched, t)
    delta = (implicit_reward(errs["theta", "w"], errs["ref", "w"], f_t)
             - implicit_reward(errs["theta", "l"], errs["ref", "l"], f_t))
    model_diff = errs["theta", "w"] - errs["theta", "l"]
    ref_diff = errs["ref", "w"] - errs["ref", "l"]
    published = -F.logsigmoid(-0.5 * beta_dpo * (model_diff - ref_diff))
    torch.testing.assert_close(dpo_loss(delta, beta_dpo / 2), published)
    assert published.std() > 0  # a non-trivial comparison


@settings(max_examples=100, deadline=None)
@given(floats, st.floats(0.01, 10.0))
def test_capo_with_unit_target_is_ipo(delta, beta):
    # Eq. 8 with ΔR_ca = 1 is IPO's (1 − βΔ)² (paper Sec. 4.2).
    d = torch.tensor([delta], dtype=torch.float64)
    torch.testing.assert_close(capo_loss(d, torch.ones_like(d), beta), ipo_loss(d, beta))


@settings(max_examples=100, deadline=None)
@given(floats, st.floats(-0.99, 0.99), st.floats(0.01, 10.0))
def test_capo_is_zero_exactly_at_the_calibrated_margin(delta, delta_rca, beta):
    # ℓ = (ΔR_ca − βΔ)² ≥ 0, with equality at Δ_θ = ΔR_ca / β.
    d = torch.tensor([delta], dtype=torch.float64)
    r = torch.tensor([delta_rca], dtype=torch.float64)
    assert capo_loss(d, r, beta).item() >= 0
    assert capo_loss(r / beta, r, beta).item() == pytest.approx(0.0, abs=1e-20)
