"""``capo export --run DIR --out OUT [--format auto|lora|merged]``: RUN/model in the form users load.

Diffusers families (sd, sdxl, sd3, flux):

- ``lora``: ``OUT/pytorch_lora_weights.safetensors``, written by the pipeline class's own
  ``save_lora_weights`` from peft's ``get_peft_model_state_dict`` (UNet families through
  ``convert_state_dict_to_diffusers``, as diffusers' LoRA training scripts do), with the LoRA config
  as adapter metadata, so ``pipe.load_lora_weights(OUT)`` applies it at its scale alpha / r;
- ``merged``: the base pipeline with the tuned denoiser folded in (a LoRA fused at its scale by
  diffusers' ``fuse_lora`` and unloaded; a full fine-tune or a soup loaded as is), written with
  ``save_pretrained``; its scheduler is the sampler capo used. ``DiffusionPipeline.from_pretrained(OUT)``.

Shapes world: ``lora`` = the peft adapter files of RUN/model (``capo evaluate --tuned OUT``);
``merged`` = a saved shapes model (``capo generate --model OUT``, ``capo evaluate --tuned OUT``).

Every export carries a model card (``capo.export.card``). The run is read and the tuned model
loaded before anything is written; the export is written to a temporary directory beside OUT and
renamed at the end, so a bad run directory leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import get_peft_model_state_dict
from safetensors import SafetensorError

from capo.config import add_arguments, build, doc
from capo.devices import DTYPES
from capo.errors import CapoError
from capo.export.card import model_card
from capo.models.base import DiffusionAdapter
from capo.pipeline.generate import load_base
from capo.pipeline.rundir import RunDir
from capo.pipeline.tuned import FULL_FILE, LORA_FILE, apply_trained, trained_state_dict

#: model family -> world: how its exports are written
WORLDS: dict[str, str] = {"shapes-vp": "shapes", "shapes-flow": "shapes", "sd": "diffusers",
                          "sdxl": "diffusers", "sd3": "diffusers", "flux": "diffusers"}
#: weights file of RUN/model -> what was trained
TUNED_KINDS: dict[str, str] = {LORA_FILE: "lora", FULL_FILE: "full"}
#: --format -> {tuned kind -> format written}; None: that combination is refused
FORMATS: dict[str, dict[str, str | None]] = {
    "auto": {"lora": "lora", "full": "merged"},
    "lora": {"lora": "lora", "full": None},
    "merged": {"lora": "merged", "full": "merged"},
}
#: denoiser component name -> peft state dict -> the keys its pipeline's save_lora_weights takes
#: (diffusers' UNet LoRA scripts convert to diffusers names; its transformer scripts save peft names)
LORA_CONVERSIONS: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "unet": convert_state_dict_to_diffusers,
    "transformer": lambda state: state,
}
#: what loading a tuned model can raise on a corrupt or mismatched file
LOAD_ERRORS = (SafetensorError, OSError, ValueError, KeyError, RuntimeError, TypeError)


@dataclass
class ExportConfig:
    """Settings of ``capo export`` (YAML section ``export`` or ``--flags``)."""

    run: str = doc("run directory with model/ (capo train, or a soup cell of capo experiment)", "")
    out: str = doc("output directory (must be absent or empty unless --overwrite)", "")
    format: str = doc("what to write (auto: lora for a LoRA run, merged for a full fine-tune or a "
                      "soup)", "auto", choices=FORMATS)
    dtype: str = doc("dtype the base model is loaded, merged and saved in", "float32", choices=DTYPES)
    device: str = doc("device the model is loaded and merged on: cpu, cuda, ...", "cpu")
    overwrite: bool = doc("replace an existing, non-empty OUT", False)
    push_to_hub: str | None = doc("then upload OUT to this Hugging Face Hub model repo", None)
    private: bool = doc("create the hub repo private (with --push-to-hub)", False)

    def validate(self) -> None:
        """Cross-field checks (each field's own choices are declared in ``doc()`` above)."""
        if not self.run or not self.out:
            raise CapoError("export: --run and --out are required")


@dataclass
class ExportReport:
    """What ``export`` wrote: the directory, its format, its files, and the hub URL if pushed."""

    out: Path
    format: str
    files: list[str]
    url: str | None = None


def tuned_kind(model_dir: Path) -> str:
    """"lora" or "full" for RUN/model (a soup is "full"); a missing model is a CapoError."""
    if not model_dir.is_dir():
        raise CapoError("no model/ directory; run `capo train` first", path=str(model_dir))
    found = [kind for name, kind in TUNED_KINDS.items() if (model_dir / name).is_file()]
    if not found:
        raise CapoError(f"no {LORA_FILE} or {FULL_FILE}; run `capo train` first", path=str(model_dir))
    return found[0]


def load_tuned(spec: dict[str, Any], model_dir: Path, kind: str, fmt: str,
               cfg: ExportConfig) -> DiffusionAdapter:
    """The base model with RUN/model applied; for ``merged`` the whole pipeline with a LoRA fused
    (W + (alpha / r) B A) and its layers removed, for ``lora`` the denoiser only."""
    whole = fmt == "merged"
    adapter = load_base(spec, torch.device(cfg.device), cfg.dtype, load_text_encoders=whole, load_vae=whole)
    try:
        apply_trained(adapter, model_dir)
        saved = trained_state_dict(model_dir)
    except LOAD_ERRORS as e:
        problem = " ".join(str(e).split())[:240]  # one line, not a whole state dict report
        raise CapoError(f"cannot load the tuned weights ({type(e).__name__}: {problem})",
                        path=str(model_dir)) from None
    denoiser = adapter.denoiser.eval()
    if kind == "lora":
        missing = sorted(set(get_peft_model_state_dict(denoiser)) - set(saved))
        if missing:
            raise CapoError(f"LoRA adapter lacks '{missing[0]}'", path=str(model_dir / LORA_FILE))
        if whole:
            denoiser.fuse_lora()
            denoiser.unload_lora()
    return adapter


def _diffusers_lora(adapter: Any, model_dir: Path, out: Path) -> None:
    """pytorch_lora_weights.safetensors through the pipeline class's save_lora_weights."""
    name, denoiser = adapter.denoiser_name, adapter.denoiser
    config = denoiser.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    saved = trained_state_dict(model_dir)  # the trained tensors at their own precision, whatever --dtype
    state = LORA_CONVERSIONS[name]({key: saved[key] for key in get_peft_model_state_dict(denoiser)})
    type(adapter.pipe).save_lora_weights(
        out, **{f"{name}_lora_layers": state, f"{name}_lora_adapter_metadata": config})


def _diffusers_merged(adapter: Any, model_dir: Path, out: Path) -> None:
    """The whole pipeline (tuned denoiser, capo's sampling scheduler) with save_pretrained."""
    adapter.pipe.save_pretrained(out, safe_serialization=True)


def _shapes_lora(adapter: Any, model_dir: Path, out: Path) -> None:
    """The peft adapter files, as ``capo train`` wrote them (``capo evaluate --tuned`` reads them)."""
    for name in (LORA_FILE, "adapter_config.json"):
        shutil.copy2(model_dir / name, out / name)


def _shapes_merged(adapter: Any, model_dir: Path, out: Path) -> None:
    """A saved shapes model (capo_shapes.json + model.safetensors) with the tuned UNet."""
    adapter.save_pretrained(out)


#: (world, format) -> writer(tuned adapter, RUN/model, directory to fill)
WRITERS: dict[tuple[str, str], Callable[[Any, Path, Path], None]] = {
    ("diffusers", "lora"): _diffusers_lora,
    ("diffusers", "merged"): _diffusers_merged,
    ("shapes", "lora"): _shapes_lora,
    ("shapes", "merged"): _shapes_merged,
}


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CapoError("exists and is not a directory", path=str(out))
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CapoError("exists and is not empty; pass --overwrite to replace it", path=str(out))


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished export to OUT (an existing OUT is removed only now)."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def export(cfg: ExportConfig) -> ExportReport:
    """Write RUN/model as ``cfg.format`` to ``cfg.out`` with README.md; optionally push it."""
    run, out = RunDir.at(cfg.run), Path(cfg.out)
    spec = run.read_base_model()
    if spec.get("family") not in WORLDS:
        raise CapoError(f"cannot export family '{spec.get('family')}'", path=str(run.base_model_path))
    kind = tuned_kind(run.model_dir)
    fmt = FORMATS[cfg.format][kind]
    if fmt is None:
        raise CapoError("a full fine-tune or a soup has no LoRA adapter; use --format merged",
                        path=str(run.model_dir))
    _check_out(out, cfg.overwrite)
    adapter = load_tuned(spec, run.model_dir, kind, fmt, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        WRITERS[(WORLDS[spec["family"]], fmt)](adapter, run.model_dir, tmp)
        repo = cfg.push_to_hub or str(out.resolve())
        card = model_card(run, spec, run.model_dir, fmt, WORLDS[spec["family"]], repo)
        (tmp / "README.md").write_text(card)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    url = push_to_hub(out, cfg.push_to_hub, cfg.private) if cfg.push_to_hub else None
    return ExportReport(out, fmt, files, url)


def push_to_hub(out: Path, repo: str, private: bool = False) -> str:
    """Create the model repo if needed and upload OUT in one commit (huggingface_hub); its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=str(out), repo_type="model",
                                   commit_message="capo export")
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line; OUT stays written
        raise CapoError(f"push to the hub repo '{repo}' failed ({type(e).__name__}); the export is "
                        f"written: upload it with `hf upload {repo} {out}`", path=str(out)) from None
    return str(getattr(commit, "commit_url", commit))


def describe(report: ExportReport) -> str:
    """One line for the CLI."""
    pushed = f"; pushed to {report.url}" if report.url else ""
    return f"export: {report.format} -> {report.out} ({', '.join(report.files)}){pushed}"


def register(subparsers: Any) -> None:
    """``capo export --run DIR --out OUT [--format auto|lora|merged] [--push-to-hub REPO]``."""
    p = subparsers.add_parser(
        "export", help="write the tuned model as a diffusers LoRA or merged pipeline, with a model card",
        description="Export RUN/model: --format lora writes pytorch_lora_weights.safetensors for "
        "pipe.load_lora_weights; merged writes the whole pipeline for DiffusionPipeline.from_pretrained; "
        "both with README.md, the model card (docs/models.md).")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML file whose 'export' section sets the defaults")
    add_arguments(p, ExportConfig)
    p.set_defaults(func=lambda args: print(describe(export(build(ExportConfig, args, args.config,
                                                                 section="export")))))

