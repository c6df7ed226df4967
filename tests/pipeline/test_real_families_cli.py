"""Every real model family end to end through the CLI, offline, on tiny random-weight pipelines:
capo generate -> score -> calibrate -> select -> train (LoRA) -> evaluate."""

from __future__ import annotations

import json
import math

import pytest
import torch

from capo.cli import main
from capo.pipeline.generate import load_base
from capo.pipeline.rundir import RunDir
from capo.pipeline.train import apply_trained, trained_state_dict
from capo.pipeline.trainset import PairSet
from capo.schedules import add_noise

FAMILIES = ["sd", "sdxl", "sd3", "flux"]
REWARD = "shapes-aesthetic"  # prompt-blind, resizes any image to 32×32, no weights to load


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cli(*argv: str) -> None:
    assert main([str(a) for a in argv]) == 0, argv


def _denoise_on_cache(run: RunDir, adapter) -> torch.Tensor:
    """The adapter's output on a fixed noisy version of the run's first cached latents."""
    batch = PairSet.from_run(run).batch(0, 0, 2, 0, 1, adapter.schedule.sample_t, False)
    t = batch.t[:, 0]  # the first (t, noise) draw of each pair
    x_t = add_noise(batch.x_pos, batch.eps_pos[:, 0], t, adapter.schedule)
    with torch.no_grad():
        return adapter.denoise(x_t, t, batch.emb)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end(family, tmp_path, tiny_pipelines):
    model = tiny_pipelines.BUILDERS[family](tmp_path)
    run_dir = tmp_path / "run"
    _cli("generate", "--run", run_dir, "--model", model, "--prompts", "shapes:train", "--num-prompts", 3,
         "--samples-per-prompt", 3, "--steps", 2, "--batch-size", 9, "--device", "cpu")
    run = RunDir.at(run_dir)
    assert run.read_base_model()["family"] == family
    _cli("score", "--run", run_dir, "--reward", REWARD)
    _cli("calibrate", "--run", run_dir)
    _cli("select", "--run", run_dir, "--rule", "best_worst")
    _cli("train", "--run", run_dir, "--max-steps", 2, "--batch-size", 2, "--checkpoint-every", 0,
         "--log-with", "none", "--learning-rate", "1e-3")
    summary = json.loads((run.model_dir / "train_summary.json").read_text())
    assert math.isfinite(summary["last_metrics"]["loss"]) and summary["steps"] == 2
    saved = trained_state_dict(run.model_dir)
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at 0

    spec = run.read_base_model()
    base = load_base(spec, torch.device("cpu"), load_text_encoders=False, load_vae=False)
    before = _denoise_on_cache(run, base)
    tuned = apply_trained(base, run.model_dir)
    assert not torch.allclose(_denoise_on_cache(run, tuned), before)
    tuned.denoiser.disable_adapters()  # the reference: the base model, unchanged
    torch.testing.assert_close(_denoise_on_cache(run, tuned), before, rtol=0, atol=0)

    _cli("evaluate", "--run", run_dir, "--prompts", "shapes:heldout", "--num-prompts", 2, "--seeds", 1,
         "--n-boot", 20, "--grid-prompts", 2, "--reward", REWARD)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert 0.0 <= results["rewards"][REWARD]["win_rate"] <= 100.0
    assert (run_dir / "eval" / "grid.png").is_file()
