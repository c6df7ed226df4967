"""Train the shapes-preference reward (MPS-like): Bradley-Terry on synthetic comparisons.

Data. A *group* is one prompt and ``group_size`` images of it, each ``make_variant``: a correct
scene (45%), a scene of ``world.corrupt_spec`` (wrong count / colour / shape / relation, 35%) or
a scene with one object missing (20%), then independently blurred (p 0.4, sigma ~ U(0.3, 1.3)),
desaturated (p 0.25), dimmed (p 0.2), noised (p 0.4, sigma ~ U(3, 25)) and specked (p 0.25).
Train groups use train prompts, held-out groups held-out prompts.

Labels. A hidden utility U = a * alignment + b * aesthetic + s * eps, eps ~ N(0, 1), with the raw
shapes-alignment and shapes-aesthetic scores (defaults a = 3, b = 4, s = 0.3: alignment spans
about 3 utility units, aesthetics about 2). Every pair (i, j) of a group is labelled i > j iff U_i > U_j.

Loss (docs/design.md §2.6, Eq. 2): l = -log sigmoid(r(x_w, c) - r(x_l, c)) per pair, averaged, plus
lambda * mean(r^2) (default 0.01; comparisons fix only within-prompt differences, the anchor
keeps every prompt's scores centred on 0 so they compare across prompts); Adam with a cosine
learning-rate decay. Writes ``model.safetensors``, ``config.json`` and ``README.txt``
(the exact command and the held-out figures) into ``out``.

    python -m capo.recipes.train_preference --out src/capo/shapes/weights/preference
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from scipy import ndimage
from scipy.stats import spearmanr
from tqdm import tqdm

from capo.config import add_arguments, build, doc
from capo.errors import CapoError
from capo.rewards.shapes import (
    PreferenceNet,
    aesthetic_scores,
    alignment_scores,
    images_to_tensor,
    tokenize,
)
from capo.shapes.world import (
    BACKGROUND,
    PromptSpec,
    Scene,
    corrupt_spec,
    make_prompts,
    render,
    sample_scene,
)


@dataclasses.dataclass
class PreferenceTrainConfig:
    out: str = doc("output folder for model.safetensors, config.json, README.txt",
                   "src/capo/shapes/weights/preference")
    seed: int = doc("seed of data, labels and initialisation", 0)
    train_groups: int = doc("number of train groups (one train prompt each)", 3000)
    heldout_groups: int = doc("number of held-out groups (one held-out prompt each)", 300)
    group_size: int = doc("images per group; every pair of a group is a comparison", 6)
    steps: int = doc("optimiser steps", 1500)
    batch_pairs: int = doc("pairs per step", 64)
    lr: float = doc("peak Adam learning rate (cosine decay to 0)", 2e-3)
    weight_alignment: float = doc("a: weight of shapes-alignment in the hidden utility", 3.0)
    weight_aesthetic: float = doc("b: weight of shapes-aesthetic in the hidden utility", 4.0)
    utility_noise: float = doc("s: standard deviation of the utility noise", 0.3)
    anchor: float = doc("lambda: weight of the score anchor lambda * mean(r^2)", 0.01)
    width: int = doc("PreferenceNet channel width", 16)
    threads: int = doc("torch CPU threads", 1)

    def validate(self) -> None:
        if self.group_size < 2 or min(self.train_groups, self.heldout_groups, self.steps) < 1:
            raise CapoError("group_size must be >= 2 and groups/steps >= 1")


def make_variant(spec: PromptSpec, rng: np.random.Generator) -> np.ndarray:
    """One comparison image of ``spec`` (module docstring), uint8 [32, 32, 3]."""
    u = rng.random()
    if u < 0.45:
        scene = sample_scene(spec, rng)
    elif u < 0.8:
        scene = sample_scene(corrupt_spec(spec, rng), rng)
    else:
        scene = Scene(sample_scene(spec, rng).objects[1:])
    f = render(scene).astype(np.float32)
    if rng.random() < 0.4:
        sigma = rng.uniform(0.3, 1.3)
        f = ndimage.gaussian_filter(f, (sigma, sigma, 0))
    if rng.random() < 0.25:
        t = rng.uniform(0.2, 0.7)
        f = (1 - t) * f + t * f.mean(-1, keepdims=True)
    if rng.random() < 0.2:
        f = np.asarray(BACKGROUND) + (f - np.asarray(BACKGROUND)) * rng.uniform(0.5, 0.85)
    if rng.random() < 0.4:
        f = f + rng.normal(0, rng.uniform(3, 25), f.shape)
    if rng.random() < 0.25:
        for _ in range(int(rng.integers(2, 7))):
            f[rng.integers(32), rng.integers(32)] = rng.uniform(0, 255, 3)
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def make_groups(split: str, n_groups: int, cfg: PreferenceTrainConfig, rng: np.random.Generator):
    """n_groups groups of ``split`` prompts: dict of images uint8 [G*K, 32, 32, 3], prompts
    [G*K], clean = a * alignment + b * aesthetic [G*K] and utility = clean + s * eps [G*K]."""
    pool = make_prompts(split)
    specs = [pool[int(i)] for i in rng.integers(len(pool), size=n_groups)]
    rows = [s for s in specs for _ in range(cfg.group_size)]
    images = np.stack([make_variant(s, rng) for s in tqdm(rows, desc=f"{split} images")])
    clean = np.concatenate([
        cfg.weight_alignment * alignment_scores(images[i : i + 512], rows[i : i + 512])
        + cfg.weight_aesthetic * aesthetic_scores(images[i : i + 512])
        for i in range(0, len(rows), 512)
    ])
    utility = clean + cfg.utility_noise * rng.standard_normal(len(rows))
    return {"images": images, "prompts": [s.text for s in rows], "clean": clean, "utility": utility}


def group_pairs(n_groups: int, k: int, utility: np.ndarray) -> np.ndarray:
    """(winner, loser) indices [P, 2] of every pair within each group with U_w > U_l."""
    i, j = np.triu_indices(k, 1)
    base = (np.arange(n_groups) * k)[:, None]
    a, b = (base + i).ravel(), (base + j).ravel()
    first_wins = utility[a] > utility[b]
    return np.stack([np.where(first_wins, a, b), np.where(first_wins, b, a)], 1)


def bt_loss(net: PreferenceNet, x: torch.Tensor, tok: torch.Tensor, pairs: torch.Tensor,
            anchor: float) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_w - r_l) (Eq. 2) + anchor * mean(r^2).

    pairs [P, 2] index x and tok. Pairs only fix score differences within a prompt; the anchor
    pins each prompt's scores around 0 so scores are comparable across prompts.
    """
    r = net(x[pairs.ravel()], tok[pairs.ravel()]).view(-1, 2)
    return -torch.nn.functional.logsigmoid(r[:, 0] - r[:, 1]).mean() + anchor * (r**2).mean()


