"""The tuned model's files in RUN/model (or any directory ``capo train`` or ``capo export`` wrote):
which weights file it holds, reading it (checked: readable, finite, matching its manifest), and
loading it into a freshly loaded base model. Used by train (init_model), generate and evaluate
(--tuned), experiments (soups) and export.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from capo.errors import CapoError
from capo.models.base import SHAPES_MARKER, DiffusionAdapter
from capo.pipeline.integrity import damage

LORA_FILE, FULL_FILE = "adapter_model.safetensors", "denoiser.safetensors"
SHAPES_WEIGHTS = "model.safetensors"  # beside capo_shapes.json in a saved shapes model
LIKELY_SETTINGS = "beta, learning_rate, sigmoid_bias, mixed_precision or the data (latents, embeddings)"


def check_finite_weights(state: dict[str, torch.Tensor], where: str) -> None:
    """Non-finite trained weights are never saved (nor loaded: apply_trained checks them too)."""
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CapoError(f"tensor '{bad}' holds non-finite values (NaN or inf); the model is broken "
                        f"(check {LIKELY_SETTINGS})", path=where)


def _apply_lora(denoiser: nn.Module, model_dir: Path) -> None:
    denoiser.add_adapter(LoraConfig.from_pretrained(str(model_dir)))
    device = str(next(denoiser.parameters()).device)
    result = set_peft_model_state_dict(denoiser, load_weights(model_dir / LORA_FILE, device))
    if getattr(result, "unexpected_keys", None):
        raise CapoError(f"unexpected LoRA key '{result.unexpected_keys[0]}'", path=str(model_dir / LORA_FILE))


def _apply_full(denoiser: nn.Module, model_dir: Path) -> None:
    device = str(next(denoiser.parameters()).device)
    denoiser.load_state_dict(load_weights(model_dir / FULL_FILE, device))


def _apply_shapes(denoiser: nn.Module, model_dir: Path) -> None:
    """A saved shapes model (``capo export --format merged`` of a shapes run): its ``unet.*`` tensors."""
    device = str(next(denoiser.parameters()).device)
    state = load_file(model_dir / SHAPES_WEIGHTS, device=device)
    denoiser.load_state_dict({k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")})


#: weights file in RUN/model (or a tuned model dir) -> how to load it into a fresh base denoiser
APPLIERS = {LORA_FILE: _apply_lora, FULL_FILE: _apply_full, SHAPES_MARKER: _apply_shapes}


def weights_file(model_dir: str | os.PathLike) -> Path:
    """The weights file of a trained model directory, verified against its manifest."""
    found = [Path(model_dir) / n for n in APPLIERS if (Path(model_dir) / n).is_file()]
    if not found:
        raise CapoError(f"no {LORA_FILE} or {FULL_FILE}; run `capo train` first", path=str(model_dir))
    problem = damage(Path(model_dir))
    if problem is not None:
        raise CapoError(f"damaged ({problem}); remove it and rerun `capo train`", path=str(model_dir))
    return found[0]


def load_weights(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file as tensors; an unreadable or non-finite file is a one-line error."""
    try:
        state = load_file(path, device=device)
    except (OSError, SafetensorError) as e:
        raise CapoError(f"unreadable safetensors file ({str(e)[:160]})", path=str(path)) from None
    check_finite_weights(state, str(path))
    return state


def apply_trained(adapter: DiffusionAdapter, model_dir: str | os.PathLike) -> DiffusionAdapter:
    """Load RUN/model (LoRA adapter or full denoiser) into a freshly loaded base ``adapter``."""
    weights = weights_file(model_dir)
    APPLIERS[weights.name](adapter.denoiser, weights.parent)
    return adapter


def trained_state_dict(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The saved tensors of RUN/model: peft LoRA keys (lora_A / lora_B) or the full denoiser."""
    return load_weights(weights_file(model_dir))
