"""Stage ``generate``: N samples per prompt from the base model, cached latents and embeddings.

Prompts are split into global chunks of ``chunk_size`` (chunk c = prompts [c*K, (c+1)*K)); chunks
go round-robin to the ranks of ``accelerate.PartialState`` (torchrun/accelerate launch), each rank
writes ``embeddings/part-R-C.parquet`` then ``samples/part-R-C.parquet`` per chunk (the samples
shard marks the chunk done). Seeds depend only on (seed, prompt_id, sample_idx) and batches only
on the chunk, so reruns, resumed runs and any world size give the same samples.
"""

from __future__ import annotations

import hashlib
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from capo import devices
from capo.config import doc, quote, to_dict
from capo.devices import DTYPES
from capo.errors import CapoError
from capo.models.base import MODELS, DiffusionAdapter, detect_family, load_model
from capo.pipeline.prompts import Prompt, load_prompts, prompts_table, subset
from capo.pipeline.rundir import (
    RunDir,
    embeddings_table,
    samples_table,
    shard_files,
    shard_name,
    shard_rows,
    write_table_atomic,
)
from capo.pipeline.tuned import apply_trained

#: keys whose change makes existing samples incompatible with a rerun
SAMPLE_KEYS = ("model", "family", "model_options", "prompts", "num_prompts", "samples_per_prompt", "steps",
               "guidance", "seed", "chunk_size", "dtype", "tuned")
#: load_base's own keywords, which model_options may not set
RESERVED_OPTIONS = ("device", "dtype", "load_text_encoders", "load_vae")


@dataclass
class GenerateConfig:
    """Stage ``generate``: sampling from the base model."""

    model: str = doc("base model: built-in name (shapes-vp, shapes-flow), local dir or hub id", "shapes-vp")
    family: str | None = doc("model family override (default: detected from --model)", None)
    model_options: dict = doc("options of the family's loader, e.g. {load_t5: false, resolution: 512, "
                              "scheduler: ddim, lora_ff: true} (docs/models.md); recorded in "
                              "base_model.json and reused by train and evaluate", {})
    prompts: str = doc("prompt file (txt/csv/jsonl/parquet) or built-in set (shapes:train, ...)",
                       "shapes:train")
    num_prompts: int | None = doc("use a deterministic, category-balanced subset of this many prompts",
                                  None, ge=1)
    samples_per_prompt: int = doc("samples N per prompt (calibration compares each with the others)", 16,
                                  ge=2)
    steps: int | None = doc("sampling steps (default: the model family's)", None, ge=1)
    guidance: float | None = doc("classifier-free guidance scale (default: the model family's)", None, ge=0)
    seed: int = doc("base seed; sample seeds derive from (seed, prompt_id, sample_idx)", 0, ge=0)
    tuned: str | None = doc("sample from the base model with these trained weights (a RUN/model "
                            "directory: an online round samples from the current model)", None)
    batch_size: int = doc("samples per forward pass, batched across prompts", 64, ge=1)
    chunk_size: int = doc("prompts per shard (the unit of resumption)", 32, ge=1)
    device: str = doc("device: auto (this rank's accelerator, else cpu), cpu, cuda, cuda:1, ...", "auto")
    dtype: str = doc("model dtype", "float32", choices=DTYPES)

    def validate(self) -> None:
        check_device(self.device)
        reserved = sorted(set(self.model_options) & set(RESERVED_OPTIONS))
        if reserved:
            raise CapoError(f"config key 'model_options.{reserved[0]}' is set by capo itself "
                            "(use --device / --dtype)")


@dataclass
class GenerateReport:
    prompts: int
    chunks: int
    skipped: int
    written: int
    samples_written: int


