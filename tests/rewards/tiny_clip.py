"""Tiny random-weight CLIP checkpoints for the reward tests (nothing is downloaded).

``save_tiny_clip(dir)`` writes what a hub CLIP repo holds: ``config.json`` + ``model.safetensors``
(transformers ``CLIPModel``), ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` (a CLIP BPE
tokenizer over a handful of tokens) and a LAION-style ``preprocessor_config.json``.
``clip_to_open_clip`` writes a ``CLIPModel`` state dict in open_clip's layout (the HPSv2 checkpoint
layout), independently of the converter under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from capo.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = [("a", "t</w>"), ("o", "g</w>"), ("e", "d</w>")]
#: prompts whose every character is in the tiny vocabulary (unknown characters map to <|endoftext|>).
PROMPTS = ["a red cat", "a blue dog", "the cat sat on a mat", "green"]


def tiny_vocab() -> dict[str, int]:
    """Letters, letters + ``</w>``, the merge results, then BOS and EOS (the two highest ids, as in CLIP)."""
    tokens = list(LETTERS) + [c + "</w>" for c in LETTERS] + ["".join(m) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer(directory: Path) -> dict[str, int]:
    """The slow-tokenizer files of a CLIP repo: vocab.json, merges.txt, tokenizer_config.json."""
    vocab = tiny_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return vocab


def write_processor_config(directory: Path, size: int = 224) -> None:
    """The laion/CLIP-ViT-H-14 preprocessor_config.json (old integer ``size`` / ``crop_size`` form)."""
    config = {
        "crop_size": size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": size,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(config))


def tiny_clip_config(projection_dim: int = 16):
    """CLIPConfig: 2-layer towers of width 32, 4 heads, exact GELU (as ViT-H-14), 224px / patch 32."""
    from transformers import CLIPConfig

    vocab = tiny_vocab()
    text = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )  # fmt: skip
    vision = dict(
        image_size=224, patch_size=32, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, hidden_act="gelu",
    )  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def tiny_clip_model(seed: int = 0, projection_dim: int = 16):
    """A random ``CLIPModel`` in eval mode; weights spread wider than the 0.02 init so that
    different images and prompts give clearly different features."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(projection_dim)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "norm" not in name:
                p.normal_(0.0, 0.2)
    return model


def save_tiny_clip(directory: Path, seed: int = 0, projection_dim: int = 16):
    """Write a complete tiny CLIP repo (weights, tokenizer, preprocessor config); returns the model."""
    directory.mkdir(parents=True, exist_ok=True)
    model = tiny_clip_model(seed, projection_dim)
    model.save_pretrained(directory)
    write_tokenizer(directory)
    write_processor_config(directory)
    return model


