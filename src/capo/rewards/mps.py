"""MPS, the Multi-dimensional Preference Score (Zhang et al., CVPR 2024, "Learning Multi-dimensional
Human Preference for Text-to-Image Generation"; github.com/Kwai-Kolors/MPS), overall preference.

Architecture, as reproduced from the reference repository (``trainer/models/clip_model.py`` and
``trainer/models/cross_modeling.py``) and its README inference code:

- a CLIP ViT-H-14 (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, transformers ``CLIPModel``) gives
  *token* features: text T = text_projection(last_hidden_state) [B, 77, D], image
  I = visual_projection(vision last_hidden_state, before post-LayerNorm) [B, 257, D], and the
  pooled text feature t = text_projection(EOS output). The text is tokenised to 77 tokens with
  ``padding="max_length"`` and run *without* an attention mask (as the reference does);
- a condition mask over the prompt tokens: for the condition text C (the overall condition lists
  all 22 preference aspects), S_i = max_j <T_i, C_j>, S = S / max(S), token i is visible iff S_i > 0.01;
- a 4-layer CoCa-style cross model (lucidrains' ``coca_pytorch`` blocks: pre-LayerNorm without bias,
  multi-query attention with one key/value head, SwiGLU feed-forward in parallel; D = 1024,
  16 heads of 64): per layer, image tokens cross-attend to the visible prompt tokens, then a
  parallel self-attention + feed-forward block with rotary position embeddings and CoCa's causal mask;
- the score s(x, c) = exp(logit_scale) · cos(t, cross(I, T, mask)[token 0]).

Assumptions and known differences: the reference's ``ParallelTransformerBlock`` is taken to be
CoCa's, causal mask included; the reference divides S by its maximum over the whole batch of
prompts and was run with one prompt at a time, so here S is normalised per prompt (batch-invariant,
equal to the reference's one-prompt inference); the reference runs in fp16, this runs in fp32 by
default. The checkpoint is a pickled ``nn.Module`` of the repository's classes; it is read with
``torch.load(weights_only=True)``, every class it names replaced by an inert stand-in
(``PickledObject``), so no code from the file runs and the repository is not needed.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from capo.errors import CapoError
from capo.rewards.base import RewardModel
from capo.rewards.clip_common import (
    freeze,
    load_preprocess,
    load_state_dict_file,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_file,
)
from capo.rewards.hpsv2 import VIT_H_14
from capo.rewards.hub import hub_kwargs
from capo.rewards.imagereward import load_exact

#: unverified hub location of the reference ``MPS_overall_checkpoint.pth``; pass a local file if it differs.
MPS_CHECKPOINT = "hf://Kwai-Kolors/MPS/MPS_overall_checkpoint.pth"
#: the reference README's condition for the overall score.
MPS_CONDITION = (
    "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
    "instance, texture, quantity, attributes, position, number, location, word, things."
)
#: condition-mask threshold of the evaluation scripts that produced the published accuracies
#: (``eval_overall_mps_on_hpdv2.py`` line 70, ``eval_overall_mps_on_imagereward.py`` line 71); the
#: README's ``infer_example`` and the training forward (``clip_model.py`` line 122) use 0.01.
MASK_THRESHOLD = 0.3
#: dtype of those scripts: the pickled model runs in half precision (``image_input.half()``, ``mask.half()``).
MPS_DTYPE = "float16"


class PickledObject:
    """Inert stand-in for a class named in a pickle: keeps constructor args and state, runs no code."""

    pickled_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


def module_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a pickled ``nn.Module`` tree of stand-ins: persistent parameters and buffers
    under their dotted names (the ``_parameters`` / ``_buffers`` / ``_modules`` of each module)."""
    state = obj.state if isinstance(obj, PickledObject) else None
    if not isinstance(state, Mapping) or not isinstance(state.get("_modules"), Mapping):
        return {}
    skip = state.get("_non_persistent_buffers_set") or set()
    out = {prefix + k: v.detach() for k, v in state.get("_parameters", {}).items() if v is not None}
    out.update(
        {prefix + k: v for k, v in state.get("_buffers", {}).items() if v is not None and k not in skip}
    )
    for name, child in state["_modules"].items():
        out.update(module_tensors(child, f"{prefix}{name}."))
    return out


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, a pickled state dict, or a pickled whole ``nn.Module`` (the
    reference's format), all through ``torch.load(weights_only=True)``; classes become stand-ins."""
    if path.suffix == ".safetensors":
        return load_state_dict_file(path)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        stubs = [(type(n.rpartition(".")[2], (PickledObject,), {"pickled_name": n}), n) for n in names]
        with torch.serialization.safe_globals(stubs):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CapoError(f"{path}: cannot be read with torch.load(weights_only=True): {msg}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    tensors = module_tensors(obj) if isinstance(obj, PickledObject) else obj
    if (
        not isinstance(tensors, Mapping)
        or not tensors
        or not all(torch.is_tensor(v) for v in tensors.values())
    ):
        raise CapoError(f"{path}: neither a state dict nor a pickled module of tensors")
    return {k.removeprefix("module."): v for k, v in tensors.items()}


class LayerNorm(nn.Module):
    """CoCa's LayerNorm: learnt gain, bias fixed at 0 (a buffer)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class SwiGLU(nn.Module):
    """SwiGLU(x, g) = silu(g) · x, with (x, g) the two halves of the last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class Residual(nn.Module):
    """x + fn(x, ...)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *args) + x


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE angles theta[n, :] = n · inv_freq, duplicated: [N, d]; inv_freq_k = 10000^(-2k/d)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, n: int) -> torch.Tensor:
        freqs = torch.outer(
            torch.arange(n, device=self.inv_freq.device, dtype=self.inv_freq.dtype), self.inv_freq
        )
        return torch.cat((freqs, freqs), dim=-1)


class CrossAttention(nn.Module):
    """Multi-query cross-attention with a parallel SwiGLU feed-forward (CoCa ``CrossAttention``,
    ``parallel_ff=True``): out = W_o softmax(q k^T / sqrt(d) + mask) v + FF(LN(x)), q from LN(x)."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        inner = ff_mult * dim
        self.ff = nn.Sequential(
            nn.Linear(dim, 2 * inner, bias=False), SwiGLU(), nn.Linear(inner, dim, bias=False)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] (image tokens), context [B, M, D] (prompt tokens), mask [B, N, M] (0 / -inf)."""
        x = self.norm(x)
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2) * self.scale  # [B, h, N, d]
        k, v = self.to_kv(context).chunk(2, dim=-1)  # [B, M, d] each, one head shared
        sim = torch.einsum("bhid,bjd->bhij", q, k) + mask.unsqueeze(1)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out) + self.ff(x)


class ParallelTransformerBlock(nn.Module):
    """MPS ``ParallelTransformerBlock`` (``trainer/models/cross_modeling.py`` lines 78-168): one fused
    projection of LN(x) to (q, k, v, ff); multi-query self-attention with rotary embeddings over all
    tokens, plus SwiGLU feed-forward, summed. No mask: ``Cross_model.forward`` (line 290) calls it as
    ``self_attn_ff(query_tokens)``, so its ``attn_mask`` is None and every image token sees every other."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.fused_dims = (heads * dim_head, dim_head, dim_head, 2 * ff_mult * dim)
        self.norm = LayerNorm(dim)
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(ff_mult * dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D] (without the residual)."""
        b, n, _ = x.shape
        q, k, v, ff = self.fused_attn_ff_proj(self.norm(x)).split(self.fused_dims, dim=-1)
        q = q.view(b, n, self.heads, -1).transpose(1, 2)
        angles = self.rotary_emb(n)
        q, k = (t * angles.cos() + rotate_half(t) * angles.sin() for t in (q, k))
        sim = torch.einsum("bhid,bjd->bhij", q * self.scale, k)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.attn_out(out) + self.ff_out(ff)


class CrossModel(nn.Module):
    """MPS ``Cross_model``: layers of [Residual(CrossAttention), Residual(ParallelTransformerBlock)]."""

    def __init__(self, dim: int, layers: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Residual(CrossAttention(dim, dim_head, heads, ff_mult)),
                    Residual(ParallelTransformerBlock(dim, dim_head, heads, ff_mult)),
                ]
            )
            for _ in range(layers)
        )

    def forward(self, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for cross_attn, self_attn_ff in self.layers:
            query = self_attn_ff(cross_attn(query, context, mask))
        return query

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> CrossModel:
        """Sizes read off the tensors (reference: dim 1024, 4 layers, 16 heads of 64, ff_mult 4)."""
        try:
            dim_head = sd["layers.0.0.fn.to_kv.weight"].shape[0] // 2
            inner, dim = sd["layers.0.0.fn.to_q.weight"].shape
            ff_mult = sd["layers.0.0.fn.ff.2.weight"].shape[1] // dim
        except KeyError as err:
            raise CapoError(f"MPS checkpoint: no cross-model tensor {err}") from None
        layers = len({k.split(".")[1] for k in sd})
        return cls(dim, layers, dim_head, inner // dim_head, ff_mult)


def condition_mask(
    text_tokens: torch.Tensor, condition_tokens: torch.Tensor, threshold: float = MASK_THRESHOLD
) -> torch.Tensor:
    """MPS condition mask, additive [B, 1, L]: S_bi = max_j <T_bi, C_j>, S_b /= max_i S_bi,
    0 where S_bi > threshold else -inf. text_tokens [B, L, D], condition_tokens [1, Lc, D]."""
    sim = torch.einsum("bid,bjd->bji", text_tokens, condition_tokens.expand(text_tokens.shape[0], -1, -1))
    sim = sim.amax(dim=1, keepdim=True)  # [B, 1, L]
    sim = sim / sim.amax(dim=-1, keepdim=True)  # per prompt (the reference: max over its batch of one)
    return torch.where(sim > threshold, 0.0, float("-inf")).to(text_tokens.dtype)


def split_checkpoint(tensors: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(CLIPModel tensors under ``model.``, cross-model tensors under ``cross_model.``)."""
    clip, cross = {}, {}
    for key, value in tensors.items():
        if key.endswith("position_ids"):
            continue
        part, _, name = key.partition(".")
        if part not in ("model", "cross_model"):
            raise CapoError(f"MPS checkpoint: unsupported tensor '{key}'")
        (clip if part == "model" else cross)[name] = value
    return clip, cross


class MPS(RewardModel):
    """s(x, c) = exp(logit_scale) · cos(t(c), cross(I(x), T(c), mask(c, condition))[0]), the
    reference README's per-image score (its pairwise softmax is sigma of the score difference).

    ``checkpoint``: a local ``.pth`` / ``.safetensors`` file or ``hf://OWNER/REPO/FILE`` (default
    ``MPS_CHECKPOINT``, unverified: pass the file you downloaded). ``config``: hub id or directory of
    the ViT-H-14 ``config.json``, tokenizer and ``preprocessor_config.json`` (default
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, the reference's processor; its weights are not loaded).
    ``condition``: the condition text (default: the overall condition). ``threshold``: a prompt token
    is visible to the image tokens iff its normalised similarity to the condition exceeds it (default
    0.3, the evaluation scripts' value behind the published accuracies; the README example uses 0.01).
    ``dtype``: default ``"float16"``, as those scripts ran; ``"float32"`` for exact arithmetic.

    Bradley-Terry view (docs/design.md §2.6, paper Eq. 2): MPS is trained with a cross-entropy over the pair's
    two logit-scaled scores, i.e. P(x > x') = sigma(s(x) - s(x')): ``bt_scale = 1``,
    ``transform = "identity"``.
    """

    name = "mps"
    needs_prompt = True
    bt_scale = 1.0
    transform = "identity"
    higher_is_better = True

    def __init__(
        self,
        checkpoint: str | os.PathLike = MPS_CHECKPOINT,
        config: str | os.PathLike = VIT_H_14,
        condition: str = MPS_CONDITION,
        threshold: float = MASK_THRESHOLD,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = MPS_DTYPE,
        batch_size: int = 32,
    ):
        from accelerate import init_empty_weights
        from transformers import CLIPConfig, CLIPModel

        self.device, dt = resolve_device(device), resolve_dtype(dtype)
        try:
            clip_config = CLIPConfig.from_pretrained(os.fspath(config), **hub_kwargs(config))
        except OSError as err:
            raise CapoError(f"cannot load CLIP config '{config}': {str(err).splitlines()[0]}") from None
        path = resolve_file(checkpoint)
        clip_sd, cross_sd = split_checkpoint(read_checkpoint(path))
        with init_empty_weights():
            self.clip, self.cross = CLIPModel(clip_config), CrossModel.from_state_dict(cross_sd)
        load_exact(self.clip, {k: v.to(dt) for k, v in clip_sd.items()}, f"{path} (CLIP part)")
        load_exact(self.cross, {k: v.to(dt) for k, v in cross_sd.items()}, f"{path} (cross model)")
        self.clip, self.cross = freeze(self.clip, self.device, dt), freeze(self.cross, self.device, dt)
        self.tokenizer = load_tokenizer(config)
        self.preprocess = load_preprocess(config, crop_rounding="floor")  # CLIPImageProcessor
        self.condition, self.threshold = condition, float(threshold)
        self.condition_tokens = self.text_tokens([condition])[0]  # [1, L, D]
        self.batch_size = batch_size

    @torch.no_grad()
    def text_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T [B, L, D] projected token outputs, t [B, D] projected EOS output); 77 tokens, no mask."""
        ids = self.tokenizer(
            list(texts), max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True,
            return_tensors="pt",
        )["input_ids"].to(self.device)  # fmt: skip
        out = self.clip.text_model(input_ids=ids)
        return self.clip.text_projection(out.last_hidden_state), self.clip.text_projection(out.pooler_output)

    @torch.no_grad()
    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """float32 [B]: exp(logit_scale) · <t_b / |t_b|, f_b / |f_b|>, f = cross model's token 0."""
        pixels = self.preprocess(images).to(self.device, self.clip.dtype)
        image_tokens = self.clip.visual_projection(
            self.clip.vision_model(pixel_values=pixels).last_hidden_state
        )
        text_tokens, text_eos = self.text_tokens(prompts)
        mask = condition_mask(text_tokens, self.condition_tokens, self.threshold)  # [B, 1, L]
        fused = self.cross(image_tokens, text_tokens, mask.expand(-1, image_tokens.shape[1], -1))[:, 0]
        cos = (F.normalize(text_eos.float(), dim=-1) * F.normalize(fused.float(), dim=-1)).sum(-1)
        return (self.clip.logit_scale.float().exp() * cos).cpu().numpy().astype(np.float32)
