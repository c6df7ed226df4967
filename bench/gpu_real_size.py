"""Benchmark on a GPU: SDXL / SD3-medium at their published sizes (random weights), at 1024².

    python bench/gpu_real_size.py --family sdxl --out sdxl.json      # needs a CUDA GPU (~80 GB)
    python bench/gpu_real_size.py --family sd3 --out sd3.json
    python bench/gpu_real_size.py --family sdxl --tiny               # the same code on a CPU, tiny sizes

Builds the whole pipeline (denoiser, text encoders incl. T5-XXL for SD3, VAE) from the published
configs transcribed in ``bench/param_counts.py``, with random weights in bf16, saves it with
``save_pretrained`` and then goes through capo's own code paths only:

1. generate: ``load_model`` (bf16) and ``adapter.sample`` at the family defaults (SDXL: DDIM 50
   steps, CFG 7.5; SD3: flow DPM-Solver++ 50 steps, CFG 5.0) with VAE decoding to PIL, from the
   prompts (text encoders run) and from cached embeddings (text encoders skipped): images/s;
2. the cost a trainer WITHOUT the latent/embedding cache would add per step: the text encoders on
   B prompts plus the VAE encoder on 2B images at 1024², timed here with the pipeline loaded;
3. train: ``capo.pipeline.train.setup`` + ``optimizer_step`` (the recipe ``capo train`` runs) on a
   synthetic run directory (random latents, real cached embeddings) for LoRA and full fine-tuning,
   mixed precision bf16: pairs/s and peak GPU memory (``torch.cuda.max_memory_allocated``).

Prints a Markdown table and writes every figure to ``--out`` (JSON). Random weights give the same
FLOPs and memory as trained ones; image content is meaningless.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_step import synthetic_run  # noqa: E402
from param_counts import CLIP_BIGG_TEXT, CLIP_L_TEXT, SD3M_TRANSFORMER, SDXL_UNET, T5_XXL, VAE_4CH  # noqa: E402

TINY_PIPELINES = Path(__file__).resolve().parents[1] / "tests" / "models" / "tiny_pipelines.py"
#: published VAE scaling (sdxl-vae / sd3 vae config.json)
SDXL_VAE = {**VAE_4CH, "scaling_factor": 0.13025, "force_upcast": True, "sample_size": 1024}
SD3_VAE = {
    **VAE_4CH,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "sample_size": 1024,
}
#: --tiny: the same architectures shrunk to run the whole script on a CPU in seconds (per family)
_TINY_CLIP = {"intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
_TINY_VAE = {
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
}
TINY = {
    "sdxl": {
        "unet": {
            "block_out_channels": [32, 64, 64],
            "attention_head_dim": [2, 4, 4],
            "cross_attention_dim": 64,
            "transformer_layers_per_block": [1, 1, 1],
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "sample_size": 16,
            "norm_num_groups": 8,
        },
        "clip_l": {**_TINY_CLIP, "hidden_size": 32, "projection_dim": 32},
        "clip_g": {**_TINY_CLIP, "hidden_size": 32, "projection_dim": 32},
        "vae": _TINY_VAE,
    },
    "sd3": {
        "sd3": {
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "in_channels": 16,
            "out_channels": 16,
            "caption_projection_dim": 32,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "sample_size": 16,
            "pos_embed_max_size": 16,
        },
        "clip_l": {**_TINY_CLIP, "hidden_size": 16, "projection_dim": 16},
        "clip_g": {**_TINY_CLIP, "hidden_size": 16, "projection_dim": 16},
        "t5": {"d_model": 32, "d_ff": 37, "d_kv": 8, "num_heads": 4, "num_layers": 2},
        "vae": _TINY_VAE,
    },
}


@functools.cache
def _tiny_pipelines() -> Any:
    """tests/models/tiny_pipelines.py: its character-level tokenizers (no vocabulary download; token
    ids stay below 80, inside every real vocabulary) and its ``_frozen`` (eval, dropout zeroed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_pipelines", TINY_PIPELINES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tokenizers() -> tuple[Any, Any]:
    """CLIP (BPE, no merges) and T5 (unigram) tokenizers with the real sequence lengths."""
    return _tiny_pipelines().clip_tokenizer(), _tiny_pipelines().t5_tokenizer()


def _clip(cfg: dict, projection: bool, tiny: dict | None) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}  # the tokenizer's special tokens
    config = CLIPTextConfig(**{**cfg, **(tiny or {}), **ids})
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tiny: dict | None) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(**{**T5_XXL, **(tiny or {}), "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1})
    )


def _vae(cfg: dict, tiny: dict | None) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**cfg, **(tiny or {})})


