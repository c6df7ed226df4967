"""LAION aesthetic predictor v2 ("improved-aesthetic-predictor", C. Schuhmann, 2022).

A linear MLP head on the L2-normalised CLIP ViT-L/14 image embedding, regressing the 1-10 mean
rating of SAC + LOGOS + AVA (``sac+logos+ava1-l14-linearMSE.pth``). Prompt-blind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from capo.errors import CapoError
from capo.rewards.base import RewardModel
from capo.rewards.clip_common import load_encoder, load_state_dict_file, resolve_file

LAION_CLIP = "openai/clip-vit-large-patch14"
#: the same tensors as sac+logos+ava1-l14-linearMSE.pth, mirrored on the hub by TRL's DDPO example.
LAION_HEAD = "hf://trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"


def aesthetic_mlp(embed_dim: int = 768) -> torch.nn.Sequential:
    """The reference ``MLP.layers``: Linear(D,1024), Dropout(.2), Linear(1024,128), Dropout(.2),
    Linear(128,64), Dropout(.1), Linear(64,16), Linear(16,1) -- no activations (the ReLUs are
    commented out in the reference), keys ``0, 2, 4, 6, 7``."""
    return torch.nn.Sequential(
        torch.nn.Linear(embed_dim, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )


class LaionAesthetic(RewardModel):
    """a(x) = MLP(e_img(x) / ||e_img(x)||) in about [1, 10], e_img = CLIP ViT-L/14 image embedding.

    ``head``: the MLP state dict (keys ``layers.{0,2,4,6,7}.{weight,bias}``), a local ``.pth`` /
    ``.safetensors`` file or ``hf://OWNER/REPO/FILE`` (default ``hf://trl-lib/ddpo-aesthetic-predictor/
    aesthetic-model.pth``). ``model``: the CLIP backbone and its preprocessor config (default
    ``openai/clip-vit-large-patch14``; the reference used OpenAI ``clip.load("ViT-L/14")``, the same
    weights, behind torchvision preprocessing: shortest side bicubic, centre crop with round offsets).

    Bradley-Terry view (docs/design.md §2.6): a regression score (MSE on mean ratings) has no intrinsic
    temperature, so one is stated, not fitted: ``bt_scale = 1`` per rating point, i.e. an image
    predicted one point higher (on the 1-10 scale) wins with probability sigma(1) = 0.73, and
    ``transform = "identity"``. Override ``bt_scale`` on the instance to use another temperature.
    """

    name = "laion-aesthetic"
    needs_prompt = False
    bt_scale = 1.0
    transform = "identity"
    higher_is_better = True

    def __init__(
        self,
        head: str | os.PathLike = LAION_HEAD,
        model: str | os.PathLike = LAION_CLIP,
        processor: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
    ):
        self.encoder = load_encoder(model, processor, device=device, dtype=dtype, text=False)
        path = resolve_file(head)
        state = {k.removeprefix("layers."): v for k, v in load_state_dict_file(path).items()}
        embed_dim = int(self.encoder.model.config.projection_dim)
        self.mlp = aesthetic_mlp(embed_dim)
        try:
            self.mlp.load_state_dict(state, strict=True)
        except RuntimeError as err:
            detail = " ".join(str(err).split())[:300]
            raise CapoError(f"{path}: not an aesthetic MLP for {embed_dim}-d embeddings: {detail}") from None
        self.mlp.eval().requires_grad_(False).to(self.encoder.device, torch.float32)
        self.batch_size = batch_size

    @torch.no_grad()
    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """float32 [B]: MLP(normalised image embedding); ``prompts`` are ignored."""
        e_img = self.encoder.image_features(images)
        return self.mlp(e_img).squeeze(-1).cpu().numpy().astype(np.float32)
