"""The shapes world: prompts in GenEval's six categories, scenes, and a renderer (docs/design.md §5).

Images are ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB uint8 on a plain dark ``BACKGROUND``. Objects are
one of ``SHAPES`` (circle, square, triangle with its apex up, diamond) in one of ``COLORS`` (six
saturated hues, pairwise cosine of their directions from the background <= 0.85 so a pixel's
colour is read off reliably even when blended with the background). An object of size ``s``
(7-11 px) fills the box of side ``s`` centred on ``(cx, cy)``; scenes are drawn 4x supersampled
and box-filtered, so edges are anti-aliased. Layout randomness: object sizes, positions
(bounding boxes at least ``GAP`` px apart) and a +-12 per-channel shade jitter of each object.

Grammar (regular, so ``parse_prompt`` inverts ``PromptSpec.text`` exactly)::

    single_object  a SHAPE                              "a circle"
    two_object     a SHAPE and a SHAPE'                 "a circle and a square"
    counting       NUM [COLOR] SHAPE(s)                 "three red circles", "one square"
    colors         a COLOR SHAPE                        "a red circle"
    position       a COLOR SHAPE REL a COLOR' SHAPE'    "a red circle left of a blue square"
    color_attr     a COLOR SHAPE and a COLOR' SHAPE     "a red circle and a blue circle"

with REL in {left of, right of, above, below}, NUM in one..four, two_object shapes distinct,
position objects distinct, color_attr colours distinct. The train / validation / test split is
deterministic: within each category prompts are ordered by the SHA-1 of their text, the first
``k = max(1, round(HELDOUT_FRACTION * n))`` are the test set (``heldout`` is its old name), the
next k the validation set, the rest train; so the three share no prompt and every category is in
each (2,272 train, 284 validation, 284 test prompts). ``trainval`` is validation + train in the
order of the earlier two-way split (the pool the shipped preference reward was trained on).
Validation and test are small in some categories (single_object: 1 prompt each), so they are
evaluated category-balanced as GenEval is (``capo.pipeline.prompts.balanced_plan``: each category
gets the same number of images, ``EVAL_IMAGES_PER_CATEGORY``, small categories more seeds each).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools

import numpy as np

from capo.errors import CapoError

IMAGE_SIZE = 32
SUPERSAMPLE = 4
GAP = 2.0
SIZE_RANGE = (7.0, 11.0)
SHADE_JITTER = 12
HELDOUT_FRACTION = 0.1
#: images per category of a balanced validation / test evaluation (GenEval-style, >= 64)
EVAL_IMAGES_PER_CATEGORY = 64
SPLITS = ("train", "val", "test", "heldout", "trainval", "all")
BACKGROUND = (16, 16, 16)
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (235, 40, 40),
    "yellow": (235, 220, 35),
    "green": (40, 200, 50),
    "cyan": (35, 220, 220),
    "blue": (50, 70, 250),
    "magenta": (230, 50, 230),
}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = ("one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
VOCAB: tuple[str, ...] = tuple(
    ["a", "and", "of", "left", "right", "above", "below", *NUMBERS, *COLORS, *SHAPES]
    + [s + "s" for s in SHAPES]
)


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """What a prompt asks for: ``count`` objects of ``shape`` (in ``color`` when not None)."""

    shape: str
    color: str | None = None
    count: int = 1


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """One prompt: ``objects[0] relation objects[1]`` for position, else the listed objects."""

    prompt_id: str
    text: str
    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One drawn object: bounding box of side ``size`` centred on (cx, cy) px, fill ``rgb``."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float
    rgb: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]


def _phrase(obj: ObjectSpec, counting: bool) -> str:
    words = [NUMBERS[obj.count - 1] if counting else "a"]
    words += [obj.color] if obj.color else []
    words += [obj.shape + ("s" if counting and obj.count > 1 else "")]
    return " ".join(words)


def spec_text(category: str, objects: tuple[ObjectSpec, ...], relation: str | None) -> str:
    """The prompt text of a category, its objects and relation (the grammar above)."""
    if category == "counting":
        return _phrase(objects[0], counting=True)
    joiner = f" {relation} " if relation else " and "
    return joiner.join(_phrase(o, counting=False) for o in objects)


def make_spec(category: str, objects: tuple[ObjectSpec, ...], relation: str | None = None):
    """A PromptSpec with its text and id ``CATEGORY-<sha1(text)[:8]>``."""
    text = spec_text(category, objects, relation)
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return PromptSpec(f"{category}-{digest}", text, category, tuple(objects), relation)


def _enumerate(category: str) -> list[tuple[tuple[ObjectSpec, ...], str | None]]:
    O, cols, pairs = ObjectSpec, list(COLORS), list(itertools.product(COLORS, SHAPES))
    table = {
        "single_object": lambda: [((O(s),), None) for s in SHAPES],
        "two_object": lambda: [
            ((O(a), O(b)), None) for a, b in itertools.permutations(SHAPES, 2)
        ],
        "counting": lambda: [
            ((O(s, c, n),), None) for n in range(1, 5) for c in [None, *cols] for s in SHAPES
        ],
        "colors": lambda: [((O(s, c),), None) for c, s in pairs],
        "position": lambda: [
            ((O(a[1], a[0]), O(b[1], b[0])), r)
            for a, b in itertools.permutations(pairs, 2)
            for r in RELATIONS
        ],
        "color_attr": lambda: [
            ((O(s1, c1), O(s2, c2)), None)
            for c1, c2 in itertools.permutations(cols, 2)
            for s1, s2 in itertools.product(SHAPES, SHAPES)
        ],
    }
    return table[category]()


@functools.lru_cache(maxsize=1)
def _all_prompts() -> dict[str, tuple[PromptSpec, ...]]:
    out: dict[str, list[PromptSpec]] = {"train": [], "val": [], "test": [], "trainval": []}
    for cat in CATEGORIES:
        specs = [make_spec(cat, objs, rel) for objs, rel in _enumerate(cat)]
        specs.sort(key=lambda s: hashlib.sha1(s.text.encode()).hexdigest())
        k = max(1, round(HELDOUT_FRACTION * len(specs)))
        out["test"] += specs[:k]
        out["val"] += specs[k : 2 * k]
        out["train"] += specs[2 * k :]
        out["trainval"] += specs[k:]
    return {k: tuple(v) for k, v in out.items()}


def make_prompts(split: str) -> list[PromptSpec]:
    """The deterministic prompt list of ``split``: "train" | "val" | "test" (= "heldout") |
    "trainval" (val + train) | "all" (trainval + test: the order pretraining draws from)."""
    table = _all_prompts()
    if split == "all":
        return [*table["trainval"], *table["test"]]
    if split == "heldout":
        return list(table["test"])
    if split not in table:
        raise CapoError(f"unknown shapes split '{split}' (known: {', '.join(SPLITS)})")
    return list(table[split])


def _parse_object(words: list[str], counting: bool) -> ObjectSpec:
    if not words or (words[0] not in NUMBERS if counting else words[0] != "a"):
        raise ValueError
    count = NUMBERS.index(words[0]) + 1 if counting else 1
    color = words[1] if len(words) == 3 else None
    noun = words[-1]
    shape = noun[:-1] if counting and count > 1 else noun
    if len(words) not in (2, 3) or (color is not None and color not in COLORS):
        raise ValueError
    if shape not in SHAPES:
        raise ValueError
    return ObjectSpec(shape, color, count)


def _split_two(words: list[str]) -> tuple[list[str], list[str], str | None]:
    for i, w in enumerate(words):
        if w == "and":
            return words[:i], words[i + 1 :], None
        if w in ("above", "below"):
            return words[:i], words[i + 1 :], w
        if w in ("left", "right") and words[i + 1 : i + 2] == ["of"]:
            return words[:i], words[i + 2 :], f"{w} of"
    return words, [], None


def _category(objects: tuple[ObjectSpec, ...], relation: str | None) -> str:
    colored = [o.color is not None for o in objects]
    if len(objects) == 1:
        return "colors" if colored[0] else "single_object"
    if relation is not None and all(colored) and objects[0] != objects[1]:
        return "position"
    if relation is None and not any(colored) and objects[0].shape != objects[1].shape:
        return "two_object"
    if relation is None and all(colored) and objects[0].color != objects[1].color:
        return "color_attr"
    raise ValueError


def parse_prompt(text: str) -> PromptSpec:
    """Invert ``spec_text``: the PromptSpec of a prompt of the grammar; otherwise CapoError."""
    words = text.split()
    try:
        if words and words[0] in NUMBERS:
            spec = make_spec("counting", (_parse_object(words, counting=True),))
        else:
            first, second, relation = _split_two(words)
            objs = (_parse_object(first, False),)
            objs += (_parse_object(second, False),) if second else ()
            if len(objs) == 1 and len(first) != len(words):
                raise ValueError
            spec = make_spec(_category(objs, relation), objs, relation)
    except (ValueError, IndexError):
        raise CapoError(f"prompt '{text}' is not in the shapes grammar") from None
    if spec.text != text:
        raise CapoError(f"prompt '{text}' is not in the shapes grammar (expected '{spec.text}')")
    return spec



# ----------------------------------------------------------------------------- relations

POSITION_THRESHOLD = 0.1
SAMPLE_MARGIN = 0.65


def relation_strength(box_a, box_b, relation: str) -> float:
    """GenEval's relative position of box A to box B along ``relation``'s axis.

    Boxes are (cx, cy, w, h) in px, y down. offset = c_A - c_B; the revised offset shrinks
    |offset| by 0.1 (w_A + w_B, h_A + h_B) (floored at 0), and the strength is the signed
    revised component over |offset|: "left of" is -dx, "right of" dx, "above" -dy, "below" dy.
    GenEval counts the relation as holding when the strength exceeds 0.5.
    """
    a, b = np.asarray(box_a, float), np.asarray(box_b, float)
    offset = a[:2] - b[:2]
    norm = float(np.linalg.norm(offset))
    if norm < 1e-6:
        return 0.0
    shrink = POSITION_THRESHOLD * (a[2:] + b[2:])
    revised = np.maximum(np.abs(offset) - shrink, 0.0) * np.sign(offset) / norm
    axis_sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
    axis, sign = axis_sign[relation]
    return float(sign * revised[axis])


def relation_holds(box_a, box_b, relation: str) -> bool:
    """Whether ``A relation B`` holds by GenEval's rule (strength > 0.5)."""
    return relation_strength(box_a, box_b, relation) > 0.5


