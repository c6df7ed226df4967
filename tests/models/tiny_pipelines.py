"""Tiny random-weight diffusers pipelines of each real family, built from configs (no downloads).

Each ``build_*`` writes a complete pipeline with ``save_pretrained`` to a directory and returns
its path, so tests load it exactly like a hub checkpoint. Sizes: 32×32 pixels, VAE scale
factor 2 (16×16 latents), CLIP hidden size 32 (16 for SD3's two encoders, concatenated to 32),
T5 d_model 32. Tokenizers are character-level (CLIP BPE with no merges; T5 unigram).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from capo.models.diffusers_common import initial_noise
from capo.schedules import to_epsilon

CHARS = string.ascii_lowercase + string.digits
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 32  # pass as max_sequence_length to the SD3/FLUX factories


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    """eval mode, dropout probabilities zeroed (the project rule for models built from configs)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return module.eval()


def clip_tokenizer() -> CLIPTokenizer:
    """Character-level CLIP BPE tokenizer (no merges) over a-z, 0-9."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
    for c in CHARS:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> T5Tokenizer:
    """Character-level T5 unigram tokenizer over a-z, 0-9."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + c, -1.0) for c in CHARS] + [(c, -2.0) for c in CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def clip_text(hidden: int, projection: int | None = None, seed: int = 0) -> torch.nn.Module:
    """A 2-layer CLIP text encoder; with ``projection`` a CLIPTextModelWithProjection."""
    _seeded(seed)
    config = CLIPTextConfig(
        vocab_size=2 + 2 * len(CHARS), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, projection_dim=projection or hidden, hidden_act="gelu",
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return _frozen(model)


def t5_encoder(seed: int = 0) -> T5EncoderModel:
    _seeded(seed)
    config = T5Config(
        vocab_size=3 + 2 * len(CHARS), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    )
    return _frozen(T5EncoderModel(config))


def vae(latent_channels: int = 4, seed: int = 0, **kw) -> AutoencoderKL:
    """Two-block VAE (scale factor 2), 32×32 RGB <-> latent_channels × 16 × 16."""
    _seeded(seed)
    return _frozen(AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels, sample_size=32, **kw,
    ))


