"""PickScore (Kirstain et al., 2023, "Pick-a-Pic"): a CLIP ViT-H/14 fine-tuned on human choices."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from capo.rewards.base import RewardModel
from capo.rewards.clip_common import cosine, load_encoder

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore(RewardModel):
    """s(x, c) = exp(logit_scale) · cos(E_img(x), E_txt(c)), the PickScore model card's score.

    Weights: ``model`` (transformers ``CLIPModel``; default ``yuvalkirstain/PickScore_v1``);
    tokenizer and preprocessing: ``processor`` (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``,
    the processor PickScore was trained behind: transformers ``CLIPImageProcessor``, shortest side
    224 bicubic, centre crop 224 with floor offsets, OpenAI mean/std). Hub ids or local directories.

    Bradley-Terry view (docs/design.md §2.6, paper Eq. 2): PickScore was trained with a softmax over a pair of
    images of exactly these logit-scaled scores, so sigma(s(x, c) - s(x', c)) is its own preference
    probability: ``bt_scale = 1``, ``transform = "identity"``.
    """

    name = "pickscore"
    needs_prompt = True
    bt_scale = 1.0
    transform = "identity"
    higher_is_better = True

    def __init__(
        self,
        model: str | os.PathLike = PICKSCORE_MODEL,
        processor: str | os.PathLike = PICKSCORE_PROCESSOR,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
    ):
        self.encoder = load_encoder(model, processor, device=device, dtype=dtype, crop_rounding="floor")
        self.batch_size = batch_size

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """float32 [B]: exp(logit_scale) · <e_img_b, e_txt_b> with L2-normalised embeddings."""
        e_img = self.encoder.image_features(images)
        e_txt = self.encoder.text_features(prompts)
        return (self.encoder.logit_scale * cosine(e_img, e_txt)).cpu().numpy().astype(np.float32)