# ----------------------------------------------------------------------------- scenes


def _wanted(spec: PromptSpec, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(shape, colour) of each object to draw; a missing colour is drawn at random."""
    out = []
    for obj in spec.objects:
        for _ in range(obj.count):
            out.append((obj.shape, obj.color or str(rng.choice(list(COLORS)))))
    return out


def _place(sizes: list[float], rng: np.random.Generator, tries: int = 200) -> list | None:
    """Centres for boxes of the given sides, inside the image and ``GAP`` px apart, or None."""
    centres: list[tuple[float, float]] = []
    for s in sizes:
        for _ in range(tries):
            c = rng.uniform(s / 2 + 1, IMAGE_SIZE - s / 2 - 1, size=2)
            if all(
                max(abs(c[0] - x), abs(c[1] - y)) >= (s + t) / 2 + GAP
                for (x, y), t in zip(centres, sizes, strict=False)
            ):
                centres.append((float(c[0]), float(c[1])))
                break
        else:
            return None
    return centres


def sample_scene(spec: PromptSpec, rng: np.random.Generator) -> Scene:
    """A random correct scene for ``spec``: random sizes, positions and shades (layout noise)."""
    wanted = _wanted(spec, rng)
    high = SIZE_RANGE[1] if len(wanted) <= 2 else 9.5
    while True:
        sizes = [float(rng.uniform(SIZE_RANGE[0], high)) for _ in wanted]
        centres = _place(sizes, rng)
        if centres is None:
            continue
        boxes = [(x, y, s, s) for (x, y), s in zip(centres, sizes, strict=True)]
        if spec.relation and relation_strength(*boxes[:2], spec.relation) < SAMPLE_MARGIN:
            continue
        break
    objects = []
    for (shape, color), (x, y), s in zip(wanted, centres, sizes, strict=True):
        shade = np.asarray(COLORS[color]) + rng.integers(-SHADE_JITTER, SHADE_JITTER + 1, 3)
        rgb = tuple(int(v) for v in np.clip(shade, 0, 255))
        objects.append(SceneObject(shape, color, x, y, s, rgb))
    return Scene(tuple(objects))


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Point-in-shape test for offsets (dx, dy) from the centre of a box of half-side r."""
    table = {
        "circle": lambda: dx**2 + dy**2 <= r**2,
        "square": lambda: (np.abs(dx) <= r) & (np.abs(dy) <= r),
        "triangle": lambda: (dy <= r) & (np.abs(dx) <= (dy + r) / 2),
        "diamond": lambda: np.abs(dx) + np.abs(dy) <= r,
    }
    return table[shape]()


def coverage(obj: SceneObject) -> np.ndarray:
    """Fraction of each pixel covered by ``obj``, float32 [H, W] (4x4 supersampling)."""
    k, n = SUPERSAMPLE, IMAGE_SIZE
    u = (np.arange(n * k) + 0.5) / k
    inside = _inside(obj.shape, u[None, :] - obj.cx, u[:, None] - obj.cy, obj.size / 2)
    return inside.reshape(n, k, n, k).mean(axis=(1, 3)).astype(np.float32)


def render(scene: Scene) -> np.ndarray:
    """The scene drawn over ``BACKGROUND``, uint8 [IMAGE_SIZE, IMAGE_SIZE, 3].

    image = background composited with each object: I <- (1 - a) I + a rgb, a = coverage.
    """
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    img[:] = BACKGROUND
    for obj in scene.objects:
        a = coverage(obj)[..., None]
        img = (1 - a) * img + a * np.asarray(obj.rgb, np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- data


def corrupt_spec(spec: PromptSpec, rng: np.random.Generator) -> PromptSpec:
    """A prompt that a correct image of ``spec`` certainly fails (a noisy caption).

    single_object / colors: another shape / colour; two_object: one shape replaced by one not
    in the prompt; counting: another count; position: the opposite relation; color_attr:
    colours swapped (or, for two equal shapes, one colour replaced by a third).
    """
    o = spec.objects
    other = lambda pool, avoid: str(rng.choice([v for v in pool if v not in avoid]))  # noqa: E731
    rep = dataclasses.replace
    table = {
        "single_object": lambda: (rep(o[0], shape=other(SHAPES, {o[0].shape})),),
        "colors": lambda: (rep(o[0], color=other(COLORS, {o[0].color})),),
        "two_object": lambda: (o[0], rep(o[1], shape=other(SHAPES, {o[0].shape, o[1].shape}))),
        "counting": lambda: (rep(o[0], count=int(other(range(1, 5), {o[0].count}))),),
        "position": lambda: o,
        "color_attr": lambda: (
            (rep(o[0], color=o[1].color), rep(o[1], color=o[0].color))
            if o[0].shape != o[1].shape
            else (rep(o[0], color=other(COLORS, {o[0].color, o[1].color})), o[1])
        ),
    }
    objs = table[spec.category]()
    relation = OPPOSITE[spec.relation] if spec.relation else None
    return make_spec(spec.category, objs, relation)


@functools.lru_cache(maxsize=1)
def _by_category() -> dict[str, tuple[PromptSpec, ...]]:
    specs = make_prompts("all")
    return {c: tuple(s for s in specs if s.category == c) for c in CATEGORIES}


def pretraining_batch(
    rng: np.random.Generator, n: int, caption_noise: float = 0.0
) -> tuple[list[str], np.ndarray]:
    """n (caption, image) pairs: uniform category, uniform prompt, a random correct scene.

    With probability ``caption_noise`` the caption is ``corrupt_spec`` of the drawn prompt (a
    noisy web caption that mis-states a count, relation, colour or shape). Images uint8
    [n, IMAGE_SIZE, IMAGE_SIZE, 3].
    """
    table = _by_category()
    texts, images = [], np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i in range(n):
        pool = table[CATEGORIES[int(rng.integers(len(CATEGORIES)))]]
        spec = pool[int(rng.integers(len(pool)))]
        images[i] = render(sample_scene(spec, rng))
        noisy = rng.random() < caption_noise
        texts.append(corrupt_spec(spec, rng).text if noisy else spec.text)
    return texts, images