def _vp_scheduler_kwargs() -> dict:
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def build_sd(root: Path, prediction_type: str = "epsilon") -> Path:
    """SD 1.x/2.x-like pipeline (PNDM scheduler config as SD1.5 ships it)."""
    _seeded(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
    )
    scheduler = PNDMScheduler(**_vp_scheduler_kwargs(), skip_prk_steps=True, set_alpha_to_one=False,
                              prediction_type=prediction_type)
    scheduler.register_to_config(clip_sample=False)  # as in SD1.5's scheduler_config.json
    pipe = StableDiffusionPipeline(
        vae=vae(), text_encoder=clip_text(32), tokenizer=clip_tokenizer(), unet=_frozen(unet),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _save(pipe, root / f"sd-{prediction_type}")


def build_sdxl(root: Path) -> Path:
    """SDXL-like pipeline: two CLIP encoders (32 + 32 -> cross-attention 64), text_time embedding."""
    _seeded(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64, norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(**_vp_scheduler_kwargs(), timestep_spacing="leading")
    # keys SDXL's scheduler_config.json carries for other schedulers (DDIM reads them)
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae(force_upcast=True), text_encoder=clip_text(32, seed=1), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text(32, projection=32, seed=2), tokenizer_2=clip_tokenizer(),
        unet=_frozen(unet), scheduler=scheduler,
    )
    return _save(pipe, root / "sdxl")


def build_sd3(root: Path, with_t5: bool = True) -> Path:
    """SD3-like pipeline: MMDiT (patch 2), CLIP 16 + 16 (pooled 32), T5 32, shift 3."""
    _seeded(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=_frozen(transformer), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=clip_text(16, projection=16, seed=1), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text(16, projection=16, seed=2), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(seed=3) if with_t5 else None,
        tokenizer_3=t5_tokenizer() if with_t5 else None,
    )
    return _save(pipe, root / ("sd3" if with_t5 else "sd3-no-t5"))


def build_flux(root: Path, guidance_embeds: bool = True) -> Path:
    """FLUX.1-like pipeline: dev (guidance embedding, dynamic shift) or schnell (neither)."""
    _seeded(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    dynamic = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                   max_image_seq_len=4096, shift=3.0)
    scheduler = FlowMatchEulerDiscreteScheduler(**dynamic) if guidance_embeds else \
        FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = FluxPipeline(
        transformer=_frozen(transformer), scheduler=scheduler,
        vae=vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=clip_text(32, seed=1), tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(seed=2), tokenizer_2=t5_tokenizer(),
    )
    return _save(pipe, root / ("flux-dev" if guidance_embeds else "flux-schnell"))


def _save(pipe, path: Path) -> Path:
    pipe.save_pretrained(path, safe_serialization=True)
    return path


#: family -> builder(root) for tests that go over every family
BUILDERS: dict[str, Callable[[Path], Path]] = {
    "sd": build_sd,
    "sdxl": build_sdxl,
    "sd3": build_sd3,
    "flux": build_flux,
}


# -- checks shared by the family tests ---------------------------------------------------------
PROMPTS = ["a red circle", "two blue squares"]


def ddim_first_step(adapter, seeds: list[int], emb: dict) -> torch.Tensor:
    """One DDIM step from ``denoise`` + to_epsilon on initial_noise(seeds): timestep index 1
    (t = 1/1000; "leading" spacing, steps_offset 1), x̂0 = (x − σ ε̂)/α,
    x_prev = √ᾱ_0 x̂0 + √(1 − ᾱ_0) ε̂. [B, C, H, W]"""
    x = initial_noise(seeds, adapter.latent_shape())
    t = torch.full((len(seeds),), 1 / 1000)
    with torch.no_grad():
        eps_hat = to_epsilon(adapter.denoise(x, t, emb), x, t, adapter.prediction_type, adapter.schedule)
    alpha, sigma, _, _ = (v.view(-1, 1, 1, 1) for v in adapter.schedule(t))
    alpha0, sigma0, _, _ = (v.view(-1, 1, 1, 1) for v in adapter.schedule(torch.zeros(len(seeds))))
    return alpha0 * (x - sigma * eps_hat) / alpha + sigma0 * eps_hat


def flow_euler_steps(adapter, seeds: list[int], emb: dict) -> torch.Tensor:
    """Flow-Euler from ``denoise`` on initial_noise(seeds) over the pipeline scheduler's sigmas:
    x ← x + (s_next − s) û(x, u), u = s / (k − (k − 1) s) the inverse of the shift k. [B, C, H, W]"""
    sigmas = adapter.pipe.scheduler.sigmas.double()
    k = adapter.schedule.shift
    x = initial_noise(seeds, adapter.latent_shape())
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            u = (s / (k - (k - 1) * s)).float().expand(len(seeds))
            x = x + float(s_next - s) * adapter.denoise(x, u, emb)
    return x


def lora_roundtrip(adapter, x_t: torch.Tensor, t: torch.Tensor, emb: dict) -> None:
    """add_adapter -> one SGD step on a dummy loss: outputs move with adapters on, equal the
    original with adapters off (the trainer's reference), and move back when re-enabled."""
    from peft import LoraConfig

    net = adapter.denoiser
    with torch.no_grad():
        before = adapter.denoise(x_t, t, emb)
    matched = {name for name, _ in net.named_modules()
               if any(name == k or name.endswith("." + k) for k in adapter.lora_targets)}
    for target in adapter.lora_targets:  # every target names a module of this family
        assert any(name == target or name.endswith("." + target) for name in matched), target
    net.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(adapter.lora_targets)))
    trainable = [p for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in net.named_parameters() if p.requires_grad)
    with torch.no_grad():  # LoRA B starts at zero: the adapted model equals the base
        torch.testing.assert_close(adapter.denoise(x_t, t, emb), before)
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    adapter.denoise(x_t, t, emb).pow(2).mean().backward()
    optimizer.step()
    with torch.no_grad():
        after = adapter.denoise(x_t, t, emb)
        assert (after - before).abs().max() > 1e-4
        net.disable_adapters()
        torch.testing.assert_close(adapter.denoise(x_t, t, emb), before)
        net.enable_adapters()
        torch.testing.assert_close(adapter.denoise(x_t, t, emb), after)
