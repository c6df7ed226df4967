"""One preference step (Eq. 4, 5, 8): batching, reference, hand-checked values at LoRA init."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig

from capo.losses import LOSSES, implicit_reward
from capo.pipeline.preference import REFERENCES, errors, preference_step
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


def make_batch(adapter, seed: int = 0) -> PairBatch:
    g = torch.Generator().manual_seed(seed)
    shape = (B, *adapter.latent_shape())
    emb = adapter.encode_prompts(["a red circle", "two blue squares", "a green triangle"])
    return PairBatch(
        x_pos=torch.rand(shape, generator=g) * 2 - 1, x_neg=torch.rand(shape, generator=g) * 2 - 1,
        eps_pos=torch.randn(shape, generator=g), eps_neg=torch.randn(shape, generator=g),
        t=adapter.schedule.sample_t(B, generator=g), delta_rca=torch.tensor([0.5, -0.25, 0.875]), emb=emb,
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
        t = batch.t[i : i + 1]
        emb = {k: v[i : i + 1] for k, v in batch.emb.items()}
        side = []
        for x, eps in ((batch.x_pos, batch.eps_pos), (batch.x_neg, batch.eps_neg)):
            x_t = add_noise(x[i : i + 1], eps[i : i + 1], t, adapter.schedule)
            with torch.no_grad():
                e_theta = errors(adapter, adapter.denoiser, x_t, t, eps[i : i + 1], emb)
                with ref.active() as r:
                    e_ref = errors(adapter, r, x_t, t, eps[i : i + 1], emb)
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
