"""The exact checker of the shapes world: the gold metric, as GenEval's detector (docs/design.md §5).

``detect`` parses an image back into objects:

1. Colour: each pixel p is projected on the segment from the background b to each palette colour
   c_k, ``a_k = <p - b, c_k - b> / |c_k - b|^2``, residual ``r_k = |p - b - clip(a_k, 0, 1)(c_k - b)|``.
   The pixel takes the colour k* = argmin_k r_k; it is foreground when ``a_k* >= 0.5`` (at least
   half covered, so anti-aliased or blurred edges blend with the background without changing
   hue) and ``r_k* <= MAX_RESIDUAL``.
2. Objects: 8-connected components of each colour's foreground, components smaller than
   ``MIN_AREA`` px (specks) dropped.
3. Shape, from moments of the soft mask w = clip(a_k*, 0, 1) on the component grown by one pixel:
   vertical skewness E[y^3]/E[y^2]^1.5 (an apex-up triangle is -0.57, the others 0) and the kurtosis gap
   dk = kurt(x, y) - kurt(u, v) between the image axes and the diagonals u, v = (x +- y)/sqrt 2,
   kurt(z) = E[z^4]/E[z^2]^2: square -0.6, circle 0, diamond +0.6. Scale-free, so 7 px objects
   classify as well as 11 px ones.
4. Box: the component's bounding box (cx, cy, w, h) in px.

``objects`` runs steps 1-4 vectorised over a batch (an ``ObjectTable``, one row per object);
``detect`` does one image.

``check`` applies GenEval's rules: every requested object is present (``count`` of them exactly
for counting, at least one otherwise; colour must match when the prompt gives one), and for
position the largest detection of A stands in the relation to the largest detection of B by
GenEval's rule (``world.relation_holds``). Extra objects are allowed except in counting.
``gold_accuracy`` averages per category, then over categories (GenEval's overall score).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from capo.shapes.world import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    PromptSpec,
    relation_holds,
)

MIN_AREA = 12
MAX_RESIDUAL = 80.0
TRIANGLE_SKEW = 0.2
KURTOSIS_GAP = 0.2
COLOR_NAMES = tuple(COLORS)
_BG = np.asarray(BACKGROUND, np.float32)
_DIRS = np.asarray([COLORS[c] for c in COLOR_NAMES], np.float32) - _BG  # [K, 3]
_PLANE = np.zeros((3, 3, 3, 3), bool)
_PLANE[1, 1] = True  # 8-connectivity within one (image, colour) plane


@dataclasses.dataclass(frozen=True)
class Detection:
    """One parsed object: shape, colour name, bounding box centre/size (px) and area (px)."""

    shape: str
    color: str
    cx: float
    cy: float
    w: float
    h: float
    area: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.cx, self.cy, self.w, self.h)


def to_array(images) -> np.ndarray:
    """Images (one or a sequence of PIL / uint8 arrays) as float32 [B, H, W, 3] in 0..255."""
    if hasattr(images, "convert") or (isinstance(images, np.ndarray) and images.ndim == 3):
        images = [images]
    arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    if arr.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected {IMAGE_SIZE}x{IMAGE_SIZE} RGB images, got {arr.shape[1:]}")
    return arr.astype(np.float32)


def project(images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel colour projection (step 1): a [B,H,W,K], residual r [B,H,W,K], label [B,H,W].

    a_k = <p - b, d_k> / |d_k|^2, r_k = |p - b - clip(a_k, 0, 1) d_k|, d_k = c_k - b.
    """
    p = to_array(images) - _BG
    d2 = (_DIRS**2).sum(axis=1)
    a = (p @ _DIRS.T) / d2
    c = np.clip(a, 0, 1)  # |p - c d|^2 = |p|^2 - 2 c <p, d> + c^2 |d|^2, <p, d> = a |d|^2
    r2 = (p**2).sum(-1, keepdims=True) - (2 * a - c) * c * d2
    r = np.sqrt(np.maximum(r2, 0))
    return a, r, r.argmin(axis=-1)


