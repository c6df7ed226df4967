"""Loss weighting f(t) = −λ'_t w(λ_t) (paper Sec. 4.4, docs/design.md §2.3)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from capo.models.diffusers_common import flow_schedule, vp_schedule
from capo.models.shapes import KIND_DEFAULTS, ShapesFlow, ShapesVP
from capo.schedules import FlowSchedule, VPSchedule
from capo.weighting import WEIGHTINGS, build, constant, mean_weight, normalized, sigmoid

D = torch.float64


def _sd_table() -> torch.Tensor:
    """SD1.5/SDXL 'scaled_linear' betas: sqrt(β) linear from sqrt(0.00085) to sqrt(0.012)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=D) ** 2
    return torch.cumprod(1 - betas, 0)


def _zero_terminal_table() -> np.ndarray:
    """A table with ᾱ[T−1] = 0 (zero terminal SNR), where λ = −∞."""
    return np.linspace(0.999, 0.0, 1000)


def test_table():
    assert WEIGHTINGS == {"constant": constant, "sigmoid": sigmoid}


def test_constant_is_one():
    t = torch.tensor([0.1, 0.5, 0.9])
    f = constant()(FlowSchedule(), t)
    assert f.tolist() == [1.0, 1.0, 1.0] and f.dtype == torch.float32


def test_sigmoid_hand_value_flow():
    # Flow, shift 1, u = 0.5: s = 0.5, λ = 0, λ' = −2/(u(1 − u)) = −8.
    # f = −λ' σ(−λ + b) = 8 σ(1.5) = 8 / (1 + e^−1.5) = 8 · 0.817574 ≈ 6.54060.
    f = sigmoid(1.5)(FlowSchedule(1.0), torch.tensor([0.5], dtype=D))
    assert f.item() == pytest.approx(8 / (1 + math.exp(-1.5)))
    assert f.item() == pytest.approx(6.54060, abs=1e-5)


def test_sigmoid_hand_value_vp():
    # ᾱ = (0.8, 0.5, 0.2, 0.1), T = 4; at t = 1/4: λ = 0, λ' = (−log 4 − log 4)/(2/4) = −4 log 4.
    # With b = 1: f = 4 log 4 · σ(1) = 4 log 4 / (1 + e^−1).
    sched = VPSchedule.from_alphas_cumprod([0.8, 0.5, 0.2, 0.1])
    f = sigmoid(1.0)(sched, torch.tensor([0.25], dtype=D))
    assert f.item() == pytest.approx(4 * math.log(4) / (1 + math.exp(-1)))


@pytest.mark.parametrize(
    "sched",
    [
        VPSchedule.from_alphas_cumprod(_sd_table()),
        VPSchedule.from_alphas_cumprod(_zero_terminal_table()),
        FlowSchedule(1.0),
        FlowSchedule(3.0),
    ],
    ids=["vp-sd", "vp-zero-terminal-snr", "flow-shift1", "flow-shift3"],
)
@pytest.mark.parametrize("name", ["constant", "sigmoid"])
def test_weights_finite_over_whole_range(sched, name):
    # Every t in [t_min, t_max], both ends included, and t outside it (clamped), incl. 0 and 1
    # where the flow λ is ±∞: f stays finite and positive.
    inside = torch.linspace(sched.t_min, sched.t_max, 10001, dtype=D)
    t = torch.cat([inside, torch.tensor([0.0, 1.0, sched.t_min, sched.t_max], dtype=D)])
    for bias in (-3.0, 0.0, 1.5, 3.0):
        f = WEIGHTINGS[name](bias)(sched, t) if name == "sigmoid" else constant()(sched, t)
        assert torch.isfinite(f).all() and (f > 0).all()
        f32 = WEIGHTINGS[name](bias)(sched, t.float()) if name == "sigmoid" else f
        assert torch.isfinite(f32).all()


@settings(max_examples=60, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.3, 6.0), st.floats(-4.0, 4.0), st.floats(0.01, 2.0))
def test_sigmoid_grows_with_bias(u, shift, bias, step):
    # σ(−λ + b) increases with b and −λ' > 0, so f(b + step) > f(b) wherever f is finite.
    sched, t = FlowSchedule(shift), torch.tensor([u], dtype=D)
    lo, hi = sigmoid(bias)(sched, t).item(), sigmoid(bias + step)(sched, t).item()
    assert math.isfinite(lo) and math.isfinite(hi) and hi > lo > 0


