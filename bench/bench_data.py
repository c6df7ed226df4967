"""Benchmark: training's host memory and pair loader at SDXL size (issue 12).

    nice -n 10 python bench/bench_data.py [--prompts 1000 10000] [--samples 4] [--steps 3]
        [--batch 2] [--root DIR] [--out FILE.json]

For each size, a synthetic run directory as generate + select leave it for SDXL at 1024 px:
``--samples`` latents [4, 128, 128] bf16 per prompt (random), cached embeddings per prompt
({"encoder_hidden_states": [77, 2048], "pooled": [1280]} bf16, random), chunks of 64 prompts,
and best/worst pairs (X+ = {0}, X- = {last}: 2 latents per prompt in training). Then:

1. peak RSS of ``capo train`` (a subprocess; LoRA r8, ``--steps`` steps of ``--batch`` pairs,
   2 loader workers): the training process's VmHWM, and, sampled from /proc every 0.2 s, the
   largest RSS of a child (a DataLoader worker; forked, it counts the pages it shares with the
   training process) and the peak of the process tree's summed PSS (shared pages split). Run
   twice: the first run also re-packs the pairs into RUN/trainset/ (one time), the second opens it;
2. the loader in this process with one thread (= one DataLoader worker): pairs/s of
   ``StepBatches[step]`` (read the pairs' latents and embeddings from the memory-mapped store,
   draw t and noise), and of the reads alone; and a 2-worker DataLoader's pairs/s;
3. random access to one latent: through the Parquet samples shard (``read_row_group``) vs the
   store.

The denoiser is a tiny SDXL UNet (SDXL's config with 8/16/16 channels and cross-attention only at
the lowest resolution, 0.44 M parameters) that takes the SDXL-sized latents and embeddings: the
published 2.6 B-parameter UNet does not train at 128 x 128 latents on a CPU, and the host-memory
question is about the data, which is the published size. Compare with docs/scaling.md's H100
figure: SDXL LoRA r8 consumes 4 pairs per 0.937 s step (4.27 pairs/s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from capo.pipeline.generate import model_spec
from capo.pipeline.rundir import PAIRS_SCHEMA, RunDir, embeddings_table, samples_table, shard_name
from capo.pipeline.rundir import write_table_atomic as write

sys.path.insert(0, str(Path(__file__).parent))
from gpu_real_size import SDXL_VAE, _clip, _tokenizers  # noqa: E402
from param_counts import CLIP_BIGG_TEXT, CLIP_L_TEXT, SDXL_UNET  # noqa: E402

#: H100 LoRA r8 step of SDXL (docs/scaling.md, "Measured on one H100"): 4 pairs in 0.937 s
H100_PAIRS_PER_S = 4 / 0.937
CHUNK = 64
TINY_UNET = {"block_out_channels": [8, 16, 16], "attention_head_dim": [2, 2, 2], "layers_per_block": 1,
             "transformer_layers_per_block": [1, 1, 1], "norm_num_groups": 4,
             "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}
TINY_TEXT = {"intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 1, "hidden_size": 32,
             "projection_dim": 32}
TINY_VAE = {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 8}
#: runs ``capo`` and prints the process's own peak RSS (VmHWM, KiB: since its exec; ``ru_maxrss``
#: would also count the RSS of the forking parent)
HARNESS = ("import sys\nfrom pathlib import Path\nfrom capo.cli import main\nrc = main(sys.argv[1:])\n"
           "status = Path('/proc/self/status').read_text().splitlines()\n"
           "print('HWM ' + next(l for l in status if l.startswith('VmHWM')).split()[1])\nsys.exit(rc)\n")


def save_model(root: Path) -> str:
    """A tiny SDXL pipeline whose UNet takes SDXL's conditioning (cross-attention 2048, pooled
    1280, time ids 6 x 256) on [4, 128, 128] latents; text encoders and VAE tiny (not loaded)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    tok, _ = _tokenizers()
    pipe = StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**{**SDXL_UNET, **TINY_UNET}),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        vae=AutoencoderKL(**{**SDXL_VAE, **TINY_VAE}), tokenizer=tok, tokenizer_2=tok,
        text_encoder=_clip(CLIP_L_TEXT, False, TINY_TEXT),
        text_encoder_2=_clip(CLIP_BIGG_TEXT, True, TINY_TEXT))
    pipe.save_pretrained(root / "tiny-sdxl", safe_serialization=True)
    return str(root / "tiny-sdxl")


