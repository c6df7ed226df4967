"""Stable Diffusion 1.x / 2.x: UNet, ε- or v-prediction, discrete VP schedule (docs/design.md §3).

Defaults follow the paper's sampling settings for UNet models: DDIM, 50 steps, guidance 7.5.
The prediction type (``epsilon`` for SD1.x / SD2-base, ``v_prediction`` for SD2-768) and the ᾱ
table come from the pipeline's scheduler config.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from capo.models.diffusers_common import DiffusersAdapter, LoadOptions, load_adapter, vp_schedule

#: attention projections of every UNet transformer block (self- and cross-attention)
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class VPUNetAdapter(DiffusersAdapter):
    """A UNet on the discrete VP schedule of its scheduler config (SD, SDXL); the paper's
    UNet sampling settings: DDIM, 50 steps, guidance 7.5."""

    lora_targets = UNET_LORA_TARGETS
    default_steps = 50
    default_guidance = 7.5
    denoiser_name = "unet"
    default_scheduler = "ddim"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.schedule, self.prediction_type = vp_schedule(self.scheduler_config)


class StableDiffusionAdapter(VPUNetAdapter):
    """SD 1.x/2.x. Embeddings: {"encoder_hidden_states": [B, 77, D]} (CLIP last hidden state)."""

    family = "sd"

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        prompt_embeds, _ = self.pipe.encode_prompt(
            prompts, self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": prompt_embeds}

    def _pipeline_embeds(self, emb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": emb["encoder_hidden_states"]}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, emb: dict[str, torch.Tensor]) -> torch.Tensor:
        """UNet output (ε̂ or v̂) [B, C, H, W] for x_t [B, C, H, W], t [B]; VP index round(t · T) (§2)."""
        emb = self._to_model(emb)
        timestep = self.schedule.timestep_index(t).to(self.device)
        return self.denoiser(
            x_t.to(self.device, self.dtype), timestep, encoder_hidden_states=emb["encoder_hidden_states"]
        ).sample


def load_sd(path_or_id: str, **options: Any) -> StableDiffusionAdapter:
    """Load an SD 1.x/2.x pipeline (hub id or local dir); options: see ``LoadOptions``."""
    return load_adapter(
        StableDiffusionAdapter, StableDiffusionPipeline, UNet2DConditionModel, ("text_encoder", "tokenizer"),
        path_or_id, LoadOptions.parse("sd", options),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
