"""What the diffusers-backed adapters (SD, SDXL, SD3, FLUX) share (docs/design.md §3).

Loading (dtype/device, denoiser-only loads, scheduler choice), per-sample seeded initial noise,
VAE decoding and the generation loop around the diffusers pipeline itself. A family module adds
its text encoding, its denoiser call and the pipeline arguments for cached embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from PIL import Image

from capo.devices import resolve_device, resolve_dtype
from capo.errors import CapoError
from capo.models.base import DiffusionAdapter, SampleOutput
from capo.schedules import FlowSchedule, VPSchedule

try:  # diffusers renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns)
    from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401

    DTYPE_KW = "dtype"
except ImportError:  # older diffusers
    DTYPE_KW = "torch_dtype"

def _flow_dpm(config: dict) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2nd order) on flow sigmas s = k u / (1 + (k − 1) u), k = the config's shift."""
    return DPMSolverMultistepScheduler.from_config(
        config, use_flow_sigmas=True, prediction_type="flow_prediction",
        flow_shift=config.get("shift", 1.0),
    )


def _ddim(config: dict) -> DDIMScheduler:
    """DDIM (η = 0); latents are not clipped unless the config asks (DDIM's default clips to [-1, 1])."""
    return DDIMScheduler.from_config({"clip_sample": False, **config})


#: ``scheduler`` option -> factory(pipeline's scheduler config) -> sampling scheduler
SCHEDULERS: dict[str, Callable[[dict], Any]] = {
    "ddim": _ddim,
    "ddpm": DDPMScheduler.from_config,
    "euler": EulerDiscreteScheduler.from_config,
    "dpm": DPMSolverMultistepScheduler.from_config,
    "flow-euler": FlowMatchEulerDiscreteScheduler.from_config,
    "flow-dpm": _flow_dpm,
}


@dataclasses.dataclass
class LoadOptions:
    """Options every diffusers factory takes (``load_model(family, path, **options)``)."""

    device: str | torch.device | None = None  # None: cuda if available, else cpu
    dtype: str | torch.dtype | None = None  # None: bfloat16 on cuda, float32 on cpu
    load_text_encoders: bool = True  # False: embeddings must come from the cache
    load_vae: bool = True  # False: no decode / no images
    scheduler: str | None = None  # a SCHEDULERS name; None: the family's default
    enable_gradient_checkpointing: bool = False
    resolution: int | None = None  # pixels (square); None: the model's default

    @classmethod
    def parse(cls, family: str, options: dict[str, Any]) -> LoadOptions:
        """Build from factory keywords; an unknown option or scheduler name is a CapoError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise CapoError(f"model '{family}': unknown option(s) {unknown} (known: {sorted(names)})")
        parsed = cls(**options)
        if parsed.scheduler is not None and parsed.scheduler not in SCHEDULERS:
            raise CapoError(f"model '{family}': unknown scheduler '{parsed.scheduler}' "
                            f"(available: {', '.join(sorted(SCHEDULERS))})")
        return parsed


def initial_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """ε_i ~ N(0, I) of ``shape`` from ``torch.Generator().manual_seed(seeds[i])``; float32 CPU [B, *shape].

    Each row depends only on its own seed, so samples do not depend on batching or device.
    """
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows) if rows else torch.empty(0, *shape)


def load_vae_config(path: str) -> dict:
    """The VAE's config.json (no weights): scale factor, scaling/shift factors."""
    subfolder = "vae"
    try:
        return dict(AutoencoderKL.load_config(path, subfolder=subfolder))
    except (OSError, ValueError) as e:
        raise CapoError(f"cannot read {subfolder}/config ({type(e).__name__}: {e})", path=str(path)) from None