def write_run(root: Path, model: str, prompts: int, samples: int) -> RunDir:
    """generate + select outputs at SDXL size (random bf16 latents and embeddings), best/worst pairs."""
    run = RunDir.at(root)
    run.write_base_model(model_spec(model, None))
    gen = torch.Generator().manual_seed(prompts)
    pids = [f"p{i:06d}" for i in range(prompts)]
    for c, start in enumerate(range(0, prompts, CHUNK)):
        ids = pids[start : start + CHUNK]
        emb = {"encoder_hidden_states": torch.randn(len(ids), 77, 2048, generator=gen).bfloat16(),
               "pooled": torch.randn(len(ids), 1280, generator=gen).bfloat16()}
        write(embeddings_table(ids, emb), run.embeddings_dir / shard_name(0, c))
        rows = [(p, i) for p in ids for i in range(samples)]
        latents = torch.randn(len(rows), 4, 128, 128, generator=gen).bfloat16()
        write(samples_table([p for p, _ in rows], [i for _, i in rows], list(range(len(rows))),
                            [b""] * len(rows), latents), run.samples_dir / shard_name(0, c))
    pairs = {"prompt_id": pids, "positives": [[0]] * prompts, "negatives": [[samples - 1]] * prompts,
             "pos_rca": [[0.9]] * prompts, "neg_rca": [[0.1]] * prompts, "rule": ["best_worst"] * prompts}
    write(pa.table(pairs, schema=PAIRS_SCHEMA), run.pairs_path)
    return run


def _tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
    return out


def _kib(path: str, key: str) -> int:
    """The ``key:`` field (KiB) of a /proc file (0 if the process is gone)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith(key + ":")), 0)


def train_rss(run: RunDir, steps: int, batch: int) -> dict[str, Any]:
    """``capo train`` in a subprocess: its peak RSS (VmHWM); sampled every 0.2 s: the largest RSS
    of a child (a DataLoader worker) and the peak PSS summed over the process tree."""
    args = ["train", "--run", str(run.root), "--max-steps", str(steps), "--batch-size", str(batch),
            "--checkpoint-every", "0", "--log-with", "none", "--lora-rank", "8", "--loader-workers", "2"]
    for leftover in ("model", "checkpoints", "logs"):
        shutil.rmtree(run.root / leftover, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    began, peak_pss, peak_child = time.perf_counter(), 0, 0
    proc = subprocess.Popen([sys.executable, "-c", HARNESS, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        tree = _tree(proc.pid)
        peak_pss = max(peak_pss, sum(_kib(f"/proc/{p}/smaps_rollup", "Pss") for p in tree))
        peak_child = max([peak_child] + [_kib(f"/proc/{p}/status", "VmRSS") for p in tree[1:]])
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"capo train failed:\n{err[-3000:]}")
    hwm = int(next(line for line in out.splitlines() if line.startswith("HWM "))[4:])
    return {"seconds": round(time.perf_counter() - began, 1), "rss_train_mib": round(hwm / 1024, 1),
            "rss_worker_mib": round(peak_child / 1024, 1), "pss_tree_mib": round(peak_pss / 1024, 1)}


def loader_rates(run: RunDir, batch: int, steps: int) -> dict[str, float]:
    """One thread: pairs/s of whole batches (reads + t + noise), first and second pass over the
    same steps, and of reads alone (other random rows); a 2-worker DataLoader's pairs/s."""
    from capo.models.base import detect_family, load_model
    from capo.pipeline.trainset import PairSet, StepBatches, pair_loader

    torch.set_num_threads(1)
    data = PairSet.from_run(run)
    family = detect_family(run.read_base_model()["path"])
    sample_t = load_model(*family, device="cpu", load_text_encoders=False, load_vae=False).schedule.sample_t
    batches = StepBatches(data, 0, batch, 0, 1, sample_t)
    rates = []
    for _ in range(2):  # the second pass reads the same rows again: from the page cache
        began = time.perf_counter()
        for step in range(steps):
            batches[step]
        rates.append(steps * batch / (time.perf_counter() - began))
    rng, began = np.random.default_rng(1), time.perf_counter()
    for _ in range(steps):
        data.latents[rng.integers(len(data.latents), size=2 * batch)].float()
        prompts = data.emb_rows[rng.integers(len(data), size=batch)]
        {k: v[prompts] for k, v in data.emb.items()}
    reads = steps * batch / (time.perf_counter() - began)
    loader = pair_loader(batches, range(steps, 3 * steps), workers=2, prefetch=2, pin_memory=False)
    began = time.perf_counter()
    n = sum(len(b) for b in loader)
    return {"pairs_per_s_one_worker": round(rates[0], 1), "pairs_per_s_one_worker_again": round(rates[1], 1),
            "reads_pairs_per_s_one_worker": round(reads, 1),
            "pairs_per_s_dataloader_2_workers": round(n / (time.perf_counter() - began), 1)}