# --- normalisation: E_t f̃(t) = 1 under the training t-distribution ---------------------------

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "beta_end": 0.012}  # SD 1.5 / SD 2 / SDXL scheduler configs
FAMILIES = {
    "shapes-vp": lambda: ShapesVP.make_schedule(KIND_DEFAULTS["vp"]["schedule"]),
    "shapes-flow": lambda: ShapesFlow.make_schedule(KIND_DEFAULTS["flow"]["schedule"]),
    "sd-sdxl": lambda: vp_schedule(SD_SCHEDULER)[0],
    "sd2-v": lambda: vp_schedule({**SD_SCHEDULER, "prediction_type": "v_prediction"})[0],
    "sd3": lambda: flow_schedule(3.0)[0],  # SD3-M's scheduler config: shift 3
    "flux-1024": lambda: flow_schedule(math.exp(1.15))[0],  # FLUX.1 dynamic shift at 4096 tokens
    "vp-t-range": lambda: VPSchedule.from_alphas_cumprod(_sd_table(), t_min=0.2, t_max=0.6),
    "flow-t-range": lambda: FlowSchedule(3.0, t_min=0.05, t_max=0.9),
}
WEIGHTED = {"constant": constant(), "sigmoid-1.5": sigmoid(1.5), "sigmoid-0": sigmoid(0.0),
            "sigmoid-3": sigmoid(3.0)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", WEIGHTED)
def test_normalised_weight_has_mean_one_under_the_sampled_t(family, name):
    sched = FAMILIES[family]()
    f, mean = normalized(WEIGHTED[name], sched)
    t, p = sched.t_nodes()
    assert (p * f(sched, t).double()).sum().item() == pytest.approx(1.0, abs=1e-6)  # f in float32
    # under t drawn by the trainer's own sampler: the sample mean is 1 within 5 standard errors
    drawn = f(sched, sched.sample_t(200_000, generator=torch.Generator().manual_seed(0))).double()
    assert abs(drawn.mean().item() - 1) < 5 * drawn.std().item() / math.sqrt(drawn.numel()) + 1e-12
    assert mean == pytest.approx(mean_weight(WEIGHTED[name], sched))


def test_vp_mean_is_exact_over_every_timestep_hand_value():
    # ᾱ = (0.8, 0.5, 0.2, 0.1), T = 4, sampled t ∈ {0, 1/4, 1/2, 3/4} each with probability 1/4.
    # λ = (log 4, 0, −log 4, −log 9); λ' by torch.gradient with spacing 1/4:
    # (−4 log 4, −4 log 4, −2 log 9, −4 log(9/4)). b = 0: σ(−λ) = (1/5, 1/2, 4/5, 9/10).
    sched = VPSchedule.from_alphas_cumprod([0.8, 0.5, 0.2, 0.1])
    t, p = sched.t_nodes()
    assert t.tolist() == [0.0, 0.25, 0.5, 0.75] and p.tolist() == [0.25] * 4
    want = (4 * math.log(4) / 5 + 4 * math.log(4) / 2 + 2 * math.log(9) * 4 / 5
            + 4 * math.log(9 / 4) * 9 / 10) / 4
    assert mean_weight(sigmoid(0.0), sched) == pytest.approx(want, rel=1e-6)  # f in float32, as trained
    assert mean_weight(constant(), sched) == 1.0


@pytest.mark.parametrize("shift", [1.0, 3.0, math.exp(1.15)])
@pytest.mark.parametrize("bias", [0.0, 1.5, 3.0])
def test_flow_mean_matches_the_closed_form(shift, bias):
    # f du = −λ'_u σ(b − λ) du = −σ(b − λ) dλ and d/dλ softplus(b − λ) = −σ(b − λ), so
    # E_u f = [softplus(b − λ(t_max)) − softplus(b − λ(t_min))] / (t_max − t_min).
    sched = FlowSchedule(shift)
    lam = sched(torch.tensor([sched.t_min, sched.t_max], dtype=D))[2].tolist()
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    want = (softplus(bias - lam[1]) - softplus(bias - lam[0])) / (sched.t_max - sched.t_min)
    assert mean_weight(sigmoid(bias), sched) == pytest.approx(want, rel=1e-9)


def test_build_normalises_by_default_and_keeps_the_paper_form():
    sched = FlowSchedule(1.0)
    t = torch.tensor([0.25, 0.5], dtype=D)
    paper, mean = build("sigmoid", sched, False, bias=1.5)
    torch.testing.assert_close(paper(sched, t), sigmoid(1.5)(sched, t))
    norm, same = build("sigmoid", sched, True, bias=1.5)
    assert same == mean > 1 and mean == pytest.approx(15.34, abs=0.01)
    torch.testing.assert_close(norm(sched, t), sigmoid(1.5)(sched, t) / mean)
    ones, one = build("constant", sched, True)
    assert one == pytest.approx(1.0, abs=1e-12) and ones(sched, t).tolist() == pytest.approx([1.0, 1.0])