def moment_features(ids: np.ndarray, w: np.ndarray, xs: np.ndarray, ys: np.ndarray, n: int):
    """(skew [n], dk [n]) of the soft masks w of objects 1..n (step 3); ids, w, xs, ys flat [P].

    skew = E[y^3] / E[y^2]^1.5, dk = (kurt x + kurt y)/2 - (kurt u + kurt v)/2, kurt z =
    E[z^4] / E[z^2]^2, with x, y centred on the weighted centroid and u, v = (x +- y) / sqrt 2.
    """
    m = np.bincount(ids, w, n + 1)[1:] + 1e-12

    def E(z: np.ndarray) -> np.ndarray:
        return np.bincount(ids, w * z, n + 1)[1:] / m

    x = xs - np.r_[0.0, E(xs)][ids]
    y = ys - np.r_[0.0, E(ys)][ids]
    u, v = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)

    def kurt(z: np.ndarray) -> np.ndarray:
        return E(z**4) / np.maximum(E(z**2) ** 2, 1e-12)

    skew = E(y**3) / np.maximum(E(y**2), 1e-12) ** 1.5
    return skew, (kurt(x) + kurt(y)) / 2 - (kurt(u) + kurt(v)) / 2


def shape_features(w: np.ndarray) -> tuple[float, float]:
    """(vertical skewness, kurtosis gap dk) of one soft mask w [H, W] (step 3)."""
    ys, xs = np.mgrid[: w.shape[0], : w.shape[1]] + 0.5
    skew, gap = moment_features((w > 0).ravel().astype(int), w.ravel(), xs.ravel(), ys.ravel(), 1)
    return float(skew[0]), float(gap[0])


def classify_shape(skew: float, gap: float) -> str:
    """Shape from the step-3 features: skew < -0.2 triangle (apex up, as every drawn triangle);
    else dk < -0.2 square, > 0.2 diamond, otherwise circle."""
    if skew < -TRIANGLE_SKEW:
        return "triangle"
    if gap < -KURTOSIS_GAP:
        return "square"
    return "diamond" if gap > KURTOSIS_GAP else "circle"


@dataclasses.dataclass
class ObjectTable:
    """Every object-sized component of a batch (steps 1-3), one row per object.

    image, color [M] int; area [M] core px; mass [M] soft mass of the grown mask; box [M, 4]
    (cx, cy, w, h) px; skew, gap [M] shape features; color_p [M, K] mean over the core pixels of
    softmax_k(-r_k^2 / (2 * 30^2)) (soft colour, used by the alignment reward); n_images B.
    """

    image: np.ndarray
    color: np.ndarray
    area: np.ndarray
    mass: np.ndarray
    box: np.ndarray
    skew: np.ndarray
    gap: np.ndarray
    color_p: np.ndarray
    n_images: int


def _label_components(a, r, label):
    """Core and grown labels [B, K, H, W] (ids 1..M of components >= MIN_AREA) and weights."""
    best = np.take_along_axis(a, label[..., None], -1)[..., 0]
    fg = (best >= 0.5) & (r.min(axis=-1) <= MAX_RESIDUAL)
    same = label[:, None] == np.arange(len(COLOR_NAMES))[None, :, None, None]
    core, n = ndimage.label(fg[:, None] & same, _PLANE)
    keep = np.bincount(core.ravel(), minlength=n + 1) >= MIN_AREA
    keep[0] = False
    core = (np.cumsum(keep) * keep)[core]
    grown = ndimage.grey_dilation(core, footprint=_PLANE)
    grown = np.where(core > 0, core, np.where(same, grown, 0))
    return core, grown, np.clip(best, 0, 1)[:, None] * same, int(keep.sum())


def objects(images) -> ObjectTable:
    """Parse a batch of images into an ``ObjectTable`` (vectorised steps 1-3)."""
    return table_of(*project(images))


