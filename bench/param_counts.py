"""Parameter counts and weight / optimizer-state bytes of the real model families, from configs.

Every model is built on the meta device (no weights, no memory, nothing downloaded) from its
published ``config.json``, transcribed below from memory of the hub repositories (the hub is not
reachable where this was written): a wrong transcription shows as a count that differs from the
model card's. The byte figures follow from the counts and from what ``capo train`` keeps per
parameter (docs/scaling.md derives each row); activations are NOT included and were not measured.

    python bench/param_counts.py                  # LoRA rank 8, 8 GPUs, 100K prompts x 16 samples
    python bench/param_counts.py --rank 64 --gpus 4 --prompts 58000
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from torch import nn

GIB = 2**30

# --- published configs (diffusers / transformers config.json) --------------------------------
SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SD3M_TRANSFORMER = {  # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}
FLUX_TRANSFORMER = {  # black-forest-labs/FLUX.1-dev, transformer/config.json (schnell: no guidance_embeds)
    "attention_head_dim": 128,
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
    "axes_dims_rope": [16, 56, 56],
}
CLIP_L_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_BIGG_TEXT = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
T5_XXL = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
}
CLIP_H14 = {  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore's and MPS's architecture)
    "text_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
    },
    "vision_config": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 16,
        "num_hidden_layers": 32,
        "image_size": 224,
        "patch_size": 14,
    },
    "projection_dim": 1024,
}
CLIP_L14_VISION = {  # openai/clip-vit-large-patch14, vision tower (laion-aesthetic's encoder)
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 768,
}
LLAVA_15_7B = {  # llava-hf/llava-1.5-7b-hf (VQAScore's default in capo)
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
    },
    "text_config": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "vocab_size": 32064,
    },
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
}
VAE_4CH = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
VAE_16CH = {**VAE_4CH, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}


# --- builders (meta device) --------------------------------------------------------------------
def _unet(cfg: dict) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**cfg)


def _sd3(cfg: dict) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**cfg)


def _flux(cfg: dict) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**cfg)


def _vae(cfg: dict) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**cfg)


def _clip_text(cfg: dict) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**cfg))


def _clip_text_proj(cfg: dict) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(**cfg))


def _t5(cfg: dict) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**cfg))


def _clip(cfg: dict) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(**cfg))


def _clip_vision_proj(cfg: dict) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg))


def _llava(cfg: dict) -> nn.Module:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration(LlavaConfig(**cfg))


def lora_targets() -> dict[str, Sequence[str]]:
    """capo's LoRA target modules per denoiser (the adapters' ``lora_targets``)."""
    from capo.models.flux import FLUX_FF_TARGETS
    from capo.models.sd import UNET_LORA_TARGETS
    from capo.models.sd3 import MMDIT_FF_TARGETS, MMDIT_LORA_TARGETS

    return {
        "sdxl": UNET_LORA_TARGETS,
        "sd3": MMDIT_LORA_TARGETS,
        "sd3+ff": MMDIT_LORA_TARGETS + MMDIT_FF_TARGETS,
        "flux": MMDIT_LORA_TARGETS,
        "flux+ff": MMDIT_LORA_TARGETS + FLUX_FF_TARGETS,
    }


#: denoiser label -> (builder, config, LoRA target sets)
DENOISERS: dict[str, tuple[Callable[[dict], nn.Module], dict, tuple[str, ...]]] = {
    "SDXL UNet": (_unet, SDXL_UNET, ("sdxl",)),
    "SD3-medium MMDiT": (_sd3, SD3M_TRANSFORMER, ("sd3", "sd3+ff")),
    "FLUX.1-dev transformer": (_flux, FLUX_TRANSFORMER, ("flux", "flux+ff")),
    "FLUX.1-schnell transformer": (
        _flux,
        {**FLUX_TRANSFORMER, "guidance_embeds": False},
        ("flux", "flux+ff"),
    ),
}
#: the other components generate loads: label -> (builder, config)
COMPONENTS: dict[str, tuple[Callable[[dict], nn.Module], dict]] = {
    "CLIP ViT-L/14 text (SDXL text_encoder)": (_clip_text, CLIP_L_TEXT),
    "CLIP ViT-L/14 text + projection (SD3 text_encoder)": (_clip_text_proj, CLIP_L_TEXT),
    "OpenCLIP bigG text + projection (SDXL/SD3 text_encoder_2)": (_clip_text_proj, CLIP_BIGG_TEXT),
    "T5-XXL encoder (SD3 text_encoder_3, FLUX text_encoder_2)": (_t5, T5_XXL),
    "VAE, 4 latent channels (SDXL)": (_vae, VAE_4CH),
    "VAE, 16 latent channels (SD3, FLUX)": (_vae, VAE_16CH),
}
#: reward models loaded by score / evaluate: label -> (builder, config)
REWARD_MODELS: dict[str, tuple[Callable[[dict], nn.Module], dict]] = {
    "CLIP ViT-H/14 (pickscore; mps without its cross model)": (_clip, CLIP_H14),
    "CLIP ViT-L/14 vision + projection (laion-aesthetic, without its head)": (
        _clip_vision_proj,
        CLIP_L14_VISION,
    ),
    "LLaVA-1.5-7B (vqascore)": (_llava, LLAVA_15_7B),
}


def build(builder: Callable[[dict], nn.Module], cfg: dict) -> nn.Module:
    with torch.device("meta"):
        return builder(dict(cfg))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matches(name: str, targets: Sequence[str]) -> bool:
    """peft's ``target_modules`` rule for a list: the module name equals a target or ends in ``.target``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_params(module: nn.Module, targets: Sequence[str], rank: int) -> int:
    """Trainable LoRA parameters: r · (in + out) per adapted Linear (A: r × in, B: out × r, no bias)."""
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and matches(name, targets)
    )


