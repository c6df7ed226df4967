"""ImageReward (Xu et al., 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation"), without the ``image-reward`` package.

The published model (``ImageReward.pt`` + ``med_config.json`` in the hub repo ``THUDM/ImageReward``)
is BLIP: a ViT-L/16 image encoder (224 px) whose patch tokens are cross-attended by a BERT-base text
encoder (BLIP's "MED" in multimodal mode: bidirectional self-attention, then cross-attention to the
image, per layer); the [CLS] output goes through a 5-layer linear MLP. The checkpoint is a plain state
dict of the ``ImageReward`` module, read with ``torch.load(weights_only=True)`` (or a safetensors
conversion) and renamed onto transformers' ``BlipVisionModel`` / ``BlipTextModel``, which were ported
from the same BLIP code (``models/vit.py``, ``models/med.py``).

Assumptions (from the reference repository, ``ImageReward/ImageReward.py``): the text is tokenised by
``bert-base-uncased`` (BLIP adds ``[DEC]``/``[ENC]`` special tokens, which never occur in a prompt,
hence ``vocab_size`` 30524) to ``padding="max_length", max_length=35``, truncated; the input ids are
used as tokenised (first token [CLS]; ``score`` does not swap in ``[ENC]``); the image goes through
``Resize(224, BICUBIC), CenterCrop(224), ToTensor, Normalize(OpenAI CLIP mean/std)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from capo.errors import CapoError
from capo.rewards.base import RewardModel
from capo.rewards.clip_common import (
    freeze,
    hub_or_local_file,
    load_state_dict_file,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from capo.rewards.laion_aesthetic import aesthetic_mlp
from capo.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipPreprocess

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
BERT_TOKENIZER = "google-bert/bert-base-uncased"
#: ImageReward's score normalisation (``self.mean`` / ``self.std`` in ``ImageReward.__init__``).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35
#: BLIP's ``create_vit("large", 224)``: ViT-L/16, LayerNorm eps 1e-6, exact GELU.
VIT_LARGE: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 16,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
}
#: med_config.json fields copied into ``BlipTextConfig``.
MED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "pad_token_id",
)
#: BLIP ViT (timm layout) -> transformers ``BlipVisionModel``, outside the blocks.
VIT_TOP: dict[str, str] = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
#: inside ``blocks.{i}.`` -> ``encoder.layers.{i}.``
VIT_BLOCK: dict[str, str] = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
#: checkpoint tensors the score does not use: BLIP's contrastive projections, position-id buffers.
IGNORED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
IGNORED_SUFFIXES = ("position_ids",)


def imagereward_preprocess(image_size: int = 224) -> ClipPreprocess:
    """ImageReward's ``_transform(224)``: torchvision Resize(shortest side, bicubic), CenterCrop
    (round offsets), ToTensor, Normalize(OpenAI CLIP mean/std) -> float32 [B, 3, 224, 224]."""
    return ClipPreprocess(
        size=image_size,
        crop_size=image_size,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        crop_rounding="round",
    )


def _vit_key(name: str) -> str:
    """One ``blip.visual_encoder.`` tensor name (prefix removed) -> its ``BlipVisionModel`` name."""
    if name in VIT_TOP:
        return VIT_TOP[name]
    head, _, rest = name.partition(".")
    index, _, tail = rest.partition(".")
    module, _, kind = tail.rpartition(".")
    if head != "blocks" or not index.isdigit() or module not in VIT_BLOCK:
        raise CapoError(f"ImageReward checkpoint: unsupported tensor 'blip.visual_encoder.{name}'")
    return f"encoder.layers.{index}.{VIT_BLOCK[module]}.{kind}"


#: checkpoint prefix -> (part, renaming of the rest of the name).
PARTS: dict[str, tuple[str, Any]] = {
    "blip.visual_encoder.": ("vision", _vit_key),
    "blip.text_encoder.": ("text", lambda name: name),
    "mlp.layers.": ("head", lambda name: name),
}


def convert_imagereward_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, dict[str, torch.Tensor]]:
    """Split and rename an ``ImageReward.pt`` state dict: {"vision": BlipVisionModel keys, "text":
    BlipTextModel keys, "head": ``aesthetic_mlp`` keys}; unknown tensors are an error."""
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "head": {}}
    for key, value in state_dict.items():
        if key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES):
            continue
        prefix = next((p for p in PARTS if key.startswith(p)), None)
        if prefix is None:
            raise CapoError(f"ImageReward checkpoint: unsupported tensor '{key}'")
        part, rename = PARTS[prefix]
        parts[part][rename(key.removeprefix(prefix))] = value
    return parts


def load_exact(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Assign ``state_dict`` to ``module`` (built on the meta device); every tensor must fit."""
    try:
        result = module.load_state_dict(dict(state_dict), strict=False, assign=True)
    except RuntimeError as err:
        raise CapoError(f"{what} does not fit the model: {' '.join(str(err).split())[:300]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CapoError(
            f"{what} does not fit the model: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )


def read_json(path: os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``; invalid JSON is a one-line CapoError."""
    try:
        return dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise CapoError(f"{path}: not a JSON object ({err})") from None


class ImageRewardModel(torch.nn.Module):
    """r(x, c) = MLP(h_[CLS]) with h = MED-BERT(c | cross-attention to ViT(x)); raw score [B]."""

    def __init__(self, vision_config: Any, text_config: Any):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = aesthetic_mlp(text_config.hidden_size)

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """pixels [B, 3, H, W], input_ids / attention_mask [B, L] -> unnormalised reward [B]."""
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state  # [B, 1+N, Dv], after ViT norm
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,  # BLIP "multimodal" mode: bidirectional self-attention + cross-attention
        ).last_hidden_state
        return self.head(hidden[:, 0].float()).squeeze(-1)


def build_imagereward(
    state_dict: Mapping[str, torch.Tensor], med_config: Mapping[str, Any], vit: Mapping[str, Any]
) -> ImageRewardModel:
    """An ``ImageRewardModel`` holding an ``ImageReward.pt``-layout state dict (fp as stored)."""
    from accelerate import init_empty_weights
    from transformers import BlipTextConfig, BlipVisionConfig

    missing = [k for k in MED_FIELDS if k not in med_config]
    if missing:
        raise CapoError(f"{MED_CONFIG_FILE}: missing '{missing[0]}'")
    vision_config = BlipVisionConfig(**vit)
    # is_decoder=True only makes transformers build the cross-attention layers (med_config's
    # add_cross_attention); forward runs with is_decoder=False, i.e. bidirectional.
    text_config = BlipTextConfig(
        **{k: med_config[k] for k in MED_FIELDS},
        encoder_hidden_size=vision_config.hidden_size,
        is_decoder=True,
    )
    parts = convert_imagereward_state_dict(state_dict)
    with init_empty_weights():
        model = ImageRewardModel(vision_config, text_config)
    load_exact(model.vision, parts["vision"], "ImageReward visual encoder")
    load_exact(model.text, parts["text"], "ImageReward text encoder")
    load_exact(model.head, parts["head"], "ImageReward MLP head")
    return model


class ImageReward(RewardModel):
    """s(x, c) = (r(x, c) - mu) / sd with r = MLP(MED-BERT_[CLS](c, ViT-L(x))), mu = 0.1672, sd = 1.0333:
    ``ImageReward.score`` (the normalised score, about N(0, 1) over its training images).

    ``model``: hub id or local directory holding ``filename`` (default ``ImageReward.pt``; a
    ``.safetensors`` conversion also works) and ``med_config.json`` (default ``THUDM/ImageReward``).
    ``tokenizer``: hub id or directory of the BERT tokenizer (default ``google-bert/bert-base-uncased``).
    ``vit``: ``BlipVisionConfig`` fields of the image encoder (default ``VIT_LARGE``, BLIP's ViT-L/16).

    Bradley-Terry view (docs/design.md §2.6, paper Eq. 2): ImageReward is trained with the pairwise loss
    -log sigma(r(x_w) - r(x_l)) on the raw MLP output r, so r is the BT logit; the reported score is
    s = (r - mu) / sd, hence r(x) - r(x') = sd · (s(x) - s(x')): ``bt_scale = sd = 1.0333``,
    ``transform = "identity"``.
    """

    name = "imagereward"
    needs_prompt = True
    bt_scale = REWARD_STD
    transform = "identity"
    higher_is_better = True

    def __init__(
        self,
        model: str | os.PathLike = IMAGEREWARD_REPO,
        filename: str = IMAGEREWARD_FILE,
        tokenizer: str | os.PathLike = BERT_TOKENIZER,
        vit: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
    ):
        self.device, dt = resolve_device(device), resolve_dtype(dtype)
        med_config = read_json(hub_or_local_file(model, MED_CONFIG_FILE))
        state_dict = load_state_dict_file(hub_or_local_file(model, filename))
        vit = dict(VIT_LARGE if vit is None else vit)
        self.model = freeze(build_imagereward(state_dict, med_config, vit), self.device, dt)
        self.model.head.to(torch.float32)  # the head reads the fp32 [CLS] feature, as the reference
        self.tokenizer = load_tokenizer(tokenizer)
        self.preprocess = imagereward_preprocess(int(vit["image_size"]))
        self.batch_size = batch_size

    @torch.no_grad()
    def raw_reward(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """r(x, c), float32 [B]: the MLP output before normalisation."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=MAX_TEXT_LENGTH,
            return_tensors="pt",
        )
        dtype = next(self.model.vision.parameters()).dtype
        pixels = self.preprocess(images).to(self.device, dtype)
        return self.model(
            pixels, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        ).float()

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """float32 [B]: (r - mu) / sd."""
        s = (self.raw_reward(images, prompts) - REWARD_MEAN) / REWARD_STD
        return s.cpu().numpy().astype(np.float32)
