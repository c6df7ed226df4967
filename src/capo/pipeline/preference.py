"""One preference step (paper Eq. 4, 5, 8; docs/design.md §2.4, §2.5): pairs in, per-pair loss and
metrics out.

For B pairs (x+, x-) of one prompt each, K draws per pair of one t and noises eps+ and eps-:
x_t = α_t x + σ_t ε; ε̂ = to_epsilon(denoiser output); e = mean (ε̂ − ε)²;
R = f(t) (e_ref − e_θ); Δ_θ = mean over the K draws of R(x+) − R(x−);
ℓ = LOSSES[objective](Δ_θ, ΔR_ca, β) per pair.
Speed: x+ and x− (all draws) go through the policy as ONE [2BK] batch and through the reference
as ONE no-grad [2BK] batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch
from torch import Tensor, nn

from capo.losses import TARGETS, implicit_reward
from capo.models.base import DiffusionAdapter
from capo.pipeline.trainset import PairBatch
from capo.schedules import add_noise, per_sample_error, to_epsilon

LossFn = Callable[[Tensor, Tensor, float], Tensor]
Weighting = Callable[..., Tensor]
#: a pair counts as at its target when |βΔ_θ − target| < NEAR (diagnostics)
NEAR = 0.1


class Reference(Protocol):
    """The frozen reference model p_ref: ``active()`` yields the module that computes e_ref."""

    def active(self) -> AbstractContextManager[nn.Module]: ...


class LoraReference:
    """p_ref = the policy network with its LoRA adapters disabled (docs/design.md §2.4: no second copy)."""

    def __init__(self, denoiser: nn.Module):
        self.denoiser = denoiser  # the unwrapped module (not the DDP wrapper)

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        self.denoiser.disable_adapters()
        try:
            yield self.denoiser
        finally:
            self.denoiser.enable_adapters()


class FrozenReference:
    """p_ref = a frozen copy of the denoiser taken before training (full fine-tuning)."""

    def __init__(self, denoiser: nn.Module):
        self.denoiser = copy.deepcopy(denoiser).requires_grad_(False).eval()

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        yield self.denoiser


#: training mode -> reference factory (lora: adapters disabled; full: frozen copy)
REFERENCES: dict[bool, Callable[[nn.Module], Reference]] = {True: LoraReference, False: FrozenReference}


@contextmanager
def denoising_with(adapter: DiffusionAdapter, module: nn.Module) -> Iterator[DiffusionAdapter]:
    """``adapter`` with ``module`` as its denoiser for the duration (policy wrapper or reference)."""
    own = adapter.denoiser
    adapter.denoiser = module
    try:
        yield adapter
    finally:
        adapter.denoiser = own


def errors(adapter: DiffusionAdapter, module: nn.Module, x_t: Tensor, t: Tensor, eps: Tensor,
           emb: dict[str, Tensor]) -> Tensor:
    """e(x) = mean over elements of ‖ε̂ − ε‖² (docs/design.md §2.2) under ``module``;
    x_t, eps [N, ...] -> [N]."""
    with denoising_with(adapter, module):
        out = adapter.denoise(x_t, t, emb)
    eps_hat = to_epsilon(out.float(), x_t, t, adapter.prediction_type, adapter.schedule)
    return per_sample_error(eps_hat, eps)


def margin(adapter: DiffusionAdapter, policy: nn.Module, reference: Reference, batch: PairBatch,
           weighting: Weighting) -> tuple[Tensor, Tensor, Tensor]:
    """Δ_θ = (1/K) Σ_k [R_θ(x+, t_k, ε+_k) − R_θ(x−, t_k, ε−_k)], the K-draw estimate per pair [B]
    (with grad), and e_θ, e_ref [2BK] (rows [x+ draws ; x− draws], pair-major).

    Each draw k of a pair shares its t_k between x+ and x− (docs/design.md §2.5); K = 1 is Eq. 4's
    single-draw estimate, and the K-draw Δ_θ is exactly the mean of the K single-draw ones.
    """
    b, k = batch.t.shape
    x = torch.cat([batch.x_pos, batch.x_neg]).repeat_interleave(k, dim=0)       # [2BK, C, H, W]
    eps = torch.cat([batch.eps_pos.flatten(0, 1), batch.eps_neg.flatten(0, 1)])  # [2BK, C, H, W]
    t = batch.t.flatten().repeat(2)                                              # [2BK]
    emb = {n: v.repeat_interleave(k, dim=0).repeat(2, *[1] * (v.dim() - 1))     # [2BK, ...]
           for n, v in batch.emb.items()}
    x_t = add_noise(x, eps, t, adapter.schedule)                   # x_t = α_t x + σ_t ε
    e_theta = errors(adapter, policy, x_t, t, eps, emb)            # [2BK], with grad
    with torch.no_grad(), reference.active() as ref:
        e_ref = errors(adapter, ref, x_t, t, eps, emb)             # [2BK]
    reward = implicit_reward(e_theta, e_ref, weighting(adapter.schedule, t).to(e_theta.device))
    draws = reward[:b * k] - reward[b * k:]                        # R(x+) − R(x−) per draw, [BK]
    return draws.view(b, k).mean(dim=1), e_theta, e_ref            # Δ_θ, [B]


def preference_step(adapter: DiffusionAdapter, policy: nn.Module, reference: Reference,
                    batch: PairBatch, weighting: Weighting, loss_fn: LossFn, beta: float,
                    target: Callable[[Tensor], Tensor] = TARGETS["capo"]
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair loss [B] (Eq. 5 / 8) of the K-draw Δ_θ (``margin``), with gradients into
    ``policy``: the loss of the mean estimate, not the mean of per-draw losses.

    Metrics (scalars, means over the B pairs): loss, delta_theta, implicit_acc (Δ_θ > 0),
    err_policy, err_ref, delta_rca; beta_delta_theta and beta_delta_theta_sq (E[βΔ_θ], E[(βΔ_θ)²]);
    near_target (|βΔ_θ − target(ΔR_ca)| < 0.1); loss_at_start (the loss at Δ_θ = 0, the base model's:
    E[ΔR_ca²] for CaPO, 1 for IPO, log 2 for DPO).
    """
    delta_theta, e_theta, e_ref = margin(adapter, policy, reference, batch, weighting)
    loss = loss_fn(delta_theta, batch.delta_rca, beta)             # [B]
    scaled = beta * delta_theta.detach()                           # βΔ_θ, [B]
    metrics = {
        "loss": loss.detach().mean(),
        "delta_theta": delta_theta.detach().mean(),
        "implicit_acc": (delta_theta.detach() > 0).float().mean(),
        "err_policy": e_theta.detach().mean(),
        "err_ref": e_ref.mean(),
        "delta_rca": batch.delta_rca.mean(),
        "beta_delta_theta": scaled.mean(),
        "beta_delta_theta_sq": scaled.pow(2).mean(),
        "near_target": ((scaled - target(batch.delta_rca)).abs() < NEAR).float().mean(),
        "loss_at_start": loss_fn(torch.zeros_like(scaled), batch.delta_rca, beta).mean(),
    }
    return loss, metrics
