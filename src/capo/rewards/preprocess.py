"""CLIP-style image preprocessing with PIL, numpy and torch only (no torchvision).

Each CLIP-family reward model was trained behind one of three reference pipelines, reproduced here
step for step so that the pixels the network sees are the published ones:

- torchvision / OpenAI ``clip`` / open_clip: ``Resize(size, BICUBIC)`` of the shortest side,
  ``CenterCrop`` with offsets ``int(round((H - h) / 2))``, ``ToTensor`` (/255), ``Normalize``
  (``crop_rounding="round"``).
- transformers ``CLIPImageProcessor``: the same resize, centre-crop offsets ``(H - h) // 2``,
  rescale by 1/255, normalise (``crop_rounding="floor"``).
- HPSv2's open_clip fork (``ResizeMaxSize``): the longest side to ``size``, zero padding to a
  square. HPSv2 applies it after ``ToTensor``, to the float tensor (``TensorResizeMaxSize``, the
  one HPSv2 uses); ``resize="longest_edge_pad"`` is the PIL-first variant of open_clip proper.

The two crop roundings differ only when the resized long side minus the crop is odd.
Images are converted to RGB first (transformers' order; open_clip converts after resizing, which
is the same for RGB inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from capo.errors import CapoError

#: OpenAI CLIP's normalisation constants (``OPENAI_DATASET_MEAN/STD`` in open_clip).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = int(Image.Resampling.BICUBIC)


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_width, new_height): short side -> ``size``, long side -> ``int(size * long / short)``.

    torchvision's ``_compute_resized_output_size`` and transformers' ``get_resize_output_image_size``
    (``default_to_square=False``) both truncate the long side.
    """
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_shortest_edge(image: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize so that the shortest side is ``size`` (torchvision ``Resize(int)`` on a PIL image)."""
    new_size = shortest_edge_size(image.width, image.height, size)
    return image.resize(new_size, resample)


def resize_longest_edge_pad(image: Image.Image, size: int, resample: int) -> Image.Image:
    """HPSv2/open_clip ``ResizeMaxSize(size, fill=0)``: longest side -> ``size``, black pad to square.

    new (h, w) = (round(h * s), round(w * s)) with s = size / max(h, w); padding
    [left, top, right, bottom] = [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2]. Where the reference
    fails, this does not: it skips padding when s == 1 (a non-square image whose long side is already
    ``size`` then has the wrong shape), here padded too; a side rounding to 0 px is kept at 1 px.
    """
    scale = size / float(max(image.height, image.width))
    new_h, new_w = max(1, round(image.height * scale)), max(1, round(image.width * scale))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(image, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def crop_offset_round(extra: int) -> int:
    """torchvision ``CenterCrop``: ``int(round(extra / 2.0))`` (Python rounds half to even)."""
    return int(round(extra / 2.0))


def crop_offset_floor(extra: int) -> int:
    """transformers ``center_crop``: ``extra // 2``."""
    return extra // 2


RESIZES: dict[str, Callable[[Image.Image, int, int], Image.Image]] = {
    "shortest_edge": resize_shortest_edge,
    "longest_edge_pad": resize_longest_edge_pad,
}
CROP_OFFSETS: dict[str, Callable[[int], int]] = {"round": crop_offset_round, "floor": crop_offset_floor}


def center_crop(image: Image.Image, size: int, rounding: str) -> Image.Image:
    """Square centre crop of side ``size``; the image must be at least that large."""
    if image.width < size or image.height < size:
        raise CapoError(f"cannot centre-crop {size}px from a {image.width}x{image.height} image")
    left = CROP_OFFSETS[rounding](image.width - size)
    top = CROP_OFFSETS[rounding](image.height - size)
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1] (torchvision ``ToTensor``: x / 255)."""
    array = np.array(image, dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean_c) / std_c per channel; pixels float32 [..., 3, H, W]."""
    m = torch.as_tensor(mean, dtype=pixels.dtype).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=pixels.dtype).view(3, 1, 1)
    return (pixels - m) / s


def _square(value: Any, key: str) -> int:
    """An int from a processor-config size entry: ``224``, ``{"shortest_edge": 224}`` or h == w."""
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    if isinstance(value, Mapping) and "height" in value and value["height"] == value.get("width"):
        return int(value["height"])
    raise CapoError(f"preprocessor_config.json: unsupported '{key}' {value!r} (need a square size)")


