"""Stable Diffusion 1.x/2.x adapter on tiny random-weight pipelines saved to disk: what is its own
(the contract every family keeps is in test_family_contract.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from capo.errors import CapoError
from capo.models.base import load_model
from capo.schedules import VPSchedule


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def sd_path(request, tiny_path):
    return tiny_path(f"sd-{request.param}")


@pytest.fixture(scope="module")
def sd(sd_path):
    return load_model("sd", str(sd_path))


def test_defaults_and_schedule(sd, sd_path):
    assert (sd.family, sd.default_steps, sd.default_guidance) == ("sd", 50, 7.5)
    assert sd.prediction_type == sd_path.name.removeprefix("sd-")
    assert isinstance(sd.schedule, VPSchedule) and sd.schedule.num_train_timesteps == 1000
    assert isinstance(sd.pipe.scheduler, DDIMScheduler) and not sd.pipe.scheduler.config.clip_sample
    assert sd.latent_shape() == (4, 16, 16) and sd.resolution == 32
    # ᾱ of the scaled-linear schedule, index 0: 1 − β_0 with β_0 = 0.00085
    alpha, sigma, _, _ = sd.schedule(torch.tensor([0.0]))
    torch.testing.assert_close(alpha**2, torch.tensor([1 - 0.00085]))


def test_denoiser_only_cannot_guide_or_decode(sd, sd_path, tiny_pipes):
    """SD's classifier-free guidance encodes the empty prompt: it needs the text encoders."""
    emb = sd.encode_prompts(tiny_pipes.PROMPTS)
    bare = load_model("sd", str(sd_path), load_text_encoders=False, load_vae=False)
    assert bare.pipe.text_encoder is None
    with pytest.raises(CapoError, match="negative embeddings need the text encoders"):
        bare.sample(tiny_pipes.PROMPTS, [1, 2], steps=1, emb=emb)
    with pytest.raises(CapoError, match="VAE not loaded"):
        bare.sample(tiny_pipes.PROMPTS, [1, 2], steps=1, guidance=1.0, emb=emb)


def test_options(sd_path, tmp_path):
    adapter = load_model("sd", str(sd_path), load_text_encoders=False, load_vae=False, dtype="bf16",
                         scheduler="euler", enable_gradient_checkpointing=True)
    assert adapter.denoiser.dtype == torch.bfloat16 and adapter.denoiser.is_gradient_checkpointing
    assert isinstance(adapter.pipe.scheduler, EulerDiscreteScheduler)
    with pytest.raises(CapoError, match="unknown option"):
        load_model("sd", str(sd_path), colour="red")
    with pytest.raises(CapoError, match="unknown scheduler 'nope'"):
        load_model("sd", str(sd_path), scheduler="nope")
    with pytest.raises(CapoError, match="unknown dtype"):
        load_model("sd", str(sd_path), dtype="float8")
    with pytest.raises(CapoError, match="cannot load StableDiffusionPipeline"):
        load_model("sd", str(tmp_path))  # no unet/config.json there