@torch.no_grad()
def scores(net: PreferenceNet, x: torch.Tensor, tok: torch.Tensor) -> np.ndarray:
    return torch.cat([net(x[i : i + 1024], tok[i : i + 1024]) for i in range(0, len(x), 1024)]).numpy()


def train(cfg: PreferenceTrainConfig, command: str = "") -> dict[str, float]:
    """Build the data, train ``PreferenceNet``, write the weights; returns the figures."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    start = time.time()
    arch = {"max_len": 10, "width": cfg.width, "text_dim": 64, "embed_dim": 16}
    sizes = {"train": cfg.train_groups, "heldout": cfg.heldout_groups}
    pools = {"train": "trainval", "heldout": "test"}  # the shipped weights' pools (train + validation)
    data = {s: make_groups(pools[s], n, cfg, rng) for s, n in sizes.items()}
    x = {s: images_to_tensor(d["images"]) for s, d in data.items()}
    tok = {s: tokenize(d["prompts"], arch["max_len"]) for s, d in data.items()}
    pairs = {s: group_pairs(n, cfg.group_size, data[s]["utility"]) for s, n in sizes.items()}
    net = PreferenceNet(**arch)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / cfg.steps)))
    train_pairs = torch.from_numpy(pairs["train"])
    gen = torch.Generator().manual_seed(cfg.seed)
    for step in (bar := tqdm(range(cfg.steps), desc="train")):
        batch = train_pairs[torch.randint(len(train_pairs), (cfg.batch_pairs,), generator=gen)]
        loss = bt_loss(net, x["train"], tok["train"], batch, cfg.anchor)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    figures = evaluate(scores(net, x["heldout"], tok["heldout"]), data["heldout"], pairs["heldout"])
    figures["train_seconds"] = round(time.time() - start, 1)
    save(net, arch, cfg, figures, command)
    return figures


def evaluate(r: np.ndarray, data: dict, pairs: np.ndarray) -> dict[str, float]:
    """Held-out pair accuracy of scores r [N] against the noisy labels and the noise-free
    utility, the share of noisy labels that agree with the noise-free utility (ceiling), and the
    Spearman correlation of r with the noise-free utility pooled over all prompts."""
    w, lo, clean = pairs[:, 0], pairs[:, 1], data["clean"]
    return {
        "heldout_pairs": int(len(pairs)),
        "heldout_pair_accuracy": round(float((r[w] > r[lo]).mean()), 4),
        "heldout_accuracy_vs_noise_free_utility": round(
            float(((r[w] > r[lo]) == (clean[w] > clean[lo])).mean()), 4),
        "label_agreement_with_noise_free_utility": round(float((clean[w] > clean[lo]).mean()), 4),
        "pooled_spearman_vs_noise_free_utility": round(float(spearmanr(r, clean)[0]), 4),
    }


def save(net: PreferenceNet, arch: dict, cfg: PreferenceTrainConfig, figures: dict,
         command: str) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"))
    config = {"architecture": arch, "training": dataclasses.asdict(cfg), "figures": figures}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "README.txt").write_text(
        "shapes-preference reward weights (capo.rewards.shapes.ShapesPreference).\n"
        f"Produced by (from the repository root):\n\n    {command.strip()}\n\n"
        "Training recipe: see the docstring of capo/recipes/train_preference.py.\n"
        f"Held-out figures: {json.dumps(figures)}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capo.recipes.train_preference",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file of PreferenceTrainConfig keys")
    add_arguments(parser, PreferenceTrainConfig)
    args = parser.parse_args(argv)
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        command = " ".join(["python -m capo.recipes.train_preference", *argv])
        figures = train(build(PreferenceTrainConfig, args, args.config), command)
    except CapoError as e:
        print(f"train_preference: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
