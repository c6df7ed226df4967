"""Resumable checkpoints of ``capo train``: ``RUN/checkpoints/step-K/``.

A checkpoint is accelerate's state (model weights, optimizer, LR scheduler, the RNG states of
every rank) plus ``position.json`` (the data position = step, and the config). Under LoRA only
the adapter weights are saved (``lora.safetensors``), not the frozen base: accelerate's save and
load hooks replace its model file with peft's state dict, as diffusers' LoRA scripts do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from capo.errors import CapoError
from capo.pipeline.rundir import RunDir

if TYPE_CHECKING:
    from capo.pipeline.train import Trainer

#: config keys a resumed run must share with its checkpoint (they define the trajectory)
TRAJECTORY_KEYS = ("objective", "weighting", "sigmoid_bias", "normalize_weighting", "beta", "lora",
                   "lora_rank", "lora_alpha", "lora_init", "learning_rate", "weight_decay", "adam_epsilon",
                   "warmup_steps", "lr_schedule", "batch_size", "seed", "share_noise", "t_min", "t_max")
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
LORA_STATE = "lora.safetensors"


def register_lora_hooks(acc: Accelerator) -> None:
    """Make ``save_state`` / ``load_state`` write and read only the LoRA weights of the model."""

    def save(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if acc.is_main_process:
            state = get_peft_model_state_dict(acc.unwrap_model(models[0]))
            save_file({k: v.detach().contiguous() for k, v in state.items()}, Path(output_dir) / LORA_STATE)
        weights.clear()  # accelerate would save the whole model (frozen base included) otherwise

    def load(models: list[Any], input_dir: str) -> None:
        model = acc.unwrap_model(models.pop())
        device = str(next(model.parameters()).device)
        set_peft_model_state_dict(model, load_file(Path(input_dir) / LORA_STATE, device=device))

    acc.register_save_state_pre_hook(save)
    acc.register_load_state_pre_hook(load)


def checkpoints(run: RunDir) -> dict[int, Path]:
    """step -> complete checkpoint dir (temporary dirs of an interrupted save are ignored)."""
    found = {}
    for p in run.checkpoints_dir.glob("step-*"):
        if (m := CHECKPOINT_RE.match(p.name)) and (p / "position.json").is_file():
            found[int(m.group(1))] = p
    return found


def save_checkpoint(tr: Trainer, step: int) -> Path:
    """checkpoints/step-K/: accelerate state and position.json; written to a temp dir, then renamed;
    only the newest ``keep_checkpoints`` are kept."""
    acc, root = tr.accelerator, tr.run.checkpoints_dir
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        position = {"step": step, "config": dataclasses.asdict(tr.config)}
        (tmp / "position.json").write_text(json.dumps(position, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(checkpoints(tr.run))[: -tr.config.keep_checkpoints or None]:
            shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    acc.wait_for_everyone()
    return final


def resume(tr: Trainer) -> int:
    """Load the newest checkpoint if --resume (else refuse to overwrite one); returns its step."""
    found = checkpoints(tr.run)
    if not found:
        return 0
    newest = found[max(found)]
    if not tr.config.resume:
        raise CapoError("checkpoints exist; pass --resume to continue, or remove them", path=str(newest))
    saved = json.loads((newest / "position.json").read_text())
    for key in TRAJECTORY_KEYS:
        if saved["config"].get(key) != getattr(tr.config, key):
            raise CapoError(f"--{key.replace('_', '-')} {getattr(tr.config, key)} differs from the "
                            f"checkpoint's {saved['config'].get(key)}", path=str(newest))
    tr.accelerator.load_state(str(newest))
    return int(saved["step"])
