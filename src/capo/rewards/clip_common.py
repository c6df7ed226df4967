"""Shared pieces of the CLIP-family rewards (docs/design.md §4).

- where weights come from: ``resolve_file`` (a local file or ``hf://owner/repo/path``),
  ``hub_or_local_file`` (one file of a hub repo or a local directory), ``load_state_dict_file``
  (safetensors, or ``torch.load(weights_only=True)``);
- loading: ``load_clip_model`` / ``load_tokenizer`` / ``load_preprocess`` for transformers-layout
  repos, ``clip_from_open_clip`` for open_clip-layout checkpoints (HPSv2), through
  ``open_clip_to_transformers``;
- ``ClipEncoder``: a frozen CLIP dual encoder giving L2-normalised fp32 features.

transformers and huggingface_hub are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from capo.devices import resolve_device, resolve_dtype  # noqa: F401 - the rewards import them from here
from capo.errors import CapoError
from capo.rewards.hub import hub_kwargs, revision_for
from capo.rewards.preprocess import ClipPreprocess

HF_SCHEME = "hf://"
def hub_download(repo_id: str, filename: str) -> Path:
    """``hf_hub_download`` (cached; honours HF_HUB_OFFLINE); a failure is one CapoError line."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision_for(repo_id)))
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CapoError(f"cannot fetch '{filename}' from hub repo '{repo_id}': {reason}") from None


def resolve_file(spec: str | os.PathLike) -> Path:
    """A local file, or ``hf://OWNER/REPO/PATH`` downloaded (and cached) by ``hf_hub_download``."""
    text = os.fspath(spec)
    if text.startswith(HF_SCHEME):
        parts = text[len(HF_SCHEME) :].split("/")
        if len(parts) < 3 or not all(parts):
            raise CapoError(f"'{text}': expected hf://OWNER/REPO/PATH/IN/REPO")
        return hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    path = Path(text).expanduser()
    if not path.is_file():
        raise CapoError(f"{path}: checkpoint file not found (give a local file or hf://owner/repo/file)")
    return path


