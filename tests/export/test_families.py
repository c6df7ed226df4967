"""``capo export`` on the tiny SD, SDXL, SD3 and FLUX pipelines: diffusers loads each export with its
own API (``load_lora_weights`` for lora, ``DiffusionPipeline.from_pretrained`` for merged), and its
samples from fixed seeds equal capo's own sampler with the tuned weights (final latents, 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from export_runs import LORA_ALPHA, LORA_RANK, TINY_OPTIONS, write_run
from safetensors import safe_open
from safetensors.torch import load_file

from capo.cli import main
from capo.models.diffusers_common import initial_noise
from capo.pipeline.generate import load_base
from capo.pipeline.train import apply_trained, trained_state_dict

FAMILIES = ["sd", "sdxl", "sd3", "flux"]
PROMPTS = ["a red circle", "two blue squares"]
SEEDS = [3, 11]
STEPS = 2


def capo_latents(spec, model_dir=None):
    """Final latents [B, C, H, W] of capo's sampler (base, or with RUN/model applied), and the adapter."""
    adapter = load_base(spec, torch.device("cpu"))
    if model_dir is not None:
        apply_trained(adapter, model_dir).denoiser.eval()
    return adapter.sample(PROMPTS, SEEDS, STEPS).latents, adapter


def diffusers_latents(pipe, adapter) -> torch.Tensor:
    """The diffusers pipeline called with prompts (it encodes them itself) from the same noise."""
    noise = initial_noise(SEEDS, adapter.latent_shape())
    packed = adapter.pack(noise) if adapter.family == "flux" else noise
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(PROMPTS, latents=packed, num_inference_steps=STEPS, height=adapter.resolution,
                   width=adapter.resolution, guidance_scale=adapter.default_guidance, output_type="latent",
                   **TINY_OPTIONS[adapter.family]).images
    return adapter.unpack(out, *noise.shape[2:]) if adapter.family == "flux" else out


def _export(run, out, *flags):
    assert main(["export", "--run", str(run.root), "--out", str(out), *flags]) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_and_merged_exports_load_in_diffusers(family, tiny_models, tmp_path):
    run = write_run(tmp_path / "run", str(tiny_models[family]), TINY_OPTIONS[family])
    spec = run.read_base_model()
    base, _ = capo_latents(spec)
    tuned, adapter = capo_latents(spec, run.model_dir)
    assert (tuned - base).abs().max() > 1e-3  # the LoRA changes the samples

    _export(run, tmp_path / "lora", "--format", "lora")
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(lora_file, "pt") as f:
        prefix = f"{adapter.denoiser_name}."
        assert f.keys() and all(k.startswith(prefix) for k in f.keys())
        config = json.loads(f.metadata()["lora_adapter_metadata"])  # the LoRA config, packed by diffusers
    assert config[f"{prefix}r"] == LORA_RANK and config[f"{prefix}lora_alpha"] == LORA_ALPHA
    pipe = DiffusionPipeline.from_pretrained(spec["path"])
    pipe.scheduler = type(adapter.pipe.scheduler).from_config(adapter.pipe.scheduler.config)  # capo's sampler
    pipe.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(diffusers_latents(pipe, adapter), tuned, rtol=0, atol=1e-4)

    _export(run, tmp_path / "merged", "--format", "merged")
    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged")  # scheduler: the one capo sampled with
    assert type(merged.scheduler) is type(adapter.pipe.scheduler)
    assert not getattr(merged.components[adapter.denoiser_name], "peft_config", None)  # LoRA folded in
    torch.testing.assert_close(diffusers_latents(merged, adapter), tuned, rtol=0, atol=1e-4)
    for name in ("lora", "merged"):
        assert (tmp_path / name / "README.md").read_text().startswith("---\n")


def test_lora_export_keeps_the_trained_precision(tiny_models, tmp_path):
    """--dtype bfloat16 loads the base in bf16, but the exported LoRA holds the saved fp32 tensors."""
    run = write_run(tmp_path / "run", str(tiny_models["sd"]))
    _export(run, tmp_path / "out", "--dtype", "bfloat16")
    exported = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    saved = convert_state_dict_to_diffusers(trained_state_dict(run.model_dir))
    assert exported.keys() == {f"unet.{k}" for k in saved}
    assert all(torch.equal(exported[f"unet.{k}"], v) and v.dtype == torch.float32 for k, v in saved.items())
