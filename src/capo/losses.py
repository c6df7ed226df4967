"""Implicit reward and the preference objectives (paper Sec. 3, Eq. 4, 5, 8; docs/design.md §2.4, §2.5).

All losses are per pair, shape [B], never reduced: the trainer averages them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def implicit_reward(err_policy: Tensor, err_ref: Tensor, f_t: Tensor) -> Tensor:
    """R_θ(x, c, t, ε) = f(t) · (e_ref(x) − e_θ(x)) (Sec. 3 with Sec. 4.4 weighting); [B] -> [B].

    Positive when the policy denoises x better than the reference.
    """
    return f_t * (err_ref - err_policy)


def dpo_loss(delta_theta: Tensor, beta: float) -> Tensor:
    """ℓ = −log σ(β Δ_θ) (Eq. 5 with g(u) = −log σ(u)), Δ_θ = R_θ(x+) − R_θ(x−); [B] -> [B]."""
    return -F.logsigmoid(beta * delta_theta)


def ipo_loss(delta_theta: Tensor, beta: float) -> Tensor:
    """ℓ = (1 − β Δ_θ)² (Eq. 5 with g(u) = (1 − u)²); [B] -> [B]."""
    return (1 - beta * delta_theta) ** 2


def capo_loss(delta_theta: Tensor, delta_rca: Tensor, beta: float) -> Tensor:
    """ℓ = (ΔR_ca − β Δ_θ)² (Eq. 8), ΔR_ca = R_ca(x+) − R_ca(x−) ∈ (−1, 1); [B] -> [B]."""
    return (delta_rca - beta * delta_theta) ** 2


def _dpo(delta_theta: Tensor, delta_rca: Tensor, beta: float) -> Tensor:
    return dpo_loss(delta_theta, beta)  # the target ΔR_ca is unused


def _ipo(delta_theta: Tensor, delta_rca: Tensor, beta: float) -> Tensor:
    return ipo_loss(delta_theta, beta)  # the target is the constant 1


LOSSES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "dpo": _dpo,
    "ipo": _ipo,
    "capo": capo_loss,
}


def _calibrated(delta_rca: Tensor) -> Tensor:
    return delta_rca  # CaPO's fixed point βΔ_θ = ΔR_ca (Eq. 8); DPO has none: ΔR_ca, for reading


def _one(delta_rca: Tensor) -> Tensor:
    return torch.ones_like(delta_rca)  # IPO's fixed point βΔ_θ = 1


#: objective -> the value of βΔ_θ per pair [B] -> [B] that the diagnostics compare against
TARGETS: dict[str, Callable[[Tensor], Tensor]] = {
    "dpo": _calibrated,
    "ipo": _one,
    "capo": _calibrated,
}