@dataclass(frozen=True)
class ClipPreprocess:
    """PIL images -> normalised float32 pixels [B, 3, crop_size, crop_size]."""

    size: int = 224
    crop_size: int = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = BICUBIC
    resize: str = "shortest_edge"
    crop_rounding: str = "round"

    def __post_init__(self) -> None:
        if self.resize not in RESIZES:
            raise CapoError(f"unknown resize '{self.resize}' (known: {', '.join(RESIZES)})")
        if self.crop_rounding not in CROP_OFFSETS:
            known = ", ".join(CROP_OFFSETS)
            raise CapoError(f"unknown crop_rounding '{self.crop_rounding}' (known: {known})")
        if self.crop_size > self.size:
            raise CapoError(f"crop_size {self.crop_size} is larger than resize size {self.size}")

    def image(self, image: Image.Image) -> torch.Tensor:
        """One image: convert RGB -> resize -> centre crop -> [0, 1] -> normalise; [3, crop, crop]."""
        resized = RESIZES[self.resize](image.convert("RGB"), self.size, self.resample)
        cropped = center_crop(resized, self.crop_size, self.crop_rounding)
        return normalize(to_tensor(cropped), self.mean, self.std)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """A batch: float32 [B, 3, crop_size, crop_size]."""
        return torch.stack([self.image(im) for im in images])

    @classmethod
    def from_processor_config(cls, config: Mapping[str, Any], **overrides: Any) -> ClipPreprocess:
        """Read size, crop, mean, std and resample from a transformers ``preprocessor_config.json``."""
        for flag in ("do_resize", "do_center_crop", "do_normalize"):
            if config.get(flag, True) is False:
                raise CapoError(f"preprocessor_config.json: '{flag}: false' is not supported")
        size = _square(config.get("size", 224), "size")
        fields = {
            "size": size,
            "crop_size": _square(config.get("crop_size", size), "crop_size"),
            "mean": tuple(float(v) for v in config.get("image_mean", OPENAI_CLIP_MEAN)),
            "std": tuple(float(v) for v in config.get("image_std", OPENAI_CLIP_STD)),
            "resample": int(config.get("resample", BICUBIC)),
        }
        return cls(**{**fields, **overrides})


@dataclass(frozen=True)
class TensorResizeMaxSize:
    """HPSv2's ``preprocess_val`` in its order (hpsv2 1.2.0, ``src/open_clip/transform.py``
    ``image_transform(is_train=False, resize_longest_max=True)``): RGB, ``ToTensor`` (x / 255),
    ``ResizeMaxSize`` on the float tensor, ``Normalize``. The resize is torchvision's tensor
    ``F.resize``: ``interpolate(bicubic, align_corners=False, antialias)`` with no clamping, to
    (round(h·s), round(w·s)), s = size / max(h, w); then zero padding [left, top, right, bottom] =
    [pw // 2, ph // 2, pw − pw // 2, ph − ph // 2]. ``antialias=True`` is torchvision's default for
    tensors since 0.17. As in ``resize_longest_edge_pad``, an image whose long side already is
    ``size`` is padded too (the reference skips the pad and returns a non-square tensor)."""

    size: int = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    antialias: bool = True

    def image(self, image: Image.Image) -> torch.Tensor:
        """One image -> float32 [3, size, size]."""
        pixels = to_tensor(image.convert("RGB"))  # [3, h, w]
        h, w = pixels.shape[1:]
        scale = self.size / float(max(h, w))
        if scale != 1.0:
            new = (max(1, round(h * scale)), max(1, round(w * scale)))
            pixels = torch.nn.functional.interpolate(
                pixels[None], size=new, mode="bicubic", align_corners=False, antialias=self.antialias
            )[0]
        pad_h, pad_w = self.size - pixels.shape[1], self.size - pixels.shape[2]
        padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)  # left, right, top, bottom
        pixels = torch.nn.functional.pad(pixels, padding)
        return normalize(pixels, self.mean, self.std)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """A batch: float32 [B, 3, size, size]."""
        return torch.stack([self.image(im) for im in images])
