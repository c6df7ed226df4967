"""Three reward models of the shapes world, with different and partly conflicting views (docs/design.md §5).

shapes-alignment (VQAScore-like): a soft probability that the image shows the prompt, built from
  soft detections: every object-sized component k gets a visibility v_k = sigmoid((m_k - 16)/4)
  (m_k its soft mass in px: small objects are partly missed), soft colour probabilities (mean over
  its pixels of softmax_c(-r_c^2 / 2 30^2)) and soft shape probabilities (sigmoids of the checker's
  moment features). Its match to a requested object o is
  mu_k(o) = v_k (0.35 + 0.65 P_k(shape_o)) P_k(colour_o)  (shape identity is under-weighted).
  Requirements: presence 1 - prod_k (1 - mu_k); exact count exp(-(sum_k mu_k - n)^2 / (2 0.4^2));
  relation sigmoid((s - 0.5)/0.1) with s GenEval's relation strength between mu^4-weighted mean
  boxes. P = product of the requirements, raw = 0.02 + 0.96 P in [0.02, 0.98]; BT logit
  1 * logit(raw).
shapes-aesthetic (VILA-like, prompt-blind): raw = 0.25 crisp + 0.2 clean + 0.1 pure + 0.15 saturated
  + 0.3 composition, each term in [0, 1] (see ``aesthetic_terms``); composition prefers few, large,
  centred objects, so it pulls against counting and position prompts. BT logit 10 * raw
  (temperature 0.1).
shapes-preference (MPS-like): ``PreferenceNet``, a small prompt-conditioned CNN trained
  Bradley-Terry by ``python -m capo.recipes.train_preference`` on synthetic pairs; its output is
  already a BT logit (bt_scale 1). Weights ship in ``capo/shapes/weights/preference``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from capo.errors import CapoError
from capo.rewards.base import RewardModel
from capo.shapes import checker
from capo.shapes.world import IMAGE_SIZE, VOCAB, PromptSpec, parse_prompt, relation_strength

COLOR_INDEX = {c: i for i, c in enumerate(checker.COLOR_NAMES)}
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "shapes" / "weights" / "preference"


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def to_arrays(images: Sequence) -> np.ndarray:
    """PIL images (resized to 32x32 when needed) -> uint8 [B, 32, 32, 3]."""
    out = []
    for im in images:
        im = im.convert("RGB") if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
        out.append(np.asarray(im, np.uint8))
    return np.stack(out) if out else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


@functools.lru_cache(maxsize=8192)
def _spec(prompt: str) -> PromptSpec:
    return parse_prompt(prompt)


# ----------------------------------------------------------------------------- alignment


def soft_shapes(skew: np.ndarray, gap: np.ndarray) -> dict[str, np.ndarray]:
    """Soft ``checker.classify_shape`` (sigmoids at the same thresholds), each [M] in [0, 1]."""
    tri = sigmoid((-skew - checker.TRIANGLE_SKEW) / 0.07)
    sq = sigmoid((-gap - checker.KURTOSIS_GAP) / 0.1)
    di = sigmoid((gap - checker.KURTOSIS_GAP) / 0.1)
    return {"circle": np.maximum(1 - sq - di, 0) * (1 - tri), "square": sq * (1 - tri),
            "triangle": tri, "diamond": di * (1 - tri)}


def alignment_probability(vis, color_p, shape_p, boxes, spec: PromptSpec) -> float:
    """P = product of the soft requirements of ``spec`` (module docstring), in [0, 1].

    vis [M], color_p [M, K], shape_p (name -> [M]), boxes [M, 4]: the objects of one image.
    """
    mus = [
        vis * (0.35 + 0.65 * shape_p[o.shape]) * (color_p[:, COLOR_INDEX[o.color]] if o.color else 1)
        for o in spec.objects
    ]
    if spec.category == "counting":
        return float(np.exp(-((mus[0].sum() - spec.objects[0].count) ** 2) / (2 * 0.4**2)))
    p = float(np.prod([1 - np.prod(1 - mu) for mu in mus]))
    if spec.relation is not None and p > 0:
        wa, wb = (mu**4 + 1e-12 for mu in mus)
        s = relation_strength(wa @ boxes / wa.sum(), wb @ boxes / wb.sum(), spec.relation)
        p *= float(sigmoid((s - 0.5) / 0.1))
    return p


def alignment_scores(arrays: np.ndarray, specs: Sequence[PromptSpec]) -> np.ndarray:
    """raw = 0.02 + 0.96 P per image, float64 [B]; arrays uint8 [B, 32, 32, 3]."""
    t = checker.objects(arrays)
    vis = sigmoid((t.mass - 16.0) / 4.0)
    shape_p = soft_shapes(t.skew, t.gap)
    bounds = np.searchsorted(t.image, np.arange(len(arrays) + 1))
    probs = []
    for i, spec in enumerate(specs):
        rows = slice(bounds[i], bounds[i + 1])
        sp = {k: v[rows] for k, v in shape_p.items()}
        probs.append(alignment_probability(vis[rows], t.color_p[rows], sp, t.box[rows], spec))
    return 0.02 + 0.96 * np.asarray(probs, np.float64)


class ShapesAlignment(RewardModel):
    """VQAScore-like soft prompt-image agreement in [0.02, 0.98]; BT logit = logit(raw)."""

    name = "shapes-alignment"
    needs_prompt = True
    bt_scale = 1.0
    transform = "logit"
    batch_size = 256

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        specs = [_spec(p) for p in prompts]
        return alignment_scores(to_arrays(images), specs).astype(np.float32)


# ----------------------------------------------------------------------------- aesthetics


def _masked_mean(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-image mean of x [B, H, W] over mask [B, H, W]; 0 where the mask is empty."""
    return (x * mask).sum((1, 2)) / np.maximum(mask.sum((1, 2)), 1)


