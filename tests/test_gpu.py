"""GPU checks (marked ``gpu``; skipped without CUDA): bf16 denoising, and the pipeline with bf16
generation and mixed-precision training on the device."""

import json
import math
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import torch

from capo.cli import main
from capo.models.base import detect_family, load_model
from capo.models.shapes import build_shapes_model
from capo.pipeline.train import trained_state_dict
from capo.schedules import to_epsilon

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_bf16_denoise_on_cuda_matches_fp32_on_cpu(kind):
    """The shipped shapes model loaded on CUDA in bf16 predicts what it predicts on the CPU in fp32."""
    cpu = load_model(f"shapes-{kind}", device="cpu")
    gpu = load_model(f"shapes-{kind}", device="cuda", dtype="bfloat16")
    assert next(gpu.denoiser.parameters()).dtype == torch.bfloat16
    prompts = ["a red circle", "two blue squares"]
    x_t = torch.randn(2, *cpu.latent_shape(), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.7])
    ref = to_epsilon(cpu.denoise(x_t, t, cpu.encode_prompts(prompts)), x_t, t, cpu.prediction_type,
                     cpu.schedule)
    out = gpu.denoise(x_t, t, gpu.encode_prompts(prompts))
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16
    eps = to_epsilon(out.float().cpu(), x_t, t, gpu.prediction_type, gpu.schedule)
    assert torch.isfinite(eps).all()
    assert (eps - ref).norm() / ref.norm() < 0.05  # bf16 weights and activations


def _run_with_pairs(tmp_path: Path) -> Path:
    """A tiny shapes-vp run directory through generate (on CUDA), score, calibrate and select."""
    build_shapes_model("vp", size="tiny", seed=0, device="cpu").save_pretrained(tmp_path / "model")
    run = tmp_path / "run"
    for argv in (
        ["generate", "--run", run, "--model", tmp_path / "model", "--prompts", "shapes:train",
         "--num-prompts", 6, "--samples-per-prompt", 4, "--device", "cuda"],
        ["score", "--run", run, "--reward", "shapes-aesthetic"],
        ["calibrate", "--run", run],
        ["select", "--run", run, "--rule", "best_worst"],
    ):
        assert main([str(a) for a in argv]) == 0, argv
    return run


@pytest.mark.parametrize("mixed_precision", ["bf16", "no"])
def test_pipeline_on_cuda(tmp_path, mixed_precision):
    """generate on CUDA -> score -> calibrate -> select -> train (LoRA, mixed precision) -> evaluate."""
    run = _run_with_pairs(tmp_path)
    for argv in (
        ["train", "--run", run, "--max-steps", 3, "--batch-size", 4, "--checkpoint-every", 0,
         "--log-with", "none", "--learning-rate", "1e-3", "--mixed-precision", mixed_precision],
        ["evaluate", "--run", run, "--prompts", "shapes:heldout", "--num-prompts", 2, "--seeds", 1,
         "--n-boot", 20, "--grid-prompts", 2, "--reward", "shapes-aesthetic"],
    ):
        assert main([str(a) for a in argv]) == 0, argv
    summary = json.loads((run / "model" / "train_summary.json").read_text())
    assert math.isfinite(summary["last_metrics"]["loss"]) and summary["steps"] == 3
    saved = trained_state_dict(run / "model")
    assert saved and all(v.dtype == torch.float32 for v in saved.values())  # trainable weights stay fp32
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)
    results = json.loads((run / "eval" / "results.json").read_text())
    assert 0.0 <= results["rewards"]["shapes-aesthetic"]["win_rate"] <= 100.0


def test_fsdp_full_finetuning_checkpoints_resumes_and_saves(tmp_path):
    """capo train under the shipped FSDP2 config (one process): full fine-tuning, a checkpoint,
    --resume to the end, and model/denoiser.safetensors with every weight of the denoiser."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not installed")
    run = _run_with_pairs(tmp_path)
    fsdp = Path(str(resources.files("capo") / "configs" / "accelerate" / "fsdp.yaml"))
    launch = ["accelerate", "launch", "--config_file", str(fsdp), "--num_processes", "1", "-m", "capo.cli",
              "train", "--run", str(run), "--lora", "false", "--batch-size", "4", "--checkpoint-every", "2",
              "--log-with", "none", "--learning-rate", "1e-4"]
    first = subprocess.run([*launch, "--max-steps", "2"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (run / "checkpoints" / "step-2" / "position.json").is_file()
    shutil.rmtree(run / "model")
    resumed = subprocess.run([*launch, "--max-steps", "4", "--resume"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run / "model" / "train_summary.json").read_text())
    assert summary["resumed_from"] == 2 and math.isfinite(summary["last_metrics"]["loss"])
    tuned = trained_state_dict(run / "model")
    base = load_model(*detect_family(str(tmp_path / "model")), device="cpu").denoiser.state_dict()
    assert tuned.keys() == base.keys()
    assert any(not torch.equal(tuned[k].cpu().float(), base[k].float()) for k in base)