def _resblocks(sd: dict, src: str, dst: str, n_layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(n_layers):
        s, d = f"{src}.{i}.", f"{dst}.{i}."
        for kind in ("weight", "bias"):
            out[f"{d}attn.in_proj_{kind}"] = torch.cat([sd[f"{s}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{d}attn.out_proj.{kind}"] = sd[f"{s}self_attn.out_proj.{kind}"]
            out[f"{d}ln_1.{kind}"] = sd[f"{s}layer_norm1.{kind}"]
            out[f"{d}ln_2.{kind}"] = sd[f"{s}layer_norm2.{kind}"]
            out[f"{d}mlp.c_fc.{kind}"] = sd[f"{s}mlp.fc1.{kind}"]
            out[f"{d}mlp.c_proj.{kind}"] = sd[f"{s}mlp.fc2.{kind}"]
    return out


def clip_to_open_clip(model) -> dict[str, torch.Tensor]:
    """A ``CLIPModel``'s weights under open_clip's ``CLIP`` names (as in HPS_v2_compressed.pt)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t, v = "text_model.", "vision_model."
    out = {
        "positional_embedding": sd[t + "embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),
        "logit_scale": sd["logit_scale"],
        "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
        "ln_final.weight": sd[t + "final_layer_norm.weight"],
        "ln_final.bias": sd[t + "final_layer_norm.bias"],
        "visual.class_embedding": sd[v + "embeddings.class_embedding"],
        "visual.positional_embedding": sd[v + "embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].T.contiguous(),
        "visual.conv1.weight": sd[v + "embeddings.patch_embedding.weight"],
        "visual.ln_pre.weight": sd[v + "pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd[v + "pre_layrnorm.bias"],
        "visual.ln_post.weight": sd[v + "post_layernorm.weight"],
        "visual.ln_post.bias": sd[v + "post_layernorm.bias"],
    }
    n_text = model.config.text_config.num_hidden_layers
    n_vision = model.config.vision_config.num_hidden_layers
    out.update(_resblocks(sd, t + "encoder.layers", "transformer.resblocks", n_text))
    out.update(_resblocks(sd, v + "encoder.layers", "visual.transformer.resblocks", n_vision))
    return out


def fixed_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB test image: a smooth gradient plus noise (exercises bicubic resampling)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([255 * xx / max(width - 1, 1), 255 * yy / max(height - 1, 1), 128 + 0 * xx], axis=-1)
    noisy = base + rng.normal(0.0, 40.0, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def fixed_images(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    """``fixed_image(w, h, seed=i)`` for the i-th (w, h)."""
    return [fixed_image(w, h, seed) for seed, (w, h) in enumerate(sizes)]


def score_one_by_one(reward, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
    """Scores from batches of one, to compare with a batched call."""
    return np.concatenate([reward.score_batch([im], [p]) for im, p in zip(images, prompts, strict=True)])


def direct_features(model, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Normalised (image, text) features straight from ``CLIPModel`` (its forward's embeds)."""
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)
    return out.image_embeds, out.text_embeds


# Reference preprocessing, written independently of capo.rewards.preprocess.
MEAN = np.array(OPENAI_CLIP_MEAN, np.float64)[:, None, None]
STD = np.array(OPENAI_CLIP_STD, np.float64)[:, None, None]


def torchvision_reference(image: Image.Image, size: int = 224) -> np.ndarray:
    """open_clip / OpenAI clip val transform written from torchvision's documented algorithm:
    Resize(size, BICUBIC) -> PIL resize of the short side to size, long side int(size*long/short);
    CenterCrop -> top = int(round((H - size) / 2.0)); ToTensor -> /255; Normalize -> (x - m) / s."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    target = (size, new_long) if w <= h else (new_long, size)
    array = np.asarray(image.convert("RGB").resize(target, Image.BICUBIC), np.float64)
    top, left = int(round((array.shape[0] - size) / 2.0)), int(round((array.shape[1] - size) / 2.0))
    chw = array[top : top + size, left : left + size].transpose(2, 0, 1) / 255.0
    return (chw - MEAN) / STD


def resize_max_size_reference(image: Image.Image, size: int = 224) -> np.ndarray:
    """HPSv2's open_clip ``ResizeMaxSize(size, fill=0)`` + ToTensor + Normalize, with numpy padding."""
    w, h = image.size
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    array = np.asarray(image.convert("RGB").resize((new_w, new_h), Image.BICUBIC), np.float64)
    pad_h, pad_w = size - new_h, size - new_w
    padded = np.pad(array, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    return (padded.transpose(2, 0, 1) / 255.0 - MEAN) / STD


def hpsv2_tensor_reference(image: Image.Image, size: int = 224, antialias: bool = True) -> np.ndarray:
    """HPSv2's ``preprocess_val`` as torchvision runs it (hpsv2 1.2.0 ``src/open_clip/transform.py``
    lines 140-157, ``ResizeMaxSize`` lines 26-49): ``ToTensor`` = uint8 HWC -> float CHW / 255;
    ``F.resize`` of a float tensor = ``torch.nn.functional.interpolate(img[None], [h, w], mode="bicubic",
    align_corners=False, antialias=antialias)`` without clamping (torchvision
    ``_functional_tensor.resize``); ``F.pad(padding=[l, t, r, b], fill=0)`` = constant zero padding;
    ``Normalize``. Computed in float64 except the resize (float32, as torchvision)."""
    chw = torch.from_numpy(np.asarray(image.convert("RGB"), np.uint8).copy()).permute(2, 0, 1).float() / 255
    height, width = chw.shape[1:]
    scale = size / float(max(height, width))
    new_h, new_w = round(height * scale), round(width * scale)
    resized = torch.nn.functional.interpolate(
        chw[None], size=[new_h, new_w], mode="bicubic", align_corners=False, antialias=antialias
    )[0].double().numpy()
    pad_h, pad_w = size - new_h, size - new_w
    padded = np.pad(resized, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)))
    return (padded - MEAN) / STD


def transformers_reference(images: list[Image.Image], directory: Path | None = None) -> np.ndarray:
    """transformers' own CLIPImageProcessor algorithm (its PIL backend; the default backend needs
    torchvision), from ``directory``'s preprocessor_config.json or laion/CLIP-ViT-H-14's settings."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if directory is not None:
        processor = CLIPImageProcessorPil.from_pretrained(directory)
    else:
        square = {"height": 224, "width": 224}
        processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size=square)
    return np.stack(processor(images=images)["pixel_values"])
