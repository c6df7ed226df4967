"""Sampling throughput of the shapes models against the bare-UNet floor.

For each model: B prompts sampled at the model's default steps and CFG scale, batched across
prompts (``adapter.sample``), in images/s; and the floor = the same number of bare UNet forwards
(``steps`` forwards of batch 2B, the CFG batch) on random inputs of the same shapes, timed alone
in the same run. Each figure is the best of ``--repeats`` interleaved runs. Target: sampling
time <= 1.15 x the floor.

    python bench/bench_sampling.py [--kinds vp flow] [--prompts 64] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from capo.models.base import SHAPES_MARKER
from capo.models.shapes import ShapesAdapter, build_shapes_model, load_shapes, shipped_path
from capo.shapes.world import make_prompts


def model_of(kind: str) -> tuple[ShapesAdapter, str]:
    """The shipped model of ``kind`` (a random-init default-size one if none ships yet)."""
    if (shipped_path(kind) / SHAPES_MARKER).is_file():
        return load_shapes(kind), "shipped"
    return build_shapes_model(kind, "default"), "random init (no shipped weights)"


def time_sampling(model: ShapesAdapter, prompts: list[str]) -> float:
    """Seconds for one ``sample`` call of all prompts (default steps and CFG)."""
    start = time.perf_counter()
    model.sample(prompts, list(range(len(prompts))))
    return time.perf_counter() - start


def time_floor(model: ShapesAdapter, batch: int) -> float:
    """Seconds for ``default_steps`` bare UNet forwards of the CFG batch 2B."""
    cfg = model.denoiser.config
    side, channels = cfg.sample_size, cfg.in_channels
    x = torch.randn(2 * batch, channels, side, side)
    t = torch.randint(0, 1000, (2 * batch,))
    emb = torch.randn(2 * batch, model.tokenizer.max_length, cfg.cross_attention_dim)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(model.default_steps):
            model.denoiser(x, t, encoder_hidden_states=emb, return_dict=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["vp", "flow"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = [p.text for p in make_prompts("heldout")][: args.prompts]
    print(f"torch threads: {torch.get_num_threads()}; batch {len(prompts)} prompts")
    print("| model | weights | steps | CFG | sampling img/s | floor img/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        model, source = model_of(kind)
        time_sampling(model, prompts[:2])  # warm-up
        best_s = best_f = float("inf")
        for _ in range(args.repeats):
            best_s = min(best_s, time_sampling(model, prompts))
            best_f = min(best_f, time_floor(model, len(prompts)))
        n = len(prompts)
        print(
            f"| shapes-{kind} | {source} | {model.default_steps} | {model.default_guidance:g} | "
            f"{n / best_s:.1f} | {n / best_f:.1f} | {best_s / best_f:.3f} |"
        )


if __name__ == "__main__":
    main()
