"""A model that ``capo train`` itself trained (tiny SD, through the CLI: generate, score, calibrate,
select, train, evaluate) exports, loads in diffusers with ``load_lora_weights`` and
``from_pretrained``, samples what capo's sampler samples, and its card states the run's settings."""

from __future__ import annotations

import json

import torch
from huggingface_hub import ModelCard
from test_families import capo_latents, diffusers_latents

from capo.cli import main
from capo.pipeline.rundir import RunDir
from capo.pipeline.score import read_reward_meta

REWARD = "shapes-aesthetic"  # prompt-blind, no weights to load


def _cli(*argv) -> None:
    assert main([str(a) for a in argv]) == 0, argv


def test_trained_sd_run_exports(tiny_models, tmp_path):
    from diffusers import DiffusionPipeline

    run_dir = tmp_path / "run"
    _cli("generate", "--run", run_dir, "--model", tiny_models["sd"], "--prompts", "shapes:train",
         "--num-prompts", 3, "--samples-per-prompt", 3, "--steps", 2, "--batch-size", 9, "--device", "cpu")
    _cli("score", "--run", run_dir, "--reward", REWARD)
    _cli("calibrate", "--run", run_dir)
    _cli("select", "--run", run_dir, "--rule", "best_worst")
    _cli("train", "--run", run_dir, "--max-steps", 3, "--batch-size", 2, "--checkpoint-every", 0,
         "--log-with", "none", "--learning-rate", "3e-2", "--loader-workers", 0, "--beta", 250)
    _cli("evaluate", "--run", run_dir, "--prompts", "shapes:heldout", "--num-prompts", 2, "--seeds", 1,
         "--n-boot", 20, "--grid-prompts", 1, "--reward", REWARD)
    run = RunDir.at(run_dir)
    spec = run.read_base_model()
    base, _ = capo_latents(spec)
    tuned, adapter = capo_latents(spec, run.model_dir)
    assert (tuned - base).abs().max() > 1e-3

    _cli("export", "--run", run_dir, "--out", tmp_path / "lora")
    pipe = DiffusionPipeline.from_pretrained(spec["path"])
    pipe.scheduler = type(adapter.pipe.scheduler).from_config(adapter.pipe.scheduler.config)
    pipe.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(diffusers_latents(pipe, adapter), tuned, rtol=0, atol=1e-4)
    _cli("export", "--run", run_dir, "--out", tmp_path / "merged", "--format", "merged")
    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(diffusers_latents(merged, adapter), tuned, rtol=0, atol=1e-4)

    card = ModelCard.load(tmp_path / "lora" / "README.md")
    assert card.data.library_name == "diffusers" and "lora" in card.data.tags
    bt = read_reward_meta(run.reward_path(REWARD))["bt_scale"]
    assert f"| {REWARD} | {bt} | " in card.text
    assert "Pair rule: `best_worst`." in card.text and "beta = 250," in card.text
    mean = json.loads((run.model_dir / "train_summary.json").read_text())["weight_mean"]
    assert f"weighting sigmoid (bias 1.5), divided by its mean E_t f = {mean:.4g}," in card.text
    assert "3 steps of 2 pairs" in card.text and "LoRA rank 8, alpha 8.0 (scale 1)" in card.text
    win = json.loads((run.eval_dir / "results.json").read_text())["rewards"][REWARD]
    assert f"| tuned | {win['win_rate']:.1f} [{win['ci_low']:.1f}, {win['ci_high']:.1f}] |" in card.text