def aesthetic_terms(arrays: np.ndarray) -> dict[str, np.ndarray]:
    """Prompt-blind image statistics of uint8 [B, 32, 32, 3], each [B] in [0, 1].

    crisp = 1 - (# pixels with 0.15 < a < 0.85) / (# pixels with a > 0.15)  (a: best coverage)
    clean = exp(-std of background pixels (a < 0.15) / 6);  pure = exp(-mean fg residual / 20)
    saturated = mean chroma (max - min) / 255 of foreground (a >= 0.5) pixels
    composition = mean of 1 / (1 + 0.5 max(n - 1, 0)) (n objects, ``checker.objects``),
    1 - min(d / 12, 1) (d: px from the area-weighted centre of the object boxes to the image
    centre) and min(f / 0.12, 1) (f: object area / image area); 0 without objects.
    """
    arrays = arrays[None] if arrays.ndim == 3 else arrays
    a, r, label = checker.project(arrays)
    best = np.clip(np.take_along_axis(a, label[..., None], -1)[..., 0], -1, 2)
    fg, bg, seen = best >= 0.5, best < 0.15, best > 0.15
    img = arrays.astype(np.float32)
    bg_mean = [_masked_mean(img[..., c], bg) for c in range(3)]
    bg_std = np.mean([np.sqrt(_masked_mean((img[..., c] - bg_mean[c][:, None, None]) ** 2, bg))
                      for c in range(3)], axis=0)
    t = checker.table_of(a, r, label)
    n = np.bincount(t.image, minlength=len(arrays))
    area = np.bincount(t.image, t.area, len(arrays))
    cx, cy = (np.bincount(t.image, t.area * t.box[:, j], len(arrays)) / np.maximum(area, 1)
              for j in (0, 1))
    d = np.hypot(cx - IMAGE_SIZE / 2, cy - IMAGE_SIZE / 2)
    composition = np.where(n > 0, (1 / (1 + 0.5 * np.maximum(n - 1, 0)) + 1 - np.minimum(d / 12, 1)
                                   + np.minimum(area / IMAGE_SIZE**2 / 0.12, 1)) / 3, 0.0)
    return {
        "crisp": 1 - (seen & (best < 0.85)).sum((1, 2)) / np.maximum(seen.sum((1, 2)), 1),
        "clean": np.where(bg.sum((1, 2)) > 1, np.exp(-bg_std / 6), 0.0),
        "pure": np.where(fg.any((1, 2)), np.exp(-_masked_mean(r.min(-1), fg) / 20), 0.0),
        "saturated": _masked_mean((img.max(-1) - img.min(-1)) / 255, fg),
        "composition": composition,
    }


