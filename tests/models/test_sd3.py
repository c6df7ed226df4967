"""SD3 / SD3.5 adapter on a tiny random-weight pipeline saved to disk: what is its own (the contract
every family keeps is in test_family_contract.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from capo.models.base import load_model
from capo.schedules import FlowSchedule

L_T5 = 32  # tiny T5 length used here (SD3's default is 256)


@pytest.fixture(scope="module")
def sd3_path(tiny_path):
    return tiny_path("sd3")


@pytest.fixture(scope="module")
def sd3(sd3_path):
    return load_model("sd3", str(sd3_path), max_sequence_length=L_T5)


def test_defaults_schedule_and_sampler(sd3):
    assert (sd3.family, sd3.default_steps, sd3.default_guidance) == ("sd3", 50, 5.0)
    assert sd3.prediction_type == "flow"
    assert isinstance(sd3.schedule, FlowSchedule) and sd3.schedule.shift == 3.0
    sampler = sd3.pipe.scheduler  # flow DPM-Solver++ with the model's shift
    assert isinstance(sampler, DPMSolverMultistepScheduler)
    assert sampler.config.use_flow_sigmas and sampler.config.flow_shift == 3.0
    assert sampler.config.prediction_type == "flow_prediction"
    assert sd3.latent_shape() == (4, 16, 16)


def test_t5_optional(sd3, sd3_path, tiny_pipes):
    """Without T5 the T5 rows are zeros; the CLIP rows and pooled embeddings are unchanged."""
    emb = sd3.encode_prompts(tiny_pipes.PROMPTS)
    no_t5 = load_model("sd3", str(sd3_path), load_t5=False, load_vae=False, max_sequence_length=L_T5)
    assert no_t5.pipe.text_encoder_3 is None
    emb_no_t5 = no_t5.encode_prompts(tiny_pipes.PROMPTS)
    hidden = emb_no_t5["encoder_hidden_states"]
    assert hidden.shape == emb["encoder_hidden_states"].shape
    torch.testing.assert_close(hidden[:, :77], emb["encoder_hidden_states"][:, :77])
    assert not hidden[:, 77:].any() and emb["encoder_hidden_states"][:, 77:].abs().sum() > 0
    torch.testing.assert_close(emb_no_t5["pooled"], emb["pooled"])


def test_denoiser_only_load_drops_all_three_text_encoders(sd3_path):
    bare = load_model("sd3", str(sd3_path), load_text_encoders=False, load_vae=False)
    assert bare.pipe.text_encoder is None and bare.pipe.text_encoder_2 is None
    assert bare.pipe.text_encoder_3 is None


def test_lora_ff_targets(sd3_path):
    adapter = load_model("sd3", str(sd3_path), max_sequence_length=L_T5, lora_ff=True)
    assert "ff.net.2" in adapter.lora_targets and "add_q_proj" in adapter.lora_targets
