"""HPSv2 and HPSv2.1 (Wu et al., 2023, "Human Preference Score v2"; paper/hpsv2-review.txt).

An open_clip ViT-H-14 CLIP fine-tuned on HPD v2 human choices. The published checkpoints
(``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt`` in the hub repo ``xswu/HPSv2``) are open_clip
state dicts ``{"state_dict": ...}``; they are read with ``torch.load(weights_only=True)`` (or from a
safetensors conversion), renamed to transformers ``CLIPModel`` keys and scored without the
``hpsv2``/``open_clip`` packages.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from capo.errors import CapoError
from capo.rewards.base import RewardModel
from capo.rewards.clip_common import (
    ClipEncoder,
    clip_from_open_clip,
    cosine,
    load_state_dict_file,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_file,
)
from capo.rewards.hub import hub_kwargs
from capo.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TensorResizeMaxSize

#: transformers config (and tokenizer) of open_clip ViT-H-14 laion2B-s32B-b79K, the model HPSv2 fine-tunes.
VIT_H_14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_V2_CHECKPOINT = "hf://xswu/HPSv2/HPS_v2_compressed.pt"
HPS_V21_CHECKPOINT = "hf://xswu/HPSv2/HPS_v2.1_compressed.pt"


def hpsv2_preprocess(image_size: int, antialias: bool = True) -> TensorResizeMaxSize:
    """HPSv2's ``preprocess_val``: its open_clip fork's ``image_transform(image_size, is_train=False,
    resize_longest_max=True)`` = ToTensor, ResizeMaxSize on the float tensor (longest side, bicubic,
    black pad), Normalize(OpenAI mean/std)."""
    return TensorResizeMaxSize(image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, antialias)


class HPSv2(RewardModel):
    """s(x, c) = cos(E_img(x), E_txt(c)), the ``hps_score`` of ``hpsv2.score`` (typically 0.2-0.35).

    ``checkpoint``: a local ``.pt``/``.safetensors`` file or ``hf://OWNER/REPO/FILE`` (default
    ``hf://xswu/HPSv2/HPS_v2_compressed.pt``). ``config``: hub id or local directory of the
    transformers CLIP config and tokenizer of the architecture (default ViT-H-14,
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; its weights are not downloaded). ``antialias``: of the
    bicubic resize of the float tensor (default True, torchvision's default for tensors since 0.17;
    False reproduces hpsv2 run with torchvision < 0.17).

    Bradley-Terry view (docs/design.md §2.6, paper Eq. 2): HPSv2 is trained like CLIP, with a softmax over
    ``exp(logit_scale) · cos``, starting from ViT-H-14 whose exp(logit_scale) is 100 (CLIP's clamp),
    so the BT logit is 100 · cos: ``bt_scale = 100``, ``transform = "identity"``. (The loaded
    checkpoint's own value is ``self.encoder.logit_scale``.)
    """

    name = "hpsv2"
    needs_prompt = True
    bt_scale = 100.0
    transform = "identity"
    higher_is_better = True
    default_checkpoint = HPS_V2_CHECKPOINT

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        config: str | os.PathLike = VIT_H_14,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
        antialias: bool = True,
    ):
        from transformers import CLIPConfig

        dev, dt = resolve_device(device), resolve_dtype(dtype)
        try:
            clip_config = CLIPConfig.from_pretrained(os.fspath(config), **hub_kwargs(config))
        except OSError as err:
            raise CapoError(f"cannot load CLIP config '{config}': {str(err).splitlines()[0]}") from None
        state_dict = load_state_dict_file(resolve_file(checkpoint or self.default_checkpoint))
        model = clip_from_open_clip(clip_config, state_dict, dev, dt)
        preprocess = hpsv2_preprocess(int(clip_config.vision_config.image_size), antialias)
        self.encoder = ClipEncoder(model, load_tokenizer(config), preprocess, dev)
        self.batch_size = batch_size

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """float32 [B]: <e_img_b, e_txt_b> with L2-normalised embeddings."""
        e_img = self.encoder.image_features(images)
        e_txt = self.encoder.text_features(prompts)
        return cosine(e_img, e_txt).cpu().numpy().astype(np.float32)


class HPSv21(HPSv2):
    """HPSv2.1: the same model and score with the v2.1 checkpoint
    (``hf://xswu/HPSv2/HPS_v2.1_compressed.pt``); ``bt_scale = 100``, identity, as for HPSv2."""

    name = "hpsv2.1"
    default_checkpoint = HPS_V21_CHECKPOINT
