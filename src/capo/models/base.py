"""The diffusion adapter interface: trainer, sampler and losses only see this.

Time convention: ``t`` is a float tensor in (0, 1), the variable sampled uniformly in training.
VP families map it to the discrete index ``round(t * num_train_timesteps)``; flow families map it
through the timestep shift to s = sigma. ``adapter.schedule(t)`` gives a ``Noise`` (alpha, sigma, lam, dlam)
for the same t, and ``adapter.prediction_type`` in {"epsilon", "v_prediction", "flow"} says how
``denoise`` outputs convert to epsilon (capo.schedules.to_epsilon).
"""

from __future__ import annotations

import abc
import importlib
import json
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from PIL import Image

from capo.errors import CapoError


@dataclass
class SampleOutput:
    """What ``sample`` returns: final latents [B, C, H, W] (the training data) and PIL images."""

    latents: torch.Tensor
    images: list[Image.Image]


class DiffusionAdapter(abc.ABC):
    """One model family. ``denoiser`` is the only module training touches."""

    family: str = "base"
    prediction_type: str = "epsilon"
    #: names of modules in ``denoiser`` that LoRA adapts (peft ``target_modules``)
    lora_targets: Sequence[str] = ()
    #: default sampling settings of this family (the paper's, for real models)
    default_steps: int = 50
    default_guidance: float = 7.5

    denoiser: torch.nn.Module
    schedule: Any  # capo.schedules.VPSchedule | capo.schedules.FlowSchedule

    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Text-encoder outputs, batch-first tensors; cacheable (what training reads)."""

    @abc.abstractmethod
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, emb: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw model output for noisy latents x_t [B, C, H, W] at times t [B] in (0, 1)."""

    @abc.abstractmethod
    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int | None = None,
        guidance: float | None = None,
        emb: dict[str, torch.Tensor] | None = None,
    ) -> SampleOutput:
        """Generate one sample per prompt; sample i starts from noise seeded by seeds[i]."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents -> PIL images (a VAE decode, or identity for pixel-space models)."""

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent at the default resolution."""
        raise NotImplementedError


#: family name -> "module:factory"; the factory takes (path_or_id, **options) -> DiffusionAdapter
MODELS: dict[str, str] = {
    "shapes-vp": "capo.models.shapes:load_shapes_vp",
    "shapes-flow": "capo.models.shapes:load_shapes_flow",
    "sd": "capo.models.sd:load_sd",
    "sdxl": "capo.models.sdxl:load_sdxl",
    "sd3": "capo.models.sd3:load_sd3",
    "flux": "capo.models.flux:load_flux",
}

#: family -> the world its images belong to, whose prompt sets may carry a gold metric
#: (``capo.pipeline.prompts.GOLD_CHECKERS``); families not listed have none
WORLDS: dict[str, str] = {"shapes-vp": "shapes", "shapes-flow": "shapes"}


#: diffusers pipeline class (model_index.json "_class_name") -> family
PIPELINE_FAMILIES: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}

#: file a saved shapes model carries, naming its kind ("shapes-vp" | "shapes-flow")
SHAPES_MARKER = "capo_shapes.json"


def detect_family(spec: str) -> tuple[str, str | None]:
    """(family, path_or_id) for a ``--model`` value: a built-in name, a local dir or a hub id."""
    if spec in MODELS and spec.startswith("shapes-"):
        return spec, None
    local = Path(spec)
    if (local / SHAPES_MARKER).is_file():
        return json.loads((local / SHAPES_MARKER).read_text())["family"], spec
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise CapoError("no model_index.json or capo_shapes.json; pass --family", path=spec)
        class_name = json.loads(index.read_text()).get("_class_name", "")
    else:
        class_name = _hub_class_name(spec)
    if class_name not in PIPELINE_FAMILIES:
        raise CapoError(f"unsupported pipeline class '{class_name}'; pass --family", path=spec)
    return PIPELINE_FAMILIES[class_name], spec


#: the shape of a Hugging Face hub repository id, "owner/name"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def _hub_class_name(spec: str) -> str:
    """The pipeline class of a hub id's model_index.json: from the local cache first, then the hub.
    A name that is neither built in, a local path nor shaped like a hub id fails at once."""
    if not HUB_ID.match(spec) or ".." in spec:
        builtin = ", ".join(m for m in MODELS if m.startswith("shapes-"))
        raise CapoError(f"unknown model {spec[:200]!r}: not a built-in name ({builtin}), an existing "
                        "directory or a hub id (owner/name)")
    from huggingface_hub import hf_hub_download

    for local_only in (True, False):
        try:
            if not local_only:
                _check_hub_reachable(spec)
            path = hf_hub_download(spec, "model_index.json", local_files_only=local_only)
            return json.loads(Path(path).read_text()).get("_class_name", "")
        except CapoError:
            raise
        except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
            if not local_only:
                raise CapoError(f"cannot resolve model '{spec}' ({type(e).__name__}); pass a local "
                                "directory, or --family") from None
    raise AssertionError("unreachable")


def _check_hub_reachable(spec: str) -> None:
    """Fail at once, not after the hub client's retries, when offline or the hub's host is unknown."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    try:
        why = why or (socket.getaddrinfo(host, 443) and None)
    except OSError:
        why = f"{host} cannot be resolved (no network?)"
    if why:
        raise CapoError(f"model '{spec}' is not in the local hub cache and {why}; pass a local directory")


def load_model(family: str, path: str | None = None, **options: Any) -> DiffusionAdapter:
    """Build the adapter of ``family`` from a hub id or local path (shapes models: shipped weights)."""
    if family not in MODELS:
        raise CapoError(f"unknown model family '{family}' (available: {', '.join(sorted(MODELS))})")
    module, attr = MODELS[family].split(":")
    return vars(importlib.import_module(module))[attr](path, **options)