def sample_seed(seed: int, prompt_id: str, sample_idx: int) -> int:
    """Seed of one sample: BLAKE2b of (seed, prompt_id, sample_idx) mod 2^31 (order-independent)."""
    digest = hashlib.blake2b(f"{seed}/{prompt_id}/{sample_idx}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def process_state() -> Any:
    """accelerate's ``PartialState``: rank and world size under torchrun / accelerate launch
    (``cpu=True`` without CUDA, or accelerate would not see a multi-process CPU run)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def check_device(device: str) -> None:
    """An unknown device name, or a CUDA device on a torch build or machine without one, is an
    error before any work."""
    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise CapoError(f"config key 'device': unknown device {quote(device)} (auto, cpu, cuda, cuda:1, "
                        "...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise CapoError(f"config key 'device' is '{device}' but {build}; use --device cpu or auto")


def resolve_device(device: str, state: Any | None = None) -> torch.device:
    """``auto`` -> this process's accelerate device; otherwise the named device."""
    if device == "auto":
        return (state or process_state()).device
    return devices.resolve_device(device)


def model_spec(model: str, family: str | None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """{model, family, path, options} for --model/--family/--model-options (local paths made absolute)."""
    if family is None:
        family, path = detect_family(model)
    else:
        if family not in MODELS:
            raise CapoError(f"unknown model family '{family}' (available: {', '.join(sorted(MODELS))})")
        path = None if model == family else model
    if path is not None and Path(path).exists():
        path = str(Path(path).resolve())
    return {"model": model, "family": family, "path": path, "options": dict(options or {})}


def load_base(
    spec: dict[str, Any], device: torch.device, dtype: str = "float32", **options: Any
) -> DiffusionAdapter:
    """The adapter of a recorded model spec (with its recorded loader options; ``options`` add to
    them), on ``device`` in ``dtype``, in eval mode."""
    options = {**spec.get("options", {}), **options}
    adapter = load_model(spec["family"], spec["path"], device=device, dtype=DTYPES[dtype], **options)
    adapter.denoiser.eval()
    return adapter


def chunks_of(n_prompts: int, chunk_size: int) -> list[range]:
    """Global chunks: chunk c = prompt rows [c*K, min((c+1)*K, n))."""
    return [range(s, min(s + chunk_size, n_prompts)) for s in range(0, n_prompts, chunk_size)]


def _check_compatible(run: RunDir, cfg: GenerateConfig, prompts: list[Prompt]) -> None:
    """A run directory with samples from other settings or prompts is an error naming the key."""
    if not run.sample_shards():
        return
    old = run.load_config().get("generate", {})
    for key in SAMPLE_KEYS:
        if key in old and old[key] != getattr(cfg, key):
            raise CapoError(
                f"config key '{key}' is {getattr(cfg, key)!r} but this run's samples used {old[key]!r}; "
                "use the same value or a new --run", path=str(run.config_path))
    if run.prompts_path.is_file():
        old_ids = run.read_prompts().column("prompt_id").to_pylist()
        if old_ids != [p.prompt_id for p in prompts]:
            raise CapoError("this run's samples were generated from other prompts; use a new --run",
                            path=str(run.prompts_path))


def _generate_chunk(adapter: DiffusionAdapter, cfg: GenerateConfig, prompts: Sequence[Prompt], bar: Any):
    """Embeddings [K, ...] of the chunk's prompts and its K*N samples (batched across prompts)."""
    texts = [p.prompt for p in prompts]
    emb = adapter.encode_prompts(texts)
    rows = [(i, s) for i in range(len(prompts)) for s in range(cfg.samples_per_prompt)]
    seeds = [sample_seed(cfg.seed, prompts[i].prompt_id, s) for i, s in rows]
    latents, pngs = [], []
    for b in range(0, len(rows), cfg.batch_size):
        idx = [i for i, _ in rows[b : b + cfg.batch_size]]
        batch_emb = {k: v[torch.tensor(idx, device=v.device)] for k, v in emb.items()}
        out = adapter.sample([texts[i] for i in idx], seeds[b : b + cfg.batch_size], cfg.steps,
                             cfg.guidance, emb=batch_emb)
        check_finite_latents(out.latents, prompts[idx[0]].prompt_id, cfg)
        latents.append(out.latents.detach().cpu())
        pngs += [png_bytes(im) for im in out.images]
        bar.update(len(idx))
    ids = [prompts[i].prompt_id for i, _ in rows]
    table = samples_table(ids, [s for _, s in rows], seeds, pngs, torch.cat(latents))
    return emb, table


def check_finite_latents(latents: torch.Tensor, prompt_id: str, cfg: GenerateConfig) -> None:
    """NaN or inf latents (black images) stop generate before anything is written."""
    if not torch.isfinite(latents).all():
        raise CapoError(f"generate: non-finite latents in the batch of prompt {prompt_id} (check guidance "
                        f"{cfg.guidance}, steps {cfg.steps}, dtype {cfg.dtype})")


def intact_chunks(run: RunDir, chunks: list[range], mine: list[int], cfg: GenerateConfig) -> set[int]:
    """Chunks of ``mine`` whose embeddings and samples shards are whole (footer readable, the
    expected rows); a damaged shard is removed, so its chunk is generated again."""
    samples, embeddings = run.sample_shards(), shard_files(run.embeddings_dir)
    done = set()
    for c in (c for c in mine if c in samples and c in embeddings):
        want = {samples[c]: len(chunks[c]) * cfg.samples_per_prompt, embeddings[c]: len(chunks[c])}
        bad = [p for p, rows in want.items() if shard_rows(p) != rows]
        for p in bad:
            print(f"capo generate: {p}: damaged or incomplete; generating chunk {c} again", file=sys.stderr)
            p.unlink()
        done |= set() if bad else {c}
    return done


def generate(run: RunDir, cfg: GenerateConfig) -> GenerateReport:
    """Run stage ``generate`` on this process's chunks; skip chunks already written (resume)."""
    state = process_state()
    prompts = subset(load_prompts(cfg.prompts), cfg.num_prompts, cfg.seed)
    spec = model_spec(cfg.model, cfg.family, cfg.model_options)
    _check_compatible(run, cfg, prompts)
    if state.is_main_process:
        write_table_atomic(prompts_table(prompts), run.prompts_path)
        run.write_base_model(spec)
        run.save_config("generate", to_dict(cfg))
    chunks = chunks_of(len(prompts), cfg.chunk_size)
    mine = [c for c in range(len(chunks)) if c % state.num_processes == state.process_index]
    done = intact_chunks(run, chunks, mine, cfg)
    todo = [c for c in mine if c not in done]
    written = 0
    if todo:
        adapter = load_base(spec, resolve_device(cfg.device, state), cfg.dtype)
        if cfg.tuned:  # the same adapter and sampler, with the current weights (online rounds)
            apply_trained(adapter, cfg.tuned).denoiser.eval()
        total = sum(len(chunks[c]) for c in todo) * cfg.samples_per_prompt
        bar = tqdm(total=total, desc=f"generate [rank {state.process_index}]", unit="img",
                   disable=not state.is_local_main_process)
        with torch.inference_mode(), bar:
            for c in todo:
                emb, table = _generate_chunk(adapter, cfg, [prompts[i] for i in chunks[c]], bar)
                name = shard_name(state.process_index, c)
                write_table_atomic(embeddings_table([prompts[i].prompt_id for i in chunks[c]], emb),
                                   run.embeddings_dir / name)
                write_table_atomic(table, run.samples_dir / name)  # last: marks chunk c done
                written += table.num_rows
    state.wait_for_everyone()
    return GenerateReport(len(prompts), len(chunks), len(mine) - len(todo), len(todo), written)

