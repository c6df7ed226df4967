"""Run directories holding a tuned model/, for the export tests (a plain module, not conftest.py,
so that `from export_runs import ...` cannot pick up another package's conftest in one pytest run).

A tuned model/ is written as ``capo train`` writes it (peft ``get_peft_model_state_dict`` to
adapter_model.safetensors + adapter_config.json, or the full denoiser.safetensors, plus
train_summary.json), with random non-zero LoRA B (training starts from B = 0) or perturbed full
weights, so the tuned model differs from its base.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from capo.pipeline.generate import load_base, model_spec
from capo.pipeline.integrity import write_manifest
from capo.pipeline.rundir import RunDir
from capo.pipeline.train import FULL_FILE, LORA_FILE, TrainConfig

#: loader options of the tiny pipelines (their T5 tokenizers are short)
TINY_OPTIONS = {"sd": {}, "sdxl": {}, "sd3": {"max_sequence_length": 32}, "flux": {"max_sequence_length": 32}}
LORA_RANK, LORA_ALPHA = 4, 8.0  # scale alpha / r = 2: the export must keep it



def write_run(root: Path, model: str, options: dict | None = None, lora: bool = True, seed: int = 0,
              b_std: float = 0.02) -> RunDir:
    """RUN with base_model.json, a config.yaml, and model/ holding a tuned model of ``model``."""
    run = RunDir.at(root)
    root.mkdir(parents=True, exist_ok=True)
    spec = model_spec(model, None, options or {})
    run.write_base_model(spec)
    run.save_config("generate", {"model": model, "prompts": "shapes:train", "num_prompts": 3,
                                 "samples_per_prompt": 4, "steps": 2, "guidance": None, "seed": 0})
    run.save_config("select", {"rule": "frs", "reward": None, "weights": []})
    adapter = load_base(spec, torch.device("cpu"), load_text_encoders=False, load_vae=False)
    denoiser = adapter.denoiser
    cfg = TrainConfig(run=str(root), lora=lora, lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, max_steps=3)
    run.model_dir.mkdir()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the LoRA A init
    if lora:
        denoiser.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian",
                                        target_modules=list(adapter.lora_targets)))
        with torch.no_grad():
            for name, p in denoiser.named_parameters():
                if "lora_B" in name:
                    p.copy_(b_std * torch.randn(p.shape, generator=gen))
        state = get_peft_model_state_dict(denoiser)
        save_file({k: v.detach().contiguous() for k, v in state.items()}, run.model_dir / LORA_FILE)
        denoiser.peft_config["default"].save_pretrained(str(run.model_dir))
    else:
        state = {k: v + 0.05 * v.std().nan_to_num() * torch.randn(v.shape, generator=gen)
                 if v.is_floating_point() else v for k, v in denoiser.state_dict().items()}
        save_file({k: v.contiguous() for k, v in state.items()}, run.model_dir / FULL_FILE)
    summary = {"steps": cfg.max_steps, "config": dataclasses.asdict(cfg)}
    (run.model_dir / "train_summary.json").write_text(json.dumps(summary))
    write_manifest(run.model_dir)  # as save_model does
    return run