def peft_lora_params(module: nn.Module, targets: Sequence[str], rank: int) -> int:
    """The same count from peft itself (``add_adapter`` on a fresh meta model): a check of the formula."""
    from peft import LoraConfig

    module.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    return sum(p.numel() for name, p in module.named_parameters() if "lora_" in name)


def cache_shapes() -> dict[str, tuple[tuple[int, ...], list[tuple[int, ...]]]]:
    """family -> (latent shape [C, H, W] of one sample at 1024 px, embedding tensor shapes of one prompt)
    as generate caches them (docs/models.md: SD3 T5 256 tokens; FLUX-dev 512, schnell 256)."""
    side = SDXL_UNET["sample_size"]  # 128 latent pixels = 1024 / VAE scale factor 8 (all three)
    clip_l, big_g, t5 = CLIP_L_TEXT["hidden_size"], CLIP_BIGG_TEXT["hidden_size"], T5_XXL["d_model"]
    ctx = CLIP_L_TEXT["max_position_embeddings"]
    return {
        "sdxl": ((SDXL_UNET["in_channels"], side, side), [(ctx, clip_l + big_g), (big_g,)]),
        "sd3": ((SD3M_TRANSFORMER["in_channels"], side, side), [(ctx + 256, t5), (clip_l + big_g,)]),
        "flux-dev": ((16, side, side), [(512, t5), (clip_l,)]),
        "flux-schnell": ((16, side, side), [(256, t5), (clip_l,)]),
    }


def numel(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def bytes_per_gpu(p: int, lora: int, gpus: int) -> dict[str, float]:
    """Weights + gradients + AdamW state per GPU in bytes for each training setup (docs/scaling.md).

    p: denoiser parameters; lora: LoRA parameters; gpus: data-parallel processes n.
    """
    return {
        "LoRA, base bf16 (mixed_precision bf16)": 2 * p + 16 * lora,
        "LoRA, base fp32 (mixed_precision no)": 4 * p + 16 * lora,
        "full, DDP (fp32 policy+grads+Adam, fp32 reference, DDP buckets)": 24 * p,
        f"full, FSDP full shard, n={gpus} (+ unsharded fp32 reference)": 16 * p / gpus + 4 * p,
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    ap.add_argument("--gpus", type=int, default=8, help="data-parallel processes n for FSDP")
    ap.add_argument("--prompts", type=int, default=100_000, help="prompts P for the cache sizes")
    ap.add_argument("--samples", type=int, default=16, help="samples N per prompt for the cache sizes")
    ap.add_argument("--no-peft-check", action="store_true", help="skip the peft cross-check of LoRA counts")
    args = ap.parse_args(argv)
    targets = lora_targets()
    print(f"## Denoisers (LoRA rank r = {args.rank})\n")
    print("| model | parameters | fp32 GiB | bf16 GiB | LoRA targets | LoRA parameters |")
    print("|---|---:|---:|---:|---|---:|")
    counts: dict[str, tuple[int, int]] = {}
    for label, (builder, cfg, sets) in DENOISERS.items():
        model = build(builder, cfg)
        p = n_params(model)
        for s in sets:
            lora = lora_params(model, targets[s], args.rank)
            if not args.no_peft_check:
                assert peft_lora_params(build(builder, cfg), targets[s], args.rank) == lora, (label, s)
            counts.setdefault(label, (p, lora))
            print(f"| {label} | {p:,} | {4 * p / GIB:.2f} | {2 * p / GIB:.2f} | {s} | {lora:,} |")
    print("\n## Other components: generate's text encoders and VAE; reward models\n")
    print("| component | parameters | fp32 GiB | bf16 GiB |")
    print("|---|---:|---:|---:|")
    for label, (builder, cfg) in {**COMPONENTS, **REWARD_MODELS}.items():
        p = n_params(build(builder, cfg))
        print(f"| {label} | {p:,} | {4 * p / GIB:.2f} | {2 * p / GIB:.2f} |")
    print(f"\n## Training: weights + gradients + AdamW per GPU, GiB (r = {args.rank}; no activations)\n")
    labels = list(counts)
    print("| setup | " + " | ".join(labels) + " |")
    print("|---|" + "---:|" * len(labels))
    rows = [bytes_per_gpu(*counts[label], args.gpus) for label in labels]
    for key in rows[0]:
        print(f"| {key} | " + " | ".join(f"{row[key] / GIB:.2f}" for row in rows) + " |")
    n_samples = args.prompts * args.samples
    print(f"\n## Generate cache in bf16 (2 bytes per element), {args.prompts:,} prompts x {args.samples}\n")
    print(
        "| family | latent per sample | bytes | all latents GiB | embeddings per prompt | bytes | all GiB |"
    )
    print("|---|---|---:|---:|---|---:|---:|")
    for family, (latent, embs) in cache_shapes().items():
        lat, emb = 2 * numel(latent), 2 * sum(numel(e) for e in embs)
        print(
            f"| {family} | {list(latent)} | {lat:,} | {lat * n_samples / GIB:.1f} | "
            f"{' + '.join(str(list(e)) for e in embs)} | {emb:,} | {emb * args.prompts / GIB:.1f} |"
        )


if __name__ == "__main__":
    main()