def hub_or_local_file(id_or_dir: str | os.PathLike, filename: str) -> Path:
    """``filename`` inside a local directory, else from the hub repo ``id_or_dir``."""
    local = Path(id_or_dir).expanduser()
    if local.is_dir():
        if not (local / filename).is_file():
            raise CapoError(f"{local / filename}: file not found")
        return local / filename
    return hub_download(os.fspath(id_or_dir), filename)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a torch pickle (``weights_only=True``).

    A pickled ``{"state_dict": {...}}`` (open_clip/HPSv2 training checkpoints) is unwrapped and a
    DistributedDataParallel ``module.`` prefix is dropped.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CapoError(f"{path}: cannot be read with torch.load(weights_only=True): {msg}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CapoError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_preprocess(id_or_dir: str | os.PathLike, **overrides: Any) -> ClipPreprocess:
    """``ClipPreprocess`` from the ``preprocessor_config.json`` of a hub id or local directory."""
    path = hub_or_local_file(id_or_dir, "preprocessor_config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CapoError(f"{path}: invalid JSON ({err.msg}, line {err.lineno})") from None
    return ClipPreprocess.from_processor_config(config, **overrides)


def load_tokenizer(id_or_dir: str | os.PathLike) -> Any:
    """The CLIP tokenizer of a hub id or local directory (transformers ``AutoTokenizer``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(id_or_dir), **hub_kwargs(id_or_dir))
    except OSError as err:
        raise CapoError(f"cannot load tokenizer '{id_or_dir}': {str(err).splitlines()[0]}") from None


def freeze(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Eval mode (no dropout), no gradients, on ``device`` in ``dtype``."""
    return model.eval().requires_grad_(False).to(device=device, dtype=dtype)


def load_clip_model(id_or_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> Any:
    """A transformers ``CLIPModel`` from a hub id or local directory, frozen (``freeze``).

    Loaded in the checkpoint's dtype and then cast, which is exact when upcasting to fp32.
    """
    from transformers import CLIPModel

    try:
        model = CLIPModel.from_pretrained(os.fspath(id_or_dir), **hub_kwargs(id_or_dir))
    except OSError as err:
        raise CapoError(f"cannot load CLIP model '{id_or_dir}': {str(err).splitlines()[0]}") from None
    return freeze(model, device, dtype)


#: open_clip name -> transformers ``CLIPModel`` name, for tensors outside the residual blocks.
OPEN_CLIP_TOP: dict[str, str] = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",
}
#: projections stored as ``x @ P`` ([in, out]) in open_clip and as ``nn.Linear`` ([out, in]) here.
OPEN_CLIP_TRANSPOSED = frozenset({"text_projection", "visual.proj"})
#: residual-block prefixes of the two towers.
OPEN_CLIP_TOWERS: dict[str, str] = {
    "visual.transformer.resblocks.": "vision_model.encoder.layers.",
    "transformer.resblocks.": "text_model.encoder.layers.",
}
#: inside one residual block (``attn.in_proj_*`` is split into q, k, v separately).
OPEN_CLIP_BLOCK: dict[str, str] = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
#: buffers some open_clip versions save that transformers rebuilds itself (the causal text mask).
OPEN_CLIP_IGNORED = frozenset({"attn_mask"})


def _convert_block(prefix: str, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One residual-block tensor; ``name`` like ``attn.in_proj_weight`` or ``mlp.c_fc.bias``."""
    if name.startswith("attn.in_proj_"):
        kind = name.removeprefix("attn.in_proj_")  # "weight" | "bias", rows stacked as [q; k; v]
        q, k, v = value.chunk(3, dim=0)
        return {f"{prefix}self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", (q, k, v), strict=True)}
    module, _, kind = name.rpartition(".")
    if module not in OPEN_CLIP_BLOCK:
        raise CapoError(f"open_clip checkpoint: unsupported block tensor '{name}'")
    return {f"{prefix}{OPEN_CLIP_BLOCK[module]}.{kind}": value}


def open_clip_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip ViT CLIP state dict (e.g. ViT-H-14) to transformers ``CLIPModel`` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in OPEN_CLIP_IGNORED:
            continue
        if key in OPEN_CLIP_TOP:
            out[OPEN_CLIP_TOP[key]] = value.t().contiguous() if key in OPEN_CLIP_TRANSPOSED else value
            continue
        tower = next((t for t in OPEN_CLIP_TOWERS if key.startswith(t)), None)
        if tower is None:
            raise CapoError(f"open_clip checkpoint: unsupported tensor '{key}' (only ViT CLIP is supported)")
        index, _, name = key.removeprefix(tower).partition(".")
        out.update(_convert_block(f"{OPEN_CLIP_TOWERS[tower]}{index}.", name, value))
    return out


def clip_from_open_clip(
    config: Any, state_dict: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> Any:
    """A frozen ``CLIPModel(config)`` holding an open_clip-layout state dict; every tensor must fit."""
    from accelerate import init_empty_weights
    from transformers import CLIPModel

    converted = {k: v.to(dtype) for k, v in open_clip_to_transformers(state_dict).items()}
    with init_empty_weights():  # parameters on the meta device; buffers (position ids) real
        model = CLIPModel(config)
    try:
        result = model.load_state_dict(converted, strict=False, assign=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise CapoError(f"open_clip checkpoint does not fit the CLIP config: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CapoError(
            f"open_clip checkpoint does not fit the CLIP config: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    return freeze(model, device, dtype)


class ClipEncoder:
    """A frozen CLIP dual encoder with its tokenizer and image preprocessing.

    ``image_features`` / ``text_features`` return L2-normalised float32 [B, D] (D = projection_dim),
    so a row-wise dot product is the cosine similarity cos(E_img(x), E_txt(c)).
    """

    def __init__(self, model: Any, tokenizer: Any, preprocess: ClipPreprocess, device: torch.device):
        self.model, self.tokenizer, self.preprocess, self.device = model, tokenizer, preprocess, device
        self.dtype = next(model.parameters()).dtype
        self.context_length = int(model.config.text_config.max_position_embeddings)

    @property
    def logit_scale(self) -> float:
        """CLIP's learnt inverse temperature exp(logit_scale) (100 for OpenAI/LAION CLIP)."""
        return float(self.model.logit_scale.detach().float().exp())

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[B, D]: normalise(visual_projection(pooled vision output)) of the preprocessed images."""
        pixels = self.preprocess(images).to(self.device, self.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, D]: normalise(text_projection(EOS-token output)); prompts truncated to the context length."""
        if self.tokenizer is None:
            raise CapoError("this CLIP encoder was loaded without a tokenizer (image-only)")
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        pooled = self.model.text_model(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        ).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)


def cosine(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Row-wise cos(u_b, v_b) = <u_b, v_b> of normalised features [B, D] -> [B]."""
    return (image_features * text_features).sum(dim=-1)


def load_encoder(
    model: str | os.PathLike,
    processor: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    text: bool = True,
    **preprocess_overrides: Any,
) -> ClipEncoder:
    """A ``ClipEncoder`` from transformers-layout repos: weights from ``model``, tokenizer and
    ``preprocessor_config.json`` from ``processor`` (default: ``model``); ``text=False`` skips the
    tokenizer (image-only rewards)."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    processor = model if processor is None else processor
    tokenizer = load_tokenizer(processor) if text else None
    preprocess = load_preprocess(processor, **preprocess_overrides)
    return ClipEncoder(load_clip_model(model, dev, dt), tokenizer, preprocess, dev)
