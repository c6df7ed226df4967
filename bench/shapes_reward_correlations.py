"""Spearman correlations of the three shapes rewards and the gold checker on base-model samples.

    python bench/shapes_reward_correlations.py [--families shapes-vp shapes-flow]
        [--prompts 284] [--samples 4] [--steps N] [--guidance W] [--source models|library]
        [--path FAMILY=DIR ...]

For each base model, samples ``--samples`` images of each of the first ``--prompts`` held-out
prompts (seeds 0..S-1 per prompt), scores them with shapes-alignment, shapes-aesthetic and
shapes-preference, checks them with the gold checker, and prints the Spearman matrix (scipy)
of (alignment, aesthetic, preference, gold) plus GenEval-style gold accuracy per category.
``--source library`` uses the synthetic library of ``capo.recipes.train_preference.make_variant``
(correct, wrong and degraded renders) instead of a model.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import spearmanr

from capo.rewards.base import load_reward
from capo.shapes.checker import check_all, gold_accuracy
from capo.shapes.world import make_prompts

REWARDS = ("shapes-alignment", "shapes-aesthetic", "shapes-preference")


def model_images(family: str, path, specs, samples: int, steps, guidance) -> list:
    from capo.models.base import load_model

    model = load_model(family, path, device="cpu")
    prompts = [s.text for s in specs for _ in range(samples)]
    seeds = [k for _ in specs for k in range(samples)]
    images = []
    for i in range(0, len(prompts), 128):
        out = model.sample(prompts[i : i + 128], seeds[i : i + 128], steps=steps, guidance=guidance)
        images += out.images
    return images


def library_images(specs, samples: int) -> list:
    from PIL import Image

    from capo.recipes.train_preference import make_variant

    rng = np.random.default_rng(0)
    return [Image.fromarray(make_variant(s, rng)) for s in specs for _ in range(samples)]


def report(name: str, images: list, specs) -> None:
    rows = [s for s in specs for _ in range(len(images) // len(specs))]
    prompts = [s.text for s in rows]
    arrays = np.stack([np.asarray(im.convert("RGB")) for im in images])
    columns = {}
    for reward in REWARDS:
        start = time.time()
        columns[reward.removeprefix("shapes-")] = load_reward(reward).score(images, prompts)
        print(f"{reward}: {len(images)} images in {time.time() - start:.2f} s")
    columns["gold"] = check_all(arrays, rows).astype(float)
    names = list(columns)
    rho = spearmanr(np.stack([columns[n] for n in names], 1))[0]
    print(f"\n== {name}: {len(images)} images, Spearman correlations")
    print(" " * 11 + "".join(f"{n:>11}" for n in names))
    for i, n in enumerate(names):
        print(f"{n:>11}" + "".join(f"{rho[i, j]:>11.3f}" for j in range(len(names))))
    acc = gold_accuracy(arrays, rows)
    print("gold accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    print("mean scores: " + ", ".join(f"{n} {columns[n].mean():.3f}" for n in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["shapes-vp", "shapes-flow"])
    parser.add_argument("--prompts", type=int, default=284)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--source", choices=["models", "library"], default="models")
    parser.add_argument(
        "--path", action="append", default=[], help="FAMILY=DIR: a saved model instead of the shipped weights"
    )
    args = parser.parse_args()
    specs = make_prompts("heldout")[: args.prompts]
    if args.source == "library":
        report("synthetic library", library_images(specs, args.samples), specs)
        return
    paths = dict(p.split("=", 1) for p in args.path)
    for family in args.families:
        start = time.time()
        images = model_images(family, paths.get(family), specs, args.samples, args.steps, args.guidance)
        print(f"{family}: sampled {len(images)} images in {time.time() - start:.1f} s")
        report(family, images, specs)


if __name__ == "__main__":
    main()