def table_of(a: np.ndarray, r: np.ndarray, label: np.ndarray) -> ObjectTable:
    """The ``ObjectTable`` of a projection (``project``'s outputs); rows sorted by image."""
    core, grown, weights, n = _label_components(a, r, label)
    sel = np.flatnonzero(grown)
    b, k, y, x = np.unravel_index(sel, grown.shape)
    ids = grown.ravel()[sel]
    skew, gap = moment_features(ids, weights.ravel()[sel], x + 0.5, y + 0.5, n)
    r2 = r**2 - (r**2).min(-1, keepdims=True)
    soft = np.exp(-r2 / (2 * 30.0**2))
    soft /= soft.sum(-1, keepdims=True)
    cb, _, cy, cx = np.nonzero(core)
    cid = core[core > 0]
    area = np.bincount(cid, minlength=n + 1)[1:]
    color_p = np.stack([np.bincount(cid, soft[cb, cy, cx, j], n + 1)[1:] for j in range(a.shape[-1])], 1)
    slices = ndimage.find_objects(core)
    lo = np.array([[s[i].start for i in range(4)] for s in slices], int).reshape(-1, 4)
    hi = np.array([[s[i].stop for i in range(4)] for s in slices], int).reshape(-1, 4)
    box = np.stack([(lo[:, 3] + hi[:, 3]) / 2, (lo[:, 2] + hi[:, 2]) / 2,
                    hi[:, 3] - lo[:, 3], hi[:, 2] - lo[:, 2]], 1).astype(float)
    return ObjectTable(lo[:, 0], lo[:, 1], area, np.bincount(ids, weights.ravel()[sel], n + 1)[1:],
                       box, skew, gap, color_p / area[:, None].clip(1), len(a))


def detections(table: ObjectTable) -> list[list[Detection]]:
    """Per image, its ``Detection`` list, largest first."""
    out: list[list[Detection]] = [[] for _ in range(table.n_images)]
    for i in np.argsort(-table.area, kind="stable"):
        shape = classify_shape(table.skew[i], table.gap[i])
        out[table.image[i]].append(Detection(
            shape, COLOR_NAMES[table.color[i]], *map(float, table.box[i]), int(table.area[i])))
    return out


def detect(image) -> list[Detection]:
    """Parse one image (PIL or uint8 [32, 32, 3]) into its objects, largest first."""
    return detections(objects(image))[0]


def _matches(dets: list[Detection], shape: str, color: str | None) -> list[Detection]:
    return [d for d in dets if d.shape == shape and (color is None or d.color == color)]


def check_detections(dets: list[Detection], spec: PromptSpec) -> bool:
    """GenEval's per-prompt rule on parsed objects (see the module docstring)."""
    found = [_matches(dets, o.shape, o.color) for o in spec.objects]
    if spec.category == "counting":
        return len(found[0]) == spec.objects[0].count
    if not all(found):
        return False
    if spec.relation is not None:
        return relation_holds(found[0][0].box, found[1][0].box, spec.relation)
    return True


def check(image, spec: PromptSpec) -> bool:
    """Whether ``image`` is a correct picture of ``spec`` (the gold metric of one sample)."""
    return check_detections(detect(image), spec)


def check_all(images: Sequence, specs: Sequence[PromptSpec], batch_size: int = 256) -> np.ndarray:
    """``check`` of each (image, spec) pair, bool [N], parsed in batches."""
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images but {len(specs)} specs")
    out = []
    for i in range(0, len(images), batch_size):
        dets = detections(objects(images[i : i + batch_size]))
        out += [check_detections(d, s) for d, s in zip(dets, specs[i : i + batch_size], strict=True)]
    return np.array(out, bool)


def gold_accuracy(images: Sequence, specs: Sequence[PromptSpec]) -> dict[str, float]:
    """Per-category accuracy and ``overall`` = mean over the categories present (GenEval)."""
    return accuracy_by_category(check_all(images, specs), [s.category for s in specs])


def accuracy_by_category(ok: np.ndarray, categories: Sequence[str]) -> dict[str, float]:
    """GenEval's summary of verdicts ok [N] (1 = correct) of images of the given categories [N]:
    acc_c = mean of ok over category c, and ``overall`` = (1/|C|) Σ_c acc_c over the categories
    present (in ``CATEGORIES`` order)."""
    ok, cats = np.asarray(ok, dtype=np.float64).reshape(-1), np.asarray(categories)
    acc = {c: float(ok[cats == c].mean()) for c in CATEGORIES if (cats == c).any()}
    return {"overall": float(np.mean(list(acc.values()))) if acc else float("nan"), **acc}
