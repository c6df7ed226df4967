"""One preference step (Eq. 4, 5, 8): batching, reference, hand-checked values at LoRA init."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig

from capo.losses import LOSSES, TARGETS, capo_loss, implicit_reward
from capo.pipeline.preference import REFERENCES, errors, margin, preference_step
from capo.pipeline.trainset import PairBatch
from capo.schedules import add_noise
from capo.weighting import WEIGHTINGS

B = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def lora_adapter(kind: str = "vp"):
    from capo.models.shapes import build_shapes_model

    adapter = build_shapes_model(kind, size="tiny", device="cpu")
    adapter.denoiser.requires_grad_(False)
    torch.manual_seed(0)
    adapter.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                            target_modules=list(adapter.lora_targets)))
    return adapter


def make_batch(adapter, seed: int = 0, draws: int = 1) -> PairBatch:
    """B pairs with K = ``draws`` (t, noise) draws each: t [B, K], eps [B, K, C, H, W]."""
    g = torch.Generator().manual_seed(seed)
    shape, noise = (B, *adapter.latent_shape()), (B, draws, *adapter.latent_shape())
    emb = adapter.encode_prompts(["a red circle", "two blue squares", "a green triangle"])
    return PairBatch(
        x_pos=torch.rand(shape, generator=g) * 2 - 1, x_neg=torch.rand(shape, generator=g) * 2 - 1,
        eps_pos=torch.randn(noise, generator=g), eps_neg=torch.randn(noise, generator=g),
        t=adapter.schedule.sample_t(B * draws, generator=g).view(B, draws),
        delta_rca=torch.tensor([0.5, -0.25, 0.875]), emb=emb,
    )


def perturb_lora(adapter, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_zero_lora_b_gives_zero_margin_and_hand_checked_losses(kind):
    """peft init has B = 0: policy == reference, so e_θ == e_ref and Δ_θ == 0 exactly; then
    CaPO ℓ = ΔR_ca², IPO ℓ = 1, DPO ℓ = log 2 per pair (Eq. 5, 8)."""
    adapter = lora_adapter(kind)
    batch = make_batch(adapter)
    ref = REFERENCES[True](adapter.denoiser)
    weighting = WEIGHTINGS["sigmoid"](bias=1.5)
    expected = {"capo": torch.tensor([0.25, 0.0625, 0.765625]), "ipo": torch.ones(B),
                "dpo": torch.full((B,), math.log(2.0))}
    for objective, want in expected.items():
        loss, m = preference_step(adapter, adapter.denoiser, ref, batch, weighting, LOSSES[objective], 1000.0)
        assert loss.shape == (B,)
        torch.testing.assert_close(loss.detach(), want, rtol=0, atol=1e-6)
        assert m["delta_theta"].item() == 0.0 and m["implicit_acc"].item() == 0.0
        assert m["err_policy"].item() == m["err_ref"].item() > 0
        assert m["delta_rca"].item() == pytest.approx((0.5 - 0.25 + 0.875) / 3)
        assert m["loss"].item() == pytest.approx(want.mean().item(), abs=1e-6)


def test_one_policy_and_one_no_grad_reference_forward_of_2b():
    adapter = lora_adapter()
    batch = make_batch(adapter)
    calls = []
    hook = adapter.denoiser.register_forward_hook(
        lambda mod, args, out: calls.append((args[0].shape[0], torch.is_grad_enabled(),
                                             mod._hf_peft_config_loaded and not _adapters_on(mod))))
    ref = REFERENCES[True](adapter.denoiser)
    loss, _ = preference_step(adapter, adapter.denoiser, ref, batch, WEIGHTINGS["constant"](),
                              LOSSES["capo"], 10.0)
    hook.remove()
    assert calls == [(2 * B, True, False), (2 * B, False, True)]  # policy with grad, then reference
    assert _adapters_on(adapter.denoiser)  # re-enabled after the reference pass
    loss.mean().backward()
    grads = {n: p.grad for n, p in adapter.denoiser.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def _adapters_on(module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(not m.disable_adapters for m in module.modules() if isinstance(m, BaseTunerLayer))


def test_batched_step_equals_pairwise_formula():
    """Δ_θ from the [2B] batches equals f(t)·((e_ref − e_θ)(x+) − (e_ref − e_θ)(x−)) computed one
    pair and one side at a time; the sign follows which side the policy denoises better."""
    adapter = lora_adapter()
    perturb_lora(adapter)
    batch = make_batch(adapter, seed=3)
    ref = REFERENCES[True](adapter.denoiser)
    weighting = WEIGHTINGS["sigmoid"](bias=1.5)
    loss, m = preference_step(adapter, adapter.denoiser, ref, batch, weighting, LOSSES["capo"], 10.0)
    deltas = []
    for i in range(B):
        t = batch.t[i]  # [1]: the pair's one draw
        emb = {k: v[i : i + 1] for k, v in batch.emb.items()}
        side = []
        for x, eps in ((batch.x_pos, batch.eps_pos), (batch.x_neg, batch.eps_neg)):
            x_t = add_noise(x[i : i + 1], eps[i], t, adapter.schedule)
            with torch.no_grad():
                e_theta = errors(adapter, adapter.denoiser, x_t, t, eps[i], emb)
                with ref.active() as r:
                    e_ref = errors(adapter, r, x_t, t, eps[i], emb)
            side.append(implicit_reward(e_theta, e_ref, weighting(adapter.schedule, t)))
        deltas.append(side[0] - side[1])
    delta = torch.cat(deltas)
    assert delta.abs().min() > 0
    torch.testing.assert_close(m["delta_theta"], delta.mean(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss.detach(), (batch.delta_rca - 10.0 * delta) ** 2, rtol=1e-4, atol=1e-5)
    assert m["implicit_acc"].item() == pytest.approx((delta > 0).float().mean().item())


def test_full_finetuning_reference_is_a_frozen_copy():
    from capo.models.shapes import build_shapes_model

    adapter = build_shapes_model("vp", size="tiny", device="cpu")
    ref = REFERENCES[False](adapter.denoiser)
    batch = make_batch(adapter)
    weighting = WEIGHTINGS["constant"]()
    _, m0 = preference_step(adapter, adapter.denoiser, ref, batch, weighting, LOSSES["ipo"], 1.0)
    assert m0["delta_theta"].item() == 0.0
    with torch.no_grad():
        next(adapter.denoiser.parameters()).add_(0.1)
    _, m1 = preference_step(adapter, adapter.denoiser, ref, batch, weighting, LOSSES["ipo"], 1.0)
    assert m1["err_ref"].item() == m0["err_ref"].item()
    assert m1["err_policy"].item() != m0["err_policy"].item()
    assert not any(p.requires_grad for p in ref.denoiser.parameters())


def one_draw(batch: PairBatch, k: int) -> PairBatch:
    """The batch with only draw k of every pair (t [B, 1], eps [B, 1, C, H, W])."""
    return PairBatch(x_pos=batch.x_pos, x_neg=batch.x_neg, eps_pos=batch.eps_pos[:, k:k + 1],
                     eps_neg=batch.eps_neg[:, k:k + 1], t=batch.t[:, k:k + 1],
                     delta_rca=batch.delta_rca, emb=batch.emb)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_k_draw_margin_is_the_mean_of_single_draw_margins_and_the_loss_is_of_the_mean(kind):
    """Δ_θ(K draws) = (1/K) Σ_k Δ_θ(draw k); the CaPO loss is (ΔR − β Δ_θ(K))², which is below the
    mean of the per-draw losses by β² Var_k Δ_θ(draw k) (mean of squares − square of the mean)."""
    adapter = lora_adapter(kind)
    perturb_lora(adapter)
    batch, beta = make_batch(adapter, seed=5, draws=3), 300.0
    ref = REFERENCES[True](adapter.denoiser)
    weighting = WEIGHTINGS["sigmoid"](bias=1.5)
    with torch.no_grad():
        mean_k, _, _ = margin(adapter, adapter.denoiser, ref, batch, weighting)
        singles = torch.stack([margin(adapter, adapter.denoiser, ref, one_draw(batch, k), weighting)[0]
                               for k in range(3)], dim=1)  # [B, K]
    assert singles.std(dim=1).min() > 0  # the draws differ
    # equal up to float32 rounding (the [2BK] and [2B] forwards round differently)
    torch.testing.assert_close(mean_k, singles.mean(dim=1), rtol=1e-3, atol=1e-4 * singles.abs().max().item())
    loss, m = preference_step(adapter, adapter.denoiser, ref, batch, weighting, LOSSES["capo"], beta)
    torch.testing.assert_close(loss.detach(), capo_loss(singles.mean(dim=1), batch.delta_rca, beta),
                               rtol=1e-3, atol=1e-4)
    per_draw = capo_loss(singles, batch.delta_rca[:, None], beta).mean(dim=1)
    gap = beta**2 * singles.var(dim=1, unbiased=False)
    torch.testing.assert_close(per_draw - loss.detach(), gap, rtol=1e-3, atol=1e-4)
    assert (gap > 0).all()
    scaled = beta * mean_k
    assert m["beta_delta_theta"].item() == pytest.approx(scaled.mean().item(), rel=1e-4)
    assert m["beta_delta_theta_sq"].item() == pytest.approx(scaled.pow(2).mean().item(), rel=1e-4)


def test_k_draws_go_through_one_policy_and_one_reference_forward_of_2bk():
    adapter = lora_adapter()
    batch = make_batch(adapter, draws=2)
    sizes = []
    hook = adapter.denoiser.register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[0]))
    preference_step(adapter, adapter.denoiser, REFERENCES[True](adapter.denoiser), batch,
                    WEIGHTINGS["constant"](), LOSSES["capo"], 10.0)
    hook.remove()
    assert sizes == [2 * B * 2, 2 * B * 2]


def test_diagnostic_metrics_at_lora_init_hand_check():
    """Δ_θ = 0 at init: βΔ_θ = 0, so near_target counts the pairs with |target| < 0.1, and the loss
    equals loss_at_start: CaPO mean ΔR² = (0.05² + 0.25² + 0.875²)/3, IPO 1."""
    adapter = lora_adapter()
    batch = make_batch(adapter)
    batch.delta_rca = torch.tensor([0.05, -0.25, 0.875])
    ref = REFERENCES[True](adapter.denoiser)
    for objective, start, near in (("capo", (0.05**2 + 0.25**2 + 0.875**2) / 3, 1 / 3), ("ipo", 1.0, 0.0)):
        _, m = preference_step(adapter, adapter.denoiser, ref, batch, WEIGHTINGS["constant"](),
                               LOSSES[objective], 100.0, TARGETS[objective])
        assert m["beta_delta_theta"].item() == 0.0 and m["beta_delta_theta_sq"].item() == 0.0
        assert m["loss_at_start"].item() == pytest.approx(start, abs=1e-6) == m["loss"].item()
        assert m["near_target"].item() == pytest.approx(near)
