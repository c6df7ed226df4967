"""The networks of the tiny shapes models (docs/design.md §5): word tokenizer, CLIP text encoder, UNet.

Both shapes models (VP and flow) share these parts, built from the same diffusers/transformers
components as the real models: a ``CLIPTextModel`` over a word-level vocabulary and a
``UNet2DConditionModel`` with cross-attention. The UNet works in pixel space on a P x P
pixel-unshuffled image (``NetSize.patch``; P = 2 ships): an image [3, 32, 32] is seen as
[12, 16, 16], which keeps one forward of a CFG batch cheap on a CPU while every pixel is still
predicted (as a patch, like a DiT's patchified input).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from capo.errors import CapoError

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS)


@dataclasses.dataclass(frozen=True)
class NetSize:
    """Widths and depths of one size of the shapes networks."""

    patch: int  # pixel-unshuffle factor P: image [3, H, W] <-> UNet input [3 P², H/P, W/P]
    block_out_channels: tuple[int, ...]
    attention_levels: int  # how many of the deepest UNet levels use cross-attention
    heads: int
    norm_groups: int
    text_width: int
    text_layers: int
    text_heads: int


#: size name -> widths; "default" is what ships, "tiny" keeps tests fast
SIZES: dict[str, NetSize] = {
    "default": NetSize(2, (32, 64), 1, 4, 8, 64, 2, 4),
    "tiny": NetSize(2, (8, 16), 1, 2, 4, 16, 1, 2),
}


def net_size(name: str) -> NetSize:
    """The NetSize called ``name``; an unknown name is a CapoError listing the known ones."""
    if name not in SIZES:
        raise CapoError(f"unknown shapes model size '{name}' (known: {', '.join(SIZES)})")
    return SIZES[name]


class WordTokenizer:
    """Whitespace word-level tokenizer: ``<bos> w_1 ... w_n <eos> <pad> ...`` of fixed length.

    Ids: 0 ``<pad>``, 1 ``<bos>``, 2 ``<eos>``, then the vocabulary in order. A word outside the
    vocabulary, or a prompt longer than ``max_length - 2`` words, is a CapoError naming it.
    """

    def __init__(self, words: Sequence[str], max_length: int):
        self.words = tuple(words)
        self.max_length = int(max_length)
        self.ids = {w: i for i, w in enumerate(SPECIALS + self.words)}
        if len(self.ids) != len(SPECIALS) + len(self.words):
            raise CapoError("tokenizer vocabulary has a duplicate or reserved word")

    @property
    def vocab_size(self) -> int:
        return len(self.ids)

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one prompt, padded to ``max_length``."""
        words = prompt.lower().split()
        if len(words) > self.max_length - 2:
            raise CapoError(f"prompt '{prompt}' has {len(words)} words; the shapes tokenizer "
                            f"takes at most {self.max_length - 2}")
        unknown = [w for w in words if w not in self.ids or w in SPECIALS]
        if unknown:
            raise CapoError(f"prompt '{prompt}': word '{unknown[0]}' is not in the shapes vocabulary")
        ids = [self.ids[BOS], *(self.ids[w] for w in words), self.ids[EOS]]
        return ids + [self.ids[PAD]] * (self.max_length - len(ids))

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """LongTensor [B, max_length] of token ids."""
        return torch.tensor([self.encode(p) for p in prompts], dtype=torch.long).reshape(
            len(prompts), self.max_length
        )

    def to_dict(self) -> dict[str, Any]:
        return {"words": list(self.words), "max_length": self.max_length}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WordTokenizer:
        return cls(data["words"], data["max_length"])


def text_config(size: NetSize, tokenizer: WordTokenizer) -> dict[str, Any]:
    """CLIPTextConfig keywords of a tiny CLIP text encoder (no dropout) for ``tokenizer``."""
    return {
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": size.text_width,
        "intermediate_size": 2 * size.text_width,
        "projection_dim": size.text_width,
        "num_hidden_layers": size.text_layers,
        "num_attention_heads": size.text_heads,
        "max_position_embeddings": tokenizer.max_length,
        "pad_token_id": tokenizer.ids[PAD],
        "bos_token_id": tokenizer.ids[BOS],
        "eos_token_id": tokenizer.ids[EOS],
        "dropout": 0.0,
        "attention_dropout": 0.0,
    }


def unet_config(size: NetSize, image_size: int, channels: int = 3) -> dict[str, Any]:
    """UNet2DConditionModel keywords: cross-attention in the ``attention_levels`` deepest levels.

    Input/output are the pixel-unshuffled image: [channels · P², image_size / P, ...], P = patch.
    """
    levels = len(size.block_out_channels)
    plain = levels - size.attention_levels
    down = ["DownBlock2D"] * plain + ["CrossAttnDownBlock2D"] * size.attention_levels
    up = ["CrossAttnUpBlock2D"] * size.attention_levels + ["UpBlock2D"] * plain
    return {
        "sample_size": image_size // size.patch,
        "in_channels": channels * size.patch**2,
        "out_channels": channels * size.patch**2,
        "block_out_channels": list(size.block_out_channels),
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": 1,
        "cross_attention_dim": size.text_width,
        "attention_head_dim": size.heads,
        "norm_num_groups": size.norm_groups,
        "dropout": 0.0,
    }


def build_text_encoder(config: dict[str, Any]) -> CLIPTextModel:
    """A randomly initialised CLIPTextModel in eval mode from ``text_config`` keywords."""
    return CLIPTextModel(CLIPTextConfig(**config)).eval()


def build_unet(config: dict[str, Any]) -> UNet2DConditionModel:
    """A randomly initialised UNet2DConditionModel in eval mode from ``unet_config`` keywords."""
    return UNet2DConditionModel(**config).eval()


def to_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Image [B, C, H, W] -> UNet input [B, C·P², H/P, W/P] (pixel unshuffle, P = patch)."""
    return torch.nn.functional.pixel_unshuffle(x, patch)


def from_patches(y: torch.Tensor, patch: int) -> torch.Tensor:
    """UNet output [B, C·P², H/P, W/P] -> image-shaped [B, C, H, W] (pixel shuffle)."""
    return torch.nn.functional.pixel_shuffle(y, patch)
