"""SDXL: UNet with two CLIP text encoders, pooled embeddings and added time ids; VP (docs/design.md §3).

The paper's SDXL settings are the shipped defaults: DDIM, 50 steps, guidance 7.5. The added
time ids are (original_size, crop top-left, target_size) = ((H, W), (0, 0), (H, W)) of the
latent's pixel resolution, as the pipeline uses them at generation time.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from capo.models.diffusers_common import LoadOptions, load_adapter
from capo.models.sd import VPUNetAdapter

TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class StableDiffusionXLAdapter(VPUNetAdapter):
    """SDXL. Embeddings: {"encoder_hidden_states": [B, 77, D1 + D2], "pooled": [B, P]}."""

    family = "sdxl"

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": prompt_embeds, "pooled": pooled}

    def _pipeline_embeds(self, emb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": emb["encoder_hidden_states"], "pooled_prompt_embeds": emb["pooled"]}

    @property
    def negatives_need_text_encoders(self) -> bool:
        """SDXL base (force_zeros_for_empty_prompt) guides with zero negative embeddings."""
        return not self.pipe.config.get("force_zeros_for_empty_prompt", False)

    def add_time_ids(self, height: int, width: int, pooled_dim: int, batch: int) -> torch.Tensor:
        """[B, 6] = (H, W, 0, 0, H, W) in pixels: original size, crop top-left, target size."""
        ids = self.pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=self.dtype, text_encoder_projection_dim=pooled_dim
        )
        return ids.to(self.device).repeat(batch, 1)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, emb: dict[str, torch.Tensor]) -> torch.Tensor:
        """UNet output [B, C, H, W] at VP index round(t · T) (§2); text, pooled text and time ids."""
        emb = self._to_model(emb)
        batch, _, h, w = x_t.shape
        f = self.vae_scale_factor
        time_ids = self.add_time_ids(h * f, w * f, emb["pooled"].shape[-1], batch)
        return self.denoiser(
            x_t.to(self.device, self.dtype),
            self.schedule.timestep_index(t).to(self.device),
            encoder_hidden_states=emb["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": emb["pooled"], "time_ids": time_ids},
        ).sample

    def _unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """z · std / scaling_factor + mean with the VAE's latents_mean/std, else z / scaling_factor."""
        mean, std = self.vae_config.get("latents_mean"), self.vae_config.get("latents_std")
        if mean is None or std is None:
            return super()._unscale(latents)
        shape = (1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(shape)
        std_t = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(shape)
        return latents * std_t / self.vae_config["scaling_factor"] + mean_t


def load_sdxl(path_or_id: str, **options: Any) -> StableDiffusionXLAdapter:
    """Load an SDXL pipeline (hub id or local dir); options: see ``LoadOptions``."""
    return load_adapter(StableDiffusionXLAdapter, StableDiffusionXLPipeline, UNet2DConditionModel, TEXT_PARTS,
                        path_or_id, LoadOptions.parse("sdxl", options))
