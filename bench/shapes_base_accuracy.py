"""Gold accuracy (capo.shapes.checker) of the shapes base models on the held-out prompts.

Every held-out prompt is sampled with seeds 0..k-1, where k is the smallest count giving each
category at least ``--min-per-category`` samples (the held-out split has 1-221 prompts per
category), at the model's default steps and CFG unless given. Prints one table row per model:
overall (mean over categories, GenEval) and per-category accuracy, plus samples per category.

    python bench/shapes_base_accuracy.py [--kinds vp flow] [--path DIR] [--min-per-category 64]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from capo.models.shapes import load_shapes
from capo.shapes.checker import gold_accuracy
from capo.shapes.world import CATEGORIES, PromptSpec, make_prompts


def heldout_samples(min_per_category: int) -> list[tuple[PromptSpec, int]]:
    """(spec, seed) pairs: each held-out prompt with seeds 0..k_c-1, k_c = ceil(min / n_c)."""
    specs = make_prompts("heldout")
    counts = {c: sum(s.category == c for s in specs) for c in CATEGORIES}
    return [
        (s, seed) for s in specs for seed in range(max(1, math.ceil(min_per_category / counts[s.category])))
    ]


def accuracy(
    kind: str,
    path: str | None,
    steps: int | None,
    guidance: float | None,
    min_per_category: int,
    batch: int = 64,
) -> tuple[dict, dict, float, int, float]:
    """(gold accuracy per category, samples per category, seconds, steps, CFG) of one model."""
    model = load_shapes(kind, path)
    steps = model.default_steps if steps is None else steps
    guidance = model.default_guidance if guidance is None else guidance
    pairs = heldout_samples(min_per_category)
    images, start = [], time.perf_counter()
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        out = model.sample([s.text for s, _ in chunk], [seed for _, seed in chunk], steps, guidance)
        images += [np.asarray(im) for im in out.images]
    seconds = time.perf_counter() - start
    specs = [s for s, _ in pairs]
    n = {c: sum(s.category == c for s in specs) for c in CATEGORIES}
    return gold_accuracy(images, specs), n, seconds, steps, guidance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["vp", "flow"])
    parser.add_argument("--path", default=None, help="a saved model dir (one kind) instead of shipped")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--min-per-category", type=int, default=64)
    args = parser.parse_args()
    print("| model | steps | CFG | overall | " + " | ".join(CATEGORIES) + " |")
    print("|---|---|---|---|" + "---|" * len(CATEGORIES))
    for kind in args.kinds:
        acc, n, seconds, steps, guidance = accuracy(
            kind, args.path, args.steps, args.guidance, args.min_per_category
        )
        cells = " | ".join(f"{acc[c]:.3f} (n={n[c]})" for c in CATEGORIES)
        print(
            f"| shapes-{kind} | {steps} | {guidance:g} | {acc['overall']:.3f} | {cells} |"
            f"  <!-- {sum(n.values())} samples in {seconds:.0f} s -->"
        )


if __name__ == "__main__":
    main()