def build_sdxl(tiny: bool) -> Any:
    """StableDiffusionXLPipeline from the published UNet / CLIP-L / bigG / VAE configs (random weights)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    t = TINY["sdxl"] if tiny else {}
    tok, _ = _tokenizers()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
    return StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**{**SDXL_UNET, **t.get("unet", {})}),
        scheduler=scheduler,
        vae=_vae(SDXL_VAE, t.get("vae")),
        tokenizer=tok,
        tokenizer_2=tok,
        text_encoder=_clip(CLIP_L_TEXT, False, t.get("clip_l")),
        text_encoder_2=_clip(CLIP_BIGG_TEXT, True, t.get("clip_g")),
    )


def build_sd3(tiny: bool) -> Any:
    """StableDiffusion3Pipeline from the published MMDiT / CLIP-L / bigG / T5-XXL / VAE configs."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    t = TINY["sd3"] if tiny else {}
    tok, t5_tok = _tokenizers()
    mmdit = {**SD3M_TRANSFORMER, **t.get("sd3", {})}
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**mmdit),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(SD3_VAE, t.get("vae")),
        tokenizer=tok,
        tokenizer_2=tok,
        tokenizer_3=t5_tok,
        text_encoder=_clip(CLIP_L_TEXT, True, t.get("clip_l")),
        text_encoder_2=_clip(CLIP_BIGG_TEXT, True, t.get("clip_g")),
        text_encoder_3=_t5(t.get("t5")),
    )


#: --family -> pipeline builder(tiny)
BUILDERS: dict[str, Callable[[bool], Any]] = {"sdxl": build_sdxl, "sd3": build_sd3}


