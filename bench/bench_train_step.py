"""Benchmark: one CaPO training step vs its floor (issue target: step <= 1.25 x floor).

    python bench/bench_train_step.py [--pairs 8] [--reps 20] [--size default] [--objective capo]
        [--full] [--mixed-precision no]

Builds a synthetic run directory (random latents, cached embeddings of shapes prompts, pairs)
for a shapes model (the shipped VP weights if present, else ``build_shapes_model("vp", size)``),
sets up the real recipe (``capo.pipeline.train.setup``) and times, interleaved in one process:

(a) step:  ``optimizer_step`` = draw the pairs, ONE policy forward+backward on [2B], ONE no-grad
           reference forward on [2B], losses, clipping, AdamW, LR schedule, metric reduction;
(b) floor: one policy forward+backward on the same [2B] batch plus one no-grad reference forward
           on it (adapters disabled / the frozen copy), with the same autocast.

Prints the median of each, and the ratio step / floor.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import torch

from capo.config import from_dict
from capo.models.base import DiffusionAdapter
from capo.pipeline.generate import model_spec
from capo.pipeline.rundir import PAIRS_SCHEMA, RunDir, embeddings_table, samples_table, shard_name
from capo.pipeline.rundir import write_table_atomic as write
from capo.pipeline.train import TrainConfig, Trainer, optimizer_step, setup
from capo.schedules import add_noise


def base_model_dir(root: Path, size: str) -> str:
    """The shipped shapes-vp weights if they exist, else a random model of ``size`` saved in root."""
    from capo.models.shapes import build_shapes_model, shipped_path

    shipped = shipped_path("vp")
    if (shipped / "capo_shapes.json").is_file():
        return str(shipped)
    build_shapes_model("vp", size=size, device="cpu").save_pretrained(root / "base")
    return str(root / "base")


def synthetic_run(
    root: Path, model_dir: str, prompts: int = 16, samples: int = 4, adapter: DiffusionAdapter | None = None
) -> RunDir:
    """generate + select outputs: random latents, real cached embeddings, X+ = {0, 1}, X- = {last}.

    ``adapter``: the model of ``model_dir`` already loaded with its text encoders (else loaded on CPU).
    """
    from capo.models.base import detect_family, load_model
    from capo.shapes.world import make_prompts

    run = RunDir.at(root / "run")
    run.write_base_model(model_spec(model_dir, None))
    adapter = adapter or load_model(*detect_family(model_dir), device="cpu")
    specs = make_prompts("train")[:prompts]
    pids = [s.prompt_id for s in specs]
    write(
        embeddings_table(pids, adapter.encode_prompts([s.text for s in specs])),
        run.embeddings_dir / shard_name(0, 0),
    )
    rows = [(p, i) for p in pids for i in range(samples)]
    latents = torch.rand(len(rows), *adapter.latent_shape()) * 2 - 1
    write(
        samples_table(
            [r[0] for r in rows], [r[1] for r in rows], list(range(len(rows))), [b""] * len(rows), latents
        ),
        run.samples_dir / shard_name(0, 0),
    )
    pairs = {
        "prompt_id": pids,
        "positives": [[0, 1]] * prompts,
        "negatives": [[samples - 1]] * prompts,
        "pos_rca": [[0.8, 0.7]] * prompts,
        "neg_rca": [[0.2]] * prompts,
        "rule": ["frs"] * prompts,
    }
    write(pa.table(pairs, schema=PAIRS_SCHEMA), run.pairs_path)
    return run


def floor_fn(tr: Trainer) -> Callable[[], None]:
    """One policy forward+backward and one no-grad reference forward on a fixed [2B] batch."""
    b = tr.data.batch(0, 0, tr.config.batch_size, 0, 1, tr.adapter.schedule.sample_t)
    b = b.to(tr.accelerator.device)
    t = torch.cat([b.t[:, 0], b.t[:, 0]])  # the first (t, noise) draw of each pair
    x_t = add_noise(
        torch.cat([b.x_pos, b.x_neg]), torch.cat([b.eps_pos[:, 0], b.eps_neg[:, 0]]), t, tr.adapter.schedule
    )
    emb = {k: torch.cat([v, v]) for k, v in b.emb.items()}

    def floor() -> None:
        with tr.accelerator.autocast():
            tr.adapter.denoise(x_t, t, emb).float().square().mean().backward()
            with torch.no_grad(), tr.reference.active():
                tr.adapter.denoise(x_t, t, emb)
        tr.optimizer.zero_grad(set_to_none=True)

    return floor


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8, help="B pairs per step (the forward batch is 2B)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--size", default="default", help="shapes model size when no shipped weights exist")
    ap.add_argument("--objective", default="capo")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--mixed-precision", default="no")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = synthetic_run(Path(tmp), base_model_dir(Path(tmp), args.size))
        tr = setup(
            from_dict(
                TrainConfig,
                {
                    "run": str(run.root),
                    "objective": args.objective,
                    "batch_size": args.pairs,
                    "lora": not args.full,
                    "max_steps": 10**6,
                    "log_with": "none",
                    "checkpoint_every": 0,
                    "mixed_precision": args.mixed_precision,
                },
            )
        )
        device, floor = tr.accelerator.device, floor_fn(tr)
        for step in range(2):  # warm-up
            optimizer_step(tr, step)
            floor()
        steps, floors = [], []
        for rep in range(args.reps):  # interleaved, so load changes hit both alike
            steps.append(timed(lambda rep=rep: optimizer_step(tr, 2 + rep), device))
            floors.append(timed(floor, device))
    step_s, floor_s = statistics.median(steps), statistics.median(floors)
    trainable = sum(p.numel() for p in tr.params)
    print(
        f"device {device} | {'full' if args.full else 'LoRA'} ({trainable} trainable) | objective "
        f"{args.objective} | B = {args.pairs} pairs (forward batch {2 * args.pairs}) | {args.reps} reps, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"CaPO step (median): {step_s * 1e3:8.2f} ms")
    print(f"floor     (median): {floor_s * 1e3:8.2f} ms  (policy fwd+bwd [2B] + no-grad reference fwd [2B])")
    print(f"ratio step / floor: {step_s / floor_s:.3f}  (target <= 1.25)")


if __name__ == "__main__":
    main()
