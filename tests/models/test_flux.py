"""FLUX.1 adapter (dev and schnell variants) on tiny random-weight pipelines saved to disk: what is
its own (the contract every family keeps is in test_family_contract.py)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from capo.models.base import load_model
from capo.schedules import add_noise

L_T5 = 32
OPTIONS = {"max_sequence_length": L_T5}  # default resolution 32 (tiny VAE): 16×16 latents


@pytest.fixture(scope="module")
def dev_path(tiny_path):
    return tiny_path("flux-dev")


@pytest.fixture(scope="module")
def dev(dev_path):
    return load_model("flux", str(dev_path), **OPTIONS)


def _inputs(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *adapter.latent_shape(), generator=g)
    t = torch.tensor([0.4, 0.6])
    return add_noise(x, torch.randn(x.shape, generator=g), t, adapter.schedule), t


def test_defaults_and_static_shift(dev):
    assert (dev.family, dev.default_steps, dev.default_guidance) == ("flux", 28, 3.5)
    assert dev.guidance_embeds and dev.train_guidance == 3.5 and dev.prediction_type == "flow"
    assert isinstance(dev.pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert dev.latent_shape() == (4, 16, 16)
    # 64 image tokens: mu = 0.5 + (1.15 − 0.5)/(4096 − 256) · (64 − 256), shift = e^mu
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (64 - 256)
    assert dev.schedule.shift == pytest.approx(math.exp(mu))


def test_default_resolution(dev):
    """The VAE config's sample_size (1024 for FLUX.1; 32 for the tiny VAE), else 128 · scale factor."""
    assert dev.default_resolution() == 32
    own = dev.vae_config
    try:
        dev.vae_config = {**own, "sample_size": None}
        assert dev.default_resolution() == 128 * 2
    finally:
        dev.vae_config = own


def test_pack_roundtrip(dev):
    x = torch.randn(2, 4, 16, 16)
    packed = dev.pack(x)
    assert packed.shape == (2, 64, 16)
    torch.testing.assert_close(dev.unpack(packed, 16, 16), x, rtol=0, atol=0)


def test_guidance_is_an_input_of_the_denoiser(dev, tiny_pipes):
    emb = dev.encode_prompts(tiny_pipes.PROMPTS)
    x_t, t = _inputs(dev)
    with torch.no_grad():
        out = dev.denoise(x_t, t, emb)
        dev.train_guidance = 7.0  # the guidance embedding is an input of the transformer
        assert not torch.allclose(dev.denoise(x_t, t, emb), out)
        dev.train_guidance = 3.5


def test_cached_sampling_needs_no_text_encoders(dev, dev_path, tiny_pipes):
    emb = dev.encode_prompts(tiny_pipes.PROMPTS)
    no_text = load_model("flux", str(dev_path), load_text_encoders=False, **OPTIONS)
    cached = no_text.sample(tiny_pipes.PROMPTS, [3, 4], steps=2, emb=emb)  # no negative pass needed
    torch.testing.assert_close(cached.latents, dev.sample(tiny_pipes.PROMPTS, [3, 4], steps=2).latents)


def test_schnell(tiny_pipes, tiny_path):
    adapter = load_model("flux", str(tiny_path("flux-schnell")), **OPTIONS)
    assert not adapter.guidance_embeds and adapter.schedule.shift == 1.0
    assert (adapter.default_steps, adapter.default_guidance, adapter.max_sequence_length) == (4, 0.0, L_T5)
    x_t, t = _inputs(adapter)
    emb = adapter.encode_prompts(tiny_pipes.PROMPTS)
    with torch.no_grad():
        assert adapter.denoise(x_t, t, emb).shape == x_t.shape
    assert adapter.sample(tiny_pipes.PROMPTS, [1, 2], steps=1).latents.shape == (2, 4, 16, 16)


def test_lora_ff_targets(dev_path):
    adapter = load_model("flux", str(dev_path), lora_ff=True, **OPTIONS)
    assert "proj_mlp" in adapter.lora_targets


def test_bf16_denoise_close_to_fp32(dev, dev_path, tiny_pipes):
    half = load_model("flux", str(dev_path), dtype="bfloat16", load_vae=False, **OPTIONS)
    emb = dev.encode_prompts(tiny_pipes.PROMPTS)
    x_t, t = _inputs(dev)
    with torch.no_grad():
        out = half.denoise(x_t, t, emb)  # fp32 inputs are cast to the model dtype
        assert out.dtype == torch.bfloat16
        full = dev.denoise(x_t, t, emb)
        # bf16 keeps ~3 significant digits, and the transformer casts the timestep s to bf16 before
        # scaling it by 1000 (s = 0.4 -> 398.4): a few percent, not a wrong model
        assert (out.float() - full).norm() < 0.1 * full.norm()
