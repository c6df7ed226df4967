"""FLUX.1 [dev] / [schnell]: transformer on packed 2×2 latent patches, rectified flow (docs/design.md §3).

Latents are kept unpacked, [B, C, H, W], everywhere outside ``denoise`` (the cache and the
trainer see the same layout as the other families); ``denoise`` packs them into
[B, (H/2)(W/2), 4C] tokens with their img_ids, and unpacks the velocity.

Time: the pipeline shifts sigmas by mu = calculate_shift(image tokens) when the scheduler uses
dynamic shifting (FLUX-dev): s' = e^mu s / (e^mu s + 1 − s), which is the static shift
s = k u / (1 + (k − 1) u) with k = e^mu. Training uses that k for the adapter's resolution
(``resolution`` option; default: the VAE's sample_size, 1024 px); without dynamic shifting
(schnell) k = the config's ``shift``. The transformer is called at timestep s (the pipeline
divides its timesteps t = 1000 s by 1000).

Guidance: FLUX-dev is guidance-distilled: the guidance scale is an input embedding (no
negative pass); ``denoise`` feeds ``train_guidance`` (default 3.5). Schnell has no guidance
embedding; its defaults are 4 steps, guidance 0. Dev defaults: 28 steps, guidance 3.5.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from capo.models.diffusers_common import DiffusersAdapter, LoadOptions, flow_schedule, load_adapter
from capo.models.sd3 import MMDIT_FF_TARGETS, MMDIT_LORA_TARGETS

#: feed-forward layers of the double-stream blocks and the single-stream MLP input
FLUX_FF_TARGETS = MMDIT_FF_TARGETS + ("proj_mlp",)
TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
#: the FLUX pipeline's default latent side before packing (pixels = 128 · VAE scale factor)
DEFAULT_SAMPLE_SIZE = 128


@dataclasses.dataclass
class FluxOptions(LoadOptions):
    """LoadOptions plus T5 length, LoRA and training-guidance choices."""

    max_sequence_length: int | None = None  # T5 tokens; None: 512 (dev) / 256 (schnell)
    lora_ff: bool = False  # also adapt the feed-forward layers
    train_guidance: float | None = None  # guidance embedding in ``denoise``; None: default_guidance


class FluxAdapter(DiffusersAdapter):
    """FLUX.1. Embeddings: {"encoder_hidden_states": [B, L_t5, D_t5] (T5), "pooled": [B, D_clip] (CLIP)}."""

    family = "flux"
    prediction_type = "flow"
    lora_targets = MMDIT_LORA_TARGETS
    default_steps = 28
    default_guidance = 3.5
    denoiser_name = "transformer"
    default_scheduler = "flow-euler"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.guidance_embeds = bool(self.denoiser.config.guidance_embeds)
        if not self.guidance_embeds:  # schnell
            self.default_steps, self.default_guidance = 4, 0.0
        self.max_sequence_length = self.opts.max_sequence_length or (512 if self.guidance_embeds else 256)
        self.train_guidance = self.opts.train_guidance
        if self.train_guidance is None:
            self.train_guidance = self.default_guidance
        self.schedule, self.prediction_type = flow_schedule(self.static_shift())
        if self.opts.lora_ff:
            self.lora_targets = MMDIT_LORA_TARGETS + FLUX_FF_TARGETS

    def default_resolution(self) -> int:
        """The VAE config's ``sample_size`` (1024 for FLUX.1), else the pipeline's 128 · scale factor."""
        return int(self.vae_config.get("sample_size") or DEFAULT_SAMPLE_SIZE * self.vae_scale_factor)

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) unpacked: C = in_channels / 4, H = W = 2 · ⌊resolution / (2 · scale factor)⌋."""
        side = 2 * (self.resolution // (2 * self.vae_scale_factor))
        return (int(self.denoiser.config.in_channels) // 4, side, side)

    def static_shift(self) -> float:
        """k = e^mu with mu = calculate_shift((H/2)(W/2)) under dynamic shifting, else config ``shift``."""
        cfg = self.scheduler_config
        if not cfg.get("use_dynamic_shifting", False):
            return float(cfg.get("shift", 1.0))
        _, h, w = self.latent_shape()
        mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                             cfg.get("max_shift", 1.15))
        return math.exp(mu)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(
            prompts, None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"encoder_hidden_states": prompt_embeds, "pooled": pooled}

    def _pipeline_embeds(self, emb: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"prompt_embeds": emb["encoder_hidden_states"], "pooled_prompt_embeds": emb["pooled"],
                "max_sequence_length": self.max_sequence_length}

    def _uses_cfg(self, guidance: float) -> bool:
        return False  # guidance-distilled: the scale is an input, no negative prompt

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/2)(W/2), 4C] (2×2 patches, the pipeline's _pack_latents)."""
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, (H/2)(W/2), 4C] -> [B, C, H, W] for latent size (h, w)."""
        f = self.vae_scale_factor
        return self.pipe._unpack_latents(tokens, h * f, w * f, f)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, emb: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity û ≈ ε − x [B, C, H, W] at s = sigma_of(t) (§2); transformer timestep s, packed."""
        emb = self._to_model(emb)
        b, _, h, w = x_t.shape
        s = self.schedule.sigma_of(t.to(self.device, torch.float32))
        guidance = torch.full((b,), self.train_guidance, device=self.device) if self.guidance_embeds else None
        text = emb["encoder_hidden_states"]
        out = self.denoiser(
            hidden_states=self.pack(x_t.to(self.device, self.dtype)),
            timestep=s.to(self.dtype),
            guidance=guidance,
            pooled_projections=emb["pooled"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=self.device, dtype=self.dtype),
            img_ids=self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.dtype),
        ).sample
        return self.unpack(out, h, w)

    def _run_pipeline(self, noise: torch.Tensor, emb: dict[str, torch.Tensor], steps: int,
                      guidance: float) -> torch.Tensor:
        """The FLUX pipeline from packed initial noise; final latents unpacked to [B, C, H, W]."""
        _, h, w = noise.shape[1:]
        packed = super()._run_pipeline(self.pack(noise), emb, steps, guidance)
        return self.unpack(packed, h, w)


def load_flux(path_or_id: str, **options: Any) -> FluxAdapter:
    """Load a FLUX.1 pipeline (hub id or local dir); options: see ``FluxOptions``."""
    opts = FluxOptions.parse("flux", options)
    return load_adapter(FluxAdapter, FluxPipeline, FluxTransformer2DModel, TEXT_PARTS, path_or_id, opts)
