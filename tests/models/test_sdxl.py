"""SDXL adapter on a tiny random-weight pipeline saved to disk: what is its own (the contract every
family keeps is in test_family_contract.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from capo.models.base import load_model


@pytest.fixture(scope="module")
def sdxl_path(tiny_path):
    return tiny_path("sdxl")


@pytest.fixture(scope="module")
def sdxl(sdxl_path):
    return load_model("sdxl", str(sdxl_path))


def test_defaults(sdxl):
    assert (sdxl.family, sdxl.default_steps, sdxl.default_guidance) == ("sdxl", 50, 7.5)
    assert sdxl.prediction_type == "epsilon" and isinstance(sdxl.pipe.scheduler, DDIMScheduler)
    assert sdxl.latent_shape() == (4, 16, 16)


def test_time_ids(sdxl):
    # (original size, crop top-left, target size) of a 16×16 latent at scale factor 2
    expected_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2)
    torch.testing.assert_close(sdxl.add_time_ids(32, 32, 32, 2), expected_ids)


def test_denoiser_only_load_drops_both_text_encoders(sdxl_path):
    bare = load_model("sdxl", str(sdxl_path), load_text_encoders=False, load_vae=False)
    assert bare.pipe.text_encoder is None and bare.pipe.text_encoder_2 is None


def test_cached_embeddings_sample_without_text_encoders(sdxl, sdxl_path, tiny_pipes):
    """SDXL guides with zero negatives (force_zeros_for_empty_prompt): CFG needs no text encoder."""
    emb = sdxl.encode_prompts(tiny_pipes.PROMPTS)
    no_text = load_model("sdxl", str(sdxl_path), load_text_encoders=False)
    full = sdxl.sample(tiny_pipes.PROMPTS, [7, 8], steps=2, guidance=7.5, emb=emb)
    cached = no_text.sample(tiny_pipes.PROMPTS, [7, 8], steps=2, guidance=7.5, emb=emb)
    torch.testing.assert_close(cached.latents, full.latents, rtol=1e-5, atol=1e-5)


def test_half_precision_keeps_an_upcast_vae_in_fp32(sdxl, sdxl_path, tiny_pipes):
    """dtype="fp16": UNet and text encoders in fp16; the VAE (force_upcast) stays fp32."""
    half = load_model("sdxl", str(sdxl_path), dtype="fp16")
    assert half.denoiser.dtype == torch.float16 and half.pipe.text_encoder_2.dtype == torch.float16
    assert half.pipe.vae.dtype == torch.float32
    out = half.sample(tiny_pipes.PROMPTS, [9, 10], steps=2)
    assert out.latents.dtype == torch.float16 and len(out.images) == 2
    full = sdxl.sample(tiny_pipes.PROMPTS, [9, 10], steps=2).latents
    torch.testing.assert_close(out.latents.float(), full, rtol=0.05, atol=0.05)
