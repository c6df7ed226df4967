"""Loss weighting f(t) = −λ'_t · w(λ_t) of the implicit reward (paper Sec. 4.4, docs/design.md §2.3).

Each factory returns ``f(schedule, t) -> Tensor[B]`` for t of shape [B]. t is kept inside the
schedule's [t_min, t_max], where λ_t and λ'_t are finite, so f is always finite.

``normalized`` divides f by its mean E_t f(t) under the schedule's training t-distribution, so
that E_t f̃(t) = 1 and β means the same for every weighting and every family (docs/objectives.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from capo.schedules import Schedule

Weighting = Callable[[Schedule, Tensor], Tensor]


def _inside(schedule: Schedule, t: Tensor) -> Tensor:
    """t clamped to [t_min, t_max], the range on which the schedule's λ, λ' are finite."""
    return t.clamp(schedule.t_min, schedule.t_max)


def constant() -> Weighting:
    """f(t) = −w_t λ'_t = 1: the paper's constant-weighting ablation (Table 5); [B] -> [B]."""

    def f(schedule: Schedule, t: Tensor) -> Tensor:
        return torch.ones_like(t, dtype=torch.promote_types(t.dtype, torch.float32))

    return f


def sigmoid(bias: float = 1.5) -> Weighting:
    """f(t) = −λ'_t · σ(−λ_t + b) (Sec. 4.4; b = 1.5 is best for SDXL, Table 5); [B] -> [B]."""

    def f(schedule: Schedule, t: Tensor) -> Tensor:
        noise = schedule(_inside(schedule, t))
        return -noise.dlam * torch.sigmoid(-noise.lam + bias)

    return f


WEIGHTINGS: dict[str, Callable[..., Weighting]] = {
    "constant": constant,
    "sigmoid": sigmoid,
}


def mean_weight(weighting: Weighting, schedule: Schedule) -> float:
    """E_t f(t) = Σ_j p_j f(t_j) over the schedule's training t-distribution (``t_nodes``: exact
    for the discrete VP timesteps, Gauss–Legendre quadrature for flow's uniform u); a float."""
    t, p = schedule.t_nodes()
    return float((p * weighting(schedule, t).double()).sum())


def normalized(weighting: Weighting, schedule: Schedule) -> tuple[Weighting, float]:
    """(f̃, E_t f) with f̃(t) = f(t) / E_t f(t), so E_t f̃(t) = 1 under ``schedule``'s training
    t-distribution. E_t f is computed once, here; f̃ is meant for this schedule only; [B] -> [B]."""
    mean = mean_weight(weighting, schedule)

    def f(sched: Schedule, t: Tensor) -> Tensor:
        return weighting(sched, t) / mean

    return f, mean


def build(name: str, schedule: Schedule, normalize: bool, **kwargs: float) -> tuple[Weighting, float]:
    """The weighting ``WEIGHTINGS[name](**kwargs)`` for ``schedule``, divided by its mean if
    ``normalize`` (else the paper's f), and its mean E_t f under the schedule (before division)."""
    f = WEIGHTINGS[name](**kwargs)
    return normalized(f, schedule) if normalize else (f, mean_weight(f, schedule))