AESTHETIC_WEIGHTS = {"crisp": 0.25, "clean": 0.2, "pure": 0.1, "saturated": 0.15, "composition": 0.3}


def aesthetic_scores(arrays: np.ndarray) -> np.ndarray:
    """raw = sum_j weight_j * term_j (``AESTHETIC_WEIGHTS``), [B] in [0, 1]."""
    terms = aesthetic_terms(arrays)
    return sum(AESTHETIC_WEIGHTS[k] * terms[k] for k in AESTHETIC_WEIGHTS)


class ShapesAesthetic(RewardModel):
    """VILA-like prompt-blind aesthetic score in [0, 1]; BT logit = 10 * raw."""

    name = "shapes-aesthetic"
    needs_prompt = False
    bt_scale = 10.0
    transform = "identity"
    batch_size = 256

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        return aesthetic_scores(to_arrays(images)).astype(np.float32)


# ----------------------------------------------------------------------------- preference


def tokenize(prompts: Sequence[str], max_len: int) -> torch.Tensor:
    """Word ids (VOCAB index + 1, 0 = padding), LongTensor [B, max_len]."""
    index = {w: i + 1 for i, w in enumerate(VOCAB)}
    ids = torch.zeros(len(prompts), max_len, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        words = _spec(prompt).text.split()
        ids[row, : len(words)] = torch.tensor([index[w] for w in words[:max_len]])
    return ids


class PreferenceNet(nn.Module):
    """Prompt-conditioned CNN: images [B, 3, 32, 32] in [-1, 1], tokens [B, L] -> logits [B].

    Text: word embeddings flattened in order (word order matters), linear -> t. Image: two
    stride-2 convs to [2w, 8, 8], FiLM by t (x * (1 + gamma(t)) + beta(t)), one more stride-2
    conv to [2w, 4, 4], flattened and concatenated with t, MLP -> one BT logit.
    """

    def __init__(self, max_len: int = 10, width: int = 32, text_dim: int = 64, embed_dim: int = 16):
        super().__init__()
        w = width
        self.embed = nn.Embedding(len(VOCAB) + 1, embed_dim, padding_idx=0)
        self.text = nn.Linear(max_len * embed_dim, text_dim)
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.film = nn.Linear(text_dim, 4 * w)
        self.down = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.SiLU())
        self.head = nn.Sequential(nn.Linear(2 * w * 16 + text_dim, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        t = torch.nn.functional.silu(self.text(self.embed(tokens).flatten(1)))
        gamma, beta = self.film(t)[:, :, None, None].chunk(2, dim=1)
        h = self.down(self.stem(images) * (1 + gamma) + beta)
        return self.head(torch.cat([h.flatten(1), t], dim=1)).squeeze(1)


def images_to_tensor(arrays: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class ShapesPreference(RewardModel):
    """MPS-like learned preference: ``PreferenceNet`` logit (already BT-scaled, bt_scale 1)."""

    name = "shapes-preference"
    needs_prompt = True
    bt_scale = 1.0
    transform = "identity"
    batch_size = 256

    def __init__(self, weights_path: str | Path | None = None, device: str = "cpu"):
        folder = Path(weights_path) if weights_path else WEIGHTS_DIR
        config_file, weights_file = folder / "config.json", folder / "model.safetensors"
        for f in (config_file, weights_file):
            if not f.is_file():
                raise CapoError("shapes-preference weights not found", path=str(f))
        self.config = json.loads(config_file.read_text())
        self.net = PreferenceNet(**self.config["architecture"])
        self.net.load_state_dict(load_file(str(weights_file)))
        self.net.to(device=device, dtype=torch.float32).eval()
        self.device = device

    @torch.no_grad()
    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        x = images_to_tensor(to_arrays(images)).to(self.device)
        tokens = tokenize(prompts, self.config["architecture"]["max_len"]).to(self.device)
        return self.net(x, tokens).float().cpu().numpy()