def save_random_pipeline(family: str, tiny: bool, root: Path, device: torch.device) -> Path:
    """Build on ``device`` (fast random init), cast to bf16, save as safetensors; returns the path."""
    torch.manual_seed(0)
    with torch.device(device):
        pipe = BUILDERS[family](tiny)
    for name, part in pipe.components.items():
        if isinstance(part, torch.nn.Module):
            setattr(pipe, name, _tiny_pipelines()._frozen(part).to(torch.bfloat16))
    path = root / family
    pipe.save_pretrained(path, safe_serialization=True)
    del pipe
    free(device)
    return path


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn: Callable[[], object], device: torch.device, reps: int = 1) -> float:
    """Median seconds of ``reps`` calls, synchronising the device around each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def bench_generate(path: Path, args: argparse.Namespace, device: torch.device) -> tuple[dict, Any]:
    """images/s of ``adapter.sample`` (family defaults, VAE decode to PIL) from prompts and from the
    embedding cache; the per-step encode cost a trainer without the cache would pay. Returns
    (figures, the loaded adapter)."""
    from capo.models.base import detect_family, load_model
    from capo.shapes.world import make_prompts

    adapter = load_model(*detect_family(str(path)), device=device, dtype="bfloat16")
    prompts = [s.text for s in make_prompts("train")[: args.gen_batch]]
    seeds = list(range(len(prompts)))
    steps = args.gen_steps or adapter.default_steps
    adapter.sample(prompts, seeds, steps=2)  # warm-up: kernels, cuDNN autotuning
    emb = adapter.encode_prompts(prompts)
    from_prompts = timed(lambda: adapter.sample(prompts, seeds, steps=steps), device)
    from_cache = timed(lambda: adapter.sample(prompts, seeds, steps=steps, emb=emb), device)
    pair_prompts = [s.text for s in make_prompts("train")[: args.pairs]]
    side = adapter.resolution
    pixels = torch.rand(2 * args.pairs, 3, side, side, device=device, dtype=adapter.pipe.vae.dtype) * 2 - 1
    with torch.no_grad():
        encode_text = timed(lambda: adapter.encode_prompts(pair_prompts), device, reps=3)
        encode_vae = timed(lambda: adapter.pipe.vae.encode(pixels).latent_dist.sample(), device, reps=3)
    n = len(prompts)
    return {
        "resolution": side,
        "steps": steps,
        "guidance": adapter.default_guidance,
        "batch": n,
        "images_per_s_from_prompts": n / from_prompts,
        "images_per_s_from_cache": n / from_cache,
        "uncached_extra_s_per_step": {
            "text_encoders_B_prompts": encode_text,
            "vae_encode_2B_images": encode_vae,
        },
        "peak_gib_generate": peak_gib(device),
    }, adapter


#: training setups measured: label -> TrainConfig overrides
SETUPS: dict[str, dict[str, Any]] = {
    "LoRA r8": {"lora": True, "gradient_checkpointing": False},
    "LoRA r8 + grad ckpt": {"lora": True, "gradient_checkpointing": True},
    "full + grad ckpt": {"lora": False, "gradient_checkpointing": True},
}


def bench_train(run_root: Path, label: str, pairs: int, steps: int, device: torch.device) -> dict:
    """pairs/s and peak memory of ``optimizer_step`` (median of ``steps`` after 2 warm-up steps)."""
    from capo.config import from_dict
    from capo.pipeline.train import TrainConfig, optimizer_step, setup

    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = from_dict(
        TrainConfig,
        {
            "run": str(run_root),
            "objective": "capo",
            "batch_size": pairs,
            "mixed_precision": "bf16",
            "max_steps": 10**6,
            "log_with": "none",
            "checkpoint_every": 0,
            **SETUPS[label],
        },
    )
    try:
        tr = setup(config)
        for step in range(2):
            optimizer_step(tr, step)
        step_s = statistics.median(
            [timed(lambda s=s: optimizer_step(tr, s), device) for s in range(2, 2 + steps)]
        )
        out = {
            "pairs": pairs,
            "step_s": step_s,
            "pairs_per_s": pairs / step_s,
            "peak_gib": peak_gib(device),
            "trainable_params": sum(p.numel() for p in tr.params),
        }
        tr.accelerator.free_memory()
        tr = None
    except torch.OutOfMemoryError as e:
        out = {"pairs": pairs, "error": f"OutOfMemoryError: {str(e).splitlines()[0]}"}
    free(device)
    return out


def table(family: str, res: dict) -> str:
    g = res["generate"]
    extra = g["uncached_extra_s_per_step"]
    lines = [
        f"## {family} at {g['resolution']}², {res['device']}",
        f"generate ({g['steps']} steps, CFG {g['guidance']}, batch {g['batch']}, bf16, VAE decode): "
        f"{g['images_per_s_from_prompts']:.3f} img/s from prompts, "
        f"{g['images_per_s_from_cache']:.3f} img/s from cached embeddings",
        "without the cache a step would add: text encoders "
        f"{extra['text_encoders_B_prompts'] * 1e3:.1f} ms "
        f"+ VAE encode of 2B images {extra['vae_encode_2B_images'] * 1e3:.1f} ms",
        "",
        "| setup (bf16 mixed precision) | B pairs | step s | pairs/s | peak GiB | trainable |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in res["train"].items():
        if "error" in r:
            lines.append(f"| {label} | {r['pairs']} | {r['error']} | | | |")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"| {label} | {r['pairs']} | {r['step_s']:.3f} | {r['pairs_per_s']:.2f} | {peak} | "
            f"{r['trainable_params']:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=sorted(BUILDERS), required=True)
    ap.add_argument("--tiny", action="store_true", help="shrunk architectures (a CPU check of this script)")
    ap.add_argument("--pairs", type=int, default=4, help="B pairs per training step (forward batch 2B)")
    ap.add_argument("--full-pairs", type=int, default=2, help="B pairs per step for full fine-tuning")
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per setup")
    ap.add_argument("--gen-batch", type=int, default=4, help="images per generate call")
    ap.add_argument("--gen-steps", type=int, default=None, help="sampling steps (default: the family's)")
    ap.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    res: dict[str, Any] = {"family": args.family, "tiny": args.tiny, "device": name, "train": {}}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_pipeline(args.family, args.tiny, Path(tmp), device)
        res["build_and_save_s"] = time.perf_counter() - began
        res["generate"], adapter = bench_generate(path, args, device)
        run = synthetic_run(Path(tmp), str(path), prompts=max(args.pairs, 4), adapter=adapter)
        del adapter
        for label in args.setups:
            pairs = args.pairs if SETUPS[label]["lora"] else args.full_pairs
            res["train"][label] = bench_train(run.root, label, pairs, args.steps, device)
            print(label, res["train"][label], flush=True)
    res["total_s"] = time.perf_counter() - began
    print(table(args.family, res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
