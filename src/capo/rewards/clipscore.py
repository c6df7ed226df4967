"""CLIPScore (Hessel et al., 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning")."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from capo.rewards.base import RewardModel
from capo.rewards.clip_common import cosine, load_encoder

CLIPSCORE_MODEL = "openai/clip-vit-base-patch32"
CLIPSCORE_PREFIX = "A photo depicts "
CLIPSCORE_W = 2.5


class CLIPScore(RewardModel):
    """CLIP-S(x, c) = w · max(cos(E_img(x), E_txt(prefix + c)), 0), w = 2.5 (Hessel et al., Eq. 1).

    Weights, tokenizer and preprocessing: ``model`` (transformers ``CLIPModel``, hub id or local
    directory; default ``openai/clip-vit-base-patch32``, the paper's ViT-B/32, for which w = 2.5 was
    chosen; ``openai/clip-vit-large-patch14`` is the common alternative). ``prefix`` is the reference
    implementation's ``"A photo depicts "`` (``prefix=""`` gives torchmetrics' text). Preprocessing is
    the reference's torchvision one: shortest side bicubic, centre crop with round offsets.

    Bradley-Terry view (docs/design.md §2.6): CLIP was trained with a softmax over exp(logit_scale) · cos,
    exp(logit_scale) = 100, so the BT logit is 100 · cos = (100 / w) · CLIP-S: ``bt_scale = 40``,
    ``transform = "identity"`` (the clamp at 0 only ties pairs that CLIP finds unrelated anyway).
    """

    name = "clipscore"
    needs_prompt = True
    bt_scale = 100.0 / CLIPSCORE_W
    transform = "identity"
    higher_is_better = True

    def __init__(
        self,
        model: str | os.PathLike = CLIPSCORE_MODEL,
        processor: str | os.PathLike | None = None,
        prefix: str = CLIPSCORE_PREFIX,
        w: float = CLIPSCORE_W,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
    ):
        self.encoder = load_encoder(model, processor, device=device, dtype=dtype, crop_rounding="round")
        self.prefix, self.w, self.batch_size = prefix, float(w), batch_size

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """float32 [B]: w · max(<e_img_b, e_txt_b>, 0) with L2-normalised embeddings."""
        e_img = self.encoder.image_features(images)
        e_txt = self.encoder.text_features([self.prefix + p for p in prompts])
        return (self.w * cosine(e_img, e_txt).clamp(min=0)).cpu().numpy().astype(np.float32)