def random_access(run: RunDir, reads: int) -> dict[str, float]:
    """ms per random latent: decoding it from the samples shard (a shard is one row group) vs the store."""
    from capo.pipeline.trainset import PairSet

    rng = np.random.default_rng(2)
    shards = sorted(run.samples_dir.glob("part-*.parquet"))
    began = time.perf_counter()
    for _ in range(reads):
        f = pq.ParquetFile(shards[rng.integers(len(shards))])
        col = f.read_row_group(0, columns=["latent"]).column(0)
        col[int(rng.integers(len(col)))].as_py()
    parquet = (time.perf_counter() - began) / reads
    latents = PairSet.from_run(run).latents
    began = time.perf_counter()
    for _ in range(reads):
        latents[int(rng.integers(len(latents)))]
    store = (time.perf_counter() - began) / reads
    return {"parquet_ms_per_latent": round(1e3 * parquet, 2), "store_ms_per_latent": round(1e3 * store, 3)}


def du_gib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30, 2)


def bench_size(root: Path, model: str, args: argparse.Namespace, prompts: int) -> dict[str, Any]:
    began = time.perf_counter()
    run = write_run(root / f"run-{prompts}", model, prompts, args.samples)
    res: dict[str, Any] = {"prompts": prompts, "samples": args.samples,
                           "write_s": round(time.perf_counter() - began, 1),
                           "cache_gib": round(du_gib(run.samples_dir) + du_gib(run.embeddings_dir), 2)}
    res["first_train"] = train_rss(run, args.steps, args.batch)  # re-packs RUN/trainset/
    res["store_gib"] = du_gib(run.root / "trainset")
    res["second_train"] = train_rss(run, args.steps, args.batch)
    res.update(loader_rates(run, 4, args.loader_steps))
    res.update(random_access(run, args.reads))
    print(json.dumps(res), flush=True)
    if not args.keep:
        shutil.rmtree(run.root)
    return res


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| prompts x samples | cache GiB | store GiB | peak RSS train MiB (1st / 2nd run) | "
            "peak RSS worker MiB | peak tree PSS MiB | pairs/s, 1 worker (again) | reads only | "
            "DataLoader 2 workers |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        a, b = r["first_train"], r["second_train"]
        rows.append(f"| {r['prompts']} x {r['samples']} | {r['cache_gib']} | {r['store_gib']} | "
                    f"{a['rss_train_mib']} / {b['rss_train_mib']} | "
                    f"{a['rss_worker_mib']} / {b['rss_worker_mib']} | "
                    f"{a['pss_tree_mib']} / {b['pss_tree_mib']} | {r['pairs_per_s_one_worker']} "
                    f"({r['pairs_per_s_one_worker_again']}) | "
                    f"{r['reads_pairs_per_s_one_worker']} | {r['pairs_per_s_dataloader_2_workers']} |")
    small, large = results[0], results[-1]
    growth = {k: 100 * (large[k]["rss_train_mib"] / small[k]["rss_train_mib"] - 1)
              for k in ("first_train", "second_train")}
    rows += ["", f"peak RSS growth {small['prompts']} -> {large['prompts']} prompts: first run "
             f"{growth['first_train']:+.1f}%, second run {growth['second_train']:+.1f}% (target < 10%)",
             f"loader, one worker: {large['pairs_per_s_one_worker'] / H100_PAIRS_PER_S:.0f}x the "
             f"{H100_PAIRS_PER_S:.2f} pairs/s of an H100 SDXL LoRA r8 step (target >= 10x)",
             f"random latent read: Parquet shard {large['parquet_ms_per_latent']} ms, "
             f"store {large['store_ms_per_latent']} ms"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="training steps per capo train run")
    p.add_argument("--batch", type=int, default=2, help="pairs per training step")
    p.add_argument("--loader-steps", type=int, default=50, help="batches of 4 pairs timed per loader figure")
    p.add_argument("--reads", type=int, default=20, help="random latent reads timed")
    p.add_argument("--root", default=None, help="where the run directories go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--out", default=None, help="write the figures as JSON")
    args = p.parse_args(argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_data-"))
    model = save_model(root)
    results = [bench_size(root, model, args, n) for n in args.prompts]
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    if not args.keep and args.root is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