def vae_scale_factor(vae_config: dict) -> int:
    """2^(number of VAE down blocks − 1), as diffusers pipelines compute it."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def load_pipeline(pipeline_cls: type[DiffusionPipeline], path: str, denoiser_cls: type,
                  denoiser_name: str, text_parts: Sequence[str], opts: LoadOptions,
                  device: torch.device, dtype: torch.dtype, **extra: Any) -> DiffusionPipeline:
    """The pipeline with the denoiser from ``path/denoiser_name``; text parts and VAE only if asked.

    With ``load_text_encoders=False`` and ``load_vae=False`` only the denoiser's weights are read
    (plus model_index.json and configs): the skipped components are passed as None. A VAE whose
    config says ``force_upcast`` (it overflows in fp16, e.g. SDXL's) is kept in fp32 under fp16.
    """
    try:
        denoiser = denoiser_cls.from_pretrained(path, subfolder=denoiser_name, **{DTYPE_KW: dtype})
        parts: dict[str, Any] = {name: None for name in text_parts if not opts.load_text_encoders}
        if not opts.load_vae:
            parts["vae"] = None
        elif dtype == torch.float16 and load_vae_config(path).get("force_upcast", False):
            parts["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", **{DTYPE_KW: torch.float32})
        pipe = pipeline_cls.from_pretrained(
            path, **{denoiser_name: denoiser}, **parts, **extra, **{DTYPE_KW: dtype}
        )
    except (OSError, ValueError) as e:
        problem = f"cannot load {pipeline_cls.__name__} ({type(e).__name__}: {e})"
        raise CapoError(problem, path=str(path)) from None
    pipe.set_progress_bar_config(disable=True)
    if opts.enable_gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    return pipe.to(device)


def load_adapter(adapter_cls: type[DiffusersAdapter], pipeline_cls: type[DiffusionPipeline],
                 denoiser_cls: type, text_parts: Sequence[str], path: str, opts: LoadOptions,
                 **extra: Any) -> DiffusersAdapter:
    """``adapter_cls`` around ``load_pipeline`` (denoiser ``adapter_cls.denoiser_name``) on the
    device and dtype the options resolve to; ``extra`` goes to the pipeline's from_pretrained."""
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    pipe = load_pipeline(pipeline_cls, path, denoiser_cls, adapter_cls.denoiser_name, text_parts,
                         opts, device, dtype, **extra)
    return adapter_cls(pipe, opts, load_vae_config(path), device, dtype)


def vp_schedule(scheduler_config: dict) -> tuple[VPSchedule, str]:
    """(VPSchedule of the training ᾱ table, prediction type) from the pipeline's scheduler config."""
    train = DDPMScheduler.from_config(scheduler_config)
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise CapoError(f"unsupported prediction_type '{prediction_type}' in scheduler config")
    return VPSchedule.from_alphas_cumprod(train.alphas_cumprod), prediction_type


class DiffusersAdapter(DiffusionAdapter):
    """A diffusers pipeline behind the adapter interface; subclasses fill in the family parts."""

    denoiser_name: str = "unet"
    #: family default for the ``scheduler`` option
    default_scheduler: str = "ddim"

    def __init__(self, pipe: DiffusionPipeline, opts: LoadOptions, vae_config: dict,
                 device: torch.device, dtype: torch.dtype):
        self.pipe, self.opts, self.device, self.dtype = pipe, opts, device, dtype
        self.vae_config = vae_config
        self.vae_scale_factor = vae_scale_factor(vae_config)
        pipe.vae_scale_factor = self.vae_scale_factor  # pipelines guess 8 when the VAE is skipped
        self.denoiser = pipe.components[self.denoiser_name]
        self.denoiser.eval()
        self.scheduler_config = dict(pipe.scheduler.config)
        pipe.scheduler = SCHEDULERS[opts.scheduler or self.default_scheduler](self.scheduler_config)
        self.resolution = opts.resolution or self.default_resolution()

    # -- family parts ------------------------------------------------------------------------
    def default_resolution(self) -> int:
        """Pixels of the model's default (square) resolution."""
        return int(self.denoiser.config.sample_size) * self.vae_scale_factor

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _pipeline_embeds(self, emb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pipeline keyword arguments (prompt_embeds, ...) for cached embeddings."""
        raise NotImplementedError

    def _unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser latents -> VAE latents: z / scaling_factor + shift_factor (0 when absent)."""
        shift = self.vae_config.get("shift_factor") or 0.0
        return latents / self.vae_config["scaling_factor"] + shift

    # -- shared ------------------------------------------------------------------------------
    @property
    def has_text_encoders(self) -> bool:
        return self.opts.load_text_encoders

    def _to_model(self, emb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, self.dtype) for k, v in emb.items()}

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Every text-encoder output ``denoise`` needs, batch-first [B, ...] (the cached tensors)."""
        if not self.has_text_encoders:
            raise CapoError(f"{self.family}: text encoders not loaded (load_text_encoders=False); "
                            "embeddings must come from the cache")
        with torch.no_grad():
            return {k: v.detach() for k, v in self._encode(list(prompts)).items()}

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent at ``self.resolution``."""
        side = self.resolution // self.vae_scale_factor
        return (int(self.denoiser.config.in_channels), side, side)

    def _check_sample_inputs(self, prompts: Sequence[str], seeds: Sequence[int],
                             emb: dict[str, torch.Tensor] | None, guidance: float) -> None:
        if len(prompts) != len(seeds):
            raise CapoError(f"{self.family}: {len(prompts)} prompts but {len(seeds)} seeds")
        cfg_needs_text = self._uses_cfg(guidance) and self.negatives_need_text_encoders
        if not self.has_text_encoders and (emb is None or cfg_needs_text):
            raise CapoError(f"{self.family}: sampling without text encoders needs cached embeddings "
                            "and guidance <= 1 (negative embeddings need the text encoders)")

    @property
    def negatives_need_text_encoders(self) -> bool:
        """Whether the pipeline encodes the empty negative prompt (SDXL may use zeros instead)."""
        return True

    def _uses_cfg(self, guidance: float) -> bool:
        """Classifier-free guidance (a second, negative-prompt pass) is on when guidance > 1."""
        return guidance > 1.0

    def _run_pipeline(self, noise: torch.Tensor, emb: dict[str, torch.Tensor], steps: int,
                      guidance: float) -> torch.Tensor:
        """The diffusers pipeline from the given initial latents; returns the final latents."""
        side = self.resolution
        return self.pipe(
            **self._pipeline_embeds(self._to_model(emb)), latents=noise.to(self.device, self.dtype),
            height=side, width=side, num_inference_steps=steps, guidance_scale=guidance,
            output_type="latent", return_dict=False,
        )[0]

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
               guidance: float | None = None, emb: dict[str, torch.Tensor] | None = None) -> SampleOutput:
        """Sample i from noise seeded by seeds[i] (``initial_noise``); final latents + decoded images."""
        steps = self.default_steps if steps is None else int(steps)
        guidance = self.default_guidance if guidance is None else float(guidance)
        self._check_sample_inputs(prompts, seeds, emb, guidance)
        emb = self.encode_prompts(prompts) if emb is None else emb
        noise = initial_noise(seeds, self.latent_shape())
        with torch.no_grad():
            latents = self._run_pipeline(noise, emb, steps, guidance)
        return SampleOutput(latents=latents, images=self.decode(latents))

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Denoiser latents [B, C, H, W] -> PIL images through the VAE (unscaled in fp32)."""
        vae: AutoencoderKL | None = self.pipe.vae
        if vae is None:
            raise CapoError(f"{self.family}: VAE not loaded (load_vae=False); cannot decode latents")
        with torch.no_grad():
            z = self._unscale(latents.to(self.device, torch.float32)).to(vae.dtype)
            pixels = vae.decode(z, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def flow_schedule(shift: float) -> tuple[FlowSchedule, str]:
    """(FlowSchedule(shift), "flow") for rectified-flow families."""
    return FlowSchedule(shift=float(shift)), "flow"
