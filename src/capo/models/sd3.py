"""SD3 / SD3.5: MMDiT transformer, rectified flow with timestep shift, three text encoders
(docs/design.md §3).

Time: u = t in (0, 1) maps to s = k u / (1 + (k − 1) u) with k = the scheduler config's ``shift``
(3.0 for SD3-M and SD3.5); the transformer is called at timestep s · 1000, as the pipeline does
(its scheduler's timesteps are sigmas · num_train_timesteps). Output: velocity û ≈ ε − x.

Sampling defaults are the paper's SD3-M settings: flow DPM-Solver++ (diffusers'
DPMSolverMultistepScheduler with ``use_flow_sigmas``, same shift), 50 steps, guidance 5.0.
T5 is optional: with ``load_t5=False`` (or a pipeline saved without it) the T5 part of
``encoder_hidden_states`` is zeros, as diffusers does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from capo.models.diffusers_common import DiffusersAdapter, LoadOptions, flow_schedule, load_adapter

#: joint-attention projections of the image and the text stream
MMDIT_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)
#: feed-forward layers of both streams (added with ``lora_ff=True``)
MMDIT_FF_TARGETS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

CLIP_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
T5_PARTS = ("text_encoder_3", "tokenizer_3")


@dataclasses.dataclass
class SD3Options(LoadOptions):
    """LoadOptions plus T5 and LoRA choices."""

    load_t5: bool = True  # False: skip T5-XXL (its embedding part becomes zeros)
    max_sequence_length: int = 256  # T5 tokens
    lora_ff: bool = False  # also adapt the feed-forward layers


class StableDiffusion3Adapter(DiffusersAdapter):
    """SD3. Embeddings: {"encoder_hidden_states": [B, 77 + L_t5, D_t5], "pooled": [B, P1 + P2]}."""

    family = "sd3"
    prediction_type = "flow"
    lora_targets = MMDIT_LORA_TARGETS
    default_steps = 50
    default_guidance = 5.0
    denoiser_name = "transformer"
    default_scheduler = "flow-dpm"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.schedule, self.prediction_type = flow_schedule(self.scheduler_config.get("shift", 1.0))
        if self.opts.lora_ff:
            self.lora_targets = MMDIT_LORA_TARGETS + MMDIT_FF_TARGETS

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, None, None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.opts.max_sequence_length,
        )
        return {"encoder_hidden_states": prompt_embeds, "pooled": pooled}

    def _pipeline_embeds(self, emb: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"prompt_embeds": emb["encoder_hidden_states"], "pooled_prompt_embeds": emb["pooled"],
                "max_sequence_length": self.opts.max_sequence_length}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, emb: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity û ≈ ε − x [B, C, H, W] at s = sigma_of(t) (§2); transformer timestep s · 1000."""
        emb = self._to_model(emb)
        s = self.schedule.sigma_of(t.to(self.device, torch.float32))
        return self.denoiser(
            hidden_states=x_t.to(self.device, self.dtype),
            timestep=s * self.scheduler_config.get("num_train_timesteps", 1000),
            encoder_hidden_states=emb["encoder_hidden_states"],
            pooled_projections=emb["pooled"],
        ).sample


def load_sd3(path_or_id: str, **options: Any) -> StableDiffusion3Adapter:
    """Load an SD3/SD3.5 pipeline (hub id or local dir); options: see ``SD3Options``."""
    opts = SD3Options.parse("sd3", options)
    skip_t5 = {name: None for name in T5_PARTS if not opts.load_t5 and opts.load_text_encoders}
    return load_adapter(StableDiffusion3Adapter, StableDiffusion3Pipeline, SD3Transformer2DModel,
                        CLIP_PARTS + T5_PARTS, path_or_id, opts, **skip_t5)
