"""The two tiny shapes models behind the adapter interface (docs/design.md §3, §5) and their sampler.

Both are pixel-space: the latent is the image in [-1, 1], shape [3, 32, 32]. ``shapes-vp`` is
SDXL-like (SDXL's VP schedule, ε-prediction, DDIM sampling); ``shapes-flow`` is SD3-like
(rectified flow x_t = (1 − s) x + s ε, velocity u = ε − x, Euler sampling). Both sample with
classifier-free guidance: ε̂ = ε̂(∅) + w (ε̂(c) − ε̂(∅)) (Ho & Salimans 2022), the unconditional
and conditional halves in one batched forward.

A saved model is a directory with ``capo_shapes.json`` (family, network configs, tokenizer
vocabulary, schedule, sampling defaults) and ``model.safetensors`` (``unet.*`` and
``text_encoder.*`` tensors). The shipped weights live in ``capo/shapes/weights/{vp,flow}``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file, save_file

from capo.devices import resolve_device, resolve_dtype
from capo.errors import CapoError
from capo.models.base import SHAPES_MARKER, DiffusionAdapter, SampleOutput
from capo.models.diffusers_common import initial_noise
from capo.schedules import FlowSchedule, VPSchedule
from capo.shapes import nets

WEIGHTS_FILE = "model.safetensors"
IMAGE_CHANNELS = 3


@dataclasses.dataclass
class ShapesOptions:
    """Options of ``load_shapes_vp`` / ``load_shapes_flow`` (``load_model(family, path, **options)``)."""

    device: str | torch.device | None = None  # None: cuda if available, else cpu
    dtype: str | torch.dtype | None = None  # None: float32
    load_text_encoders: bool = True  # False: embeddings must come from the cache
    load_vae: bool = True  # accepted for interface parity; pixel space has no VAE

    @classmethod
    def parse(cls, options: dict[str, Any]) -> ShapesOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise CapoError(f"shapes model: unknown option(s) {unknown} (known: {sorted(names)})")
        return cls(**options)


def encode_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images [B, H, W, 3] -> latents x = image / 127.5 − 1, float32 [B, 3, H, W] in [-1, 1]."""
    pixels = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1.0


def latents_to_uint8(latents: torch.Tensor) -> np.ndarray:
    """Latents [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] = round((x + 1) · 127.5), clipped."""
    pixels = ((latents.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` on ``device`` in ``dtype`` (cast only when needed), in eval mode."""
    module.to(device)
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module.eval()


class ShapesAdapter(DiffusionAdapter):
    """A shapes model: word tokenizer + CLIPTextModel + UNet2DConditionModel in pixel space."""

    kind: str = "base"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                    "ff.net.2")

    def __init__(self, settings: dict[str, Any], unet: torch.nn.Module,
                 text_encoder: torch.nn.Module | None, device: torch.device, dtype: torch.dtype):
        self.settings = settings
        self.tokenizer = nets.WordTokenizer.from_dict(settings["tokenizer"])
        self.device, self.dtype = device, dtype
        self.denoiser = _to(unet, device, dtype)
        self.text_encoder = None if text_encoder is None else _to(text_encoder, device, dtype)
        self.patch = int(settings["patch"])
        self.default_steps = int(settings["default_steps"])
        self.default_guidance = float(settings["default_guidance"])
        self.schedule = self.make_schedule(settings["schedule"])
        self._uncond: torch.Tensor | None = None

    # -- family parts ------------------------------------------------------------------------
    @staticmethod
    def make_schedule(config: dict[str, Any]) -> Any:
        raise NotImplementedError

    def unet_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The UNet's timestep input for t [B] in (0, 1)."""
        raise NotImplementedError

    def time_grid(self, steps: int) -> torch.Tensor:
        """Sampling times t_0 > t_1 > ... > t_steps = 0, float64 [steps + 1]."""
        raise NotImplementedError

    def step(self, x: torch.Tensor, out: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        """One sampler update x_t -> x_{t_next} from the guided model output ``out``."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, int, int]:
        side = int(self.denoiser.config.sample_size) * self.patch
        return (IMAGE_CHANNELS, side, side)

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """{"encoder_hidden_states": CLIP last hidden states [B, L, D]} (the cacheable tensors)."""
        if self.text_encoder is None:
            raise CapoError(f"{self.family}: text encoder not loaded (load_text_encoders=False); "
                            "embeddings must come from the cache")
        ids = self.tokenizer(prompts).to(self.device)
        with torch.no_grad():
            hidden = self.text_encoder(input_ids=ids).last_hidden_state
        return {"encoder_hidden_states": hidden.detach()}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, emb: dict[str, torch.Tensor]) -> torch.Tensor:
        """UNet output for x_t [B, 3, H, W] at t [B]: ε̂ (vp) or û (flow), [B, 3, H, W]."""
        out = self.denoiser(
            nets.to_patches(x_t.to(self.device, self.dtype), self.patch),
            self.unet_timestep(t.to(self.device)),
            encoder_hidden_states=emb["encoder_hidden_states"].to(self.device, self.dtype),
            return_dict=False,
        )[0]
        return nets.from_patches(out, self.patch)

    def unconditional(self, n: int) -> torch.Tensor:
        """Embedding of the empty prompt ∅ (the CFG baseline), [n, L, D]; computed once."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])["encoder_hidden_states"]
        return self._uncond.expand(n, -1, -1)

    def guided(self, x: torch.Tensor, t: float, cond: torch.Tensor, guidance: float) -> torch.Tensor:
        """CFG output out(∅) + w (out(c) − out(∅)), both halves in one [2B] forward; float32."""
        n = x.shape[0]
        if guidance == 1.0:
            return self.denoise(x, torch.full((n,), t), {"encoder_hidden_states": cond}).float()
        both = self.denoise(torch.cat([x, x]), torch.full((2 * n,), t),
                            {"encoder_hidden_states": torch.cat([self.unconditional(n), cond])})
        out_uncond, out_cond = both.float().chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
               guidance: float | None = None, emb: dict[str, torch.Tensor] | None = None) -> SampleOutput:
        """One sample per prompt from noise seeded by seeds[i]; latents float32 [B, 3, H, W] in [-1, 1]."""
        if len(prompts) != len(seeds):
            raise CapoError(f"{self.family}: {len(prompts)} prompts but {len(seeds)} seeds")
        steps = self.default_steps if steps is None else int(steps)
        guidance = self.default_guidance if guidance is None else float(guidance)
        if steps < 1:
            raise CapoError(f"{self.family}: steps must be >= 1, got {steps}")
        cond = (self.encode_prompts(prompts) if emb is None else emb)["encoder_hidden_states"]
        cond = cond.to(self.device, self.dtype)
        x = initial_noise(seeds, self.latent_shape()).to(self.device)
        grid = self.time_grid(steps).tolist()
        with torch.no_grad():
            for t, t_next in zip(grid[:-1], grid[1:], strict=True):
                x = self.step(x, self.guided(x, t, cond, guidance), t, t_next)
        latents = x.clamp(-1, 1).float()
        return SampleOutput(latents=latents, images=self.decode(latents))

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Pixel space: latents [B, 3, H, W] in [-1, 1] -> RGB PIL images."""
        return [Image.fromarray(a) for a in latents_to_uint8(latents)]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``capo_shapes.json`` and ``model.safetensors`` (UNet + text encoder) to ``directory``."""
        if self.text_encoder is None:
            raise CapoError(f"{self.family}: cannot save without the text encoder (load it first)")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"unet.{k}": v for k, v in self.denoiser.state_dict().items()}
        tensors |= {f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()}
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
                  str(out / WEIGHTS_FILE))
        (out / SHAPES_MARKER).write_text(json.dumps(self.settings, indent=1) + "\n")
        return out


class ShapesVP(ShapesAdapter):
    """SDXL-like: SDXL's scaled-linear VP schedule, ε-prediction, DDIM sampling."""

    family, kind, prediction_type = "shapes-vp", "vp", "epsilon"

    @staticmethod
    def make_schedule(config: dict[str, Any]) -> VPSchedule:
        """ᾱ of diffusers' DDPMScheduler(**config) (SD/SDXL: scaled_linear, 0.00085 to 0.012)."""
        return VPSchedule.from_alphas_cumprod(DDPMScheduler(**config).alphas_cumprod)

    def unet_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The discrete index round(t · T)."""
        return self.schedule.timestep_index(t)

    def time_grid(self, steps: int) -> torch.Tensor:
        """"Trailing" DDIM indices round(T − k T / steps) − 1, k < steps (Lin et al. 2024), then 0."""
        T = self.schedule.num_train_timesteps
        idx = np.round(T - np.arange(steps) * T / steps) - 1
        return torch.tensor([*(idx / T), 0.0], dtype=torch.float64)

    def step(self, x: torch.Tensor, out: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        """DDIM, η = 0 (Song et al. 2021, Eq. 12): x̂0 = clip((x_t − σ_t ε̂) / α_t),
        x_{t'} = α_{t'} x̂0 + σ_{t'} ε̂, with (α, σ) = (1, 0) at t' = 0 (the clean sample)."""
        now = self.schedule(torch.tensor([t], dtype=torch.float64))
        alpha, sigma = float(now.alpha), float(now.sigma)
        alpha_next, sigma_next = 1.0, 0.0
        if t_next > 0:
            nxt = self.schedule(torch.tensor([t_next], dtype=torch.float64))
            alpha_next, sigma_next = float(nxt.alpha), float(nxt.sigma)
        x0 = ((x - sigma * out) / alpha).clamp(-1, 1)
        return alpha_next * x0 + sigma_next * out


class ShapesFlow(ShapesAdapter):
    """SD3-like: rectified flow with timestep shift, velocity prediction, Euler sampling."""

    family, kind, prediction_type = "shapes-flow", "flow", "flow"

    @staticmethod
    def make_schedule(config: dict[str, Any]) -> FlowSchedule:
        return FlowSchedule(shift=float(config["shift"]))

    def unet_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """1000 · s with s = shift(t), as SD3 feeds its transformer."""
        return 1000.0 * self.schedule.sigma_of(t.double()).float()

    def time_grid(self, steps: int) -> torch.Tensor:
        """Uniform u_k = 1 − k / steps, k = 0..steps (the shift is applied in ``step``)."""
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)

    def step(self, x: torch.Tensor, out: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        """Euler on dx/ds = u: x_{s'} = x_s + (s' − s) û, s = shift(t)."""
        s, s_next = self.schedule.sigma_of(torch.tensor([t, t_next], dtype=torch.float64)).tolist()
        return x + (s_next - s) * out


#: kind -> adapter class
KINDS: dict[str, type[ShapesAdapter]] = {"vp": ShapesVP, "flow": ShapesFlow}
#: family name -> kind
FAMILY_KINDS: dict[str, str] = {cls.family: kind for kind, cls in KINDS.items()}
#: per-kind schedule and sampling defaults of a new model (steps and CFG scale chosen with
#: bench/shapes_base_accuracy.py: 10 steps score as 20 within 0.01; CFG 1.5 beats 3-4, where
#: guidance away from the many-object unconditional empties single-object images)
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "vp": {"schedule": {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                        "beta_start": 0.00085, "beta_end": 0.012},
           "default_steps": 10, "default_guidance": 1.5},
    "flow": {"schedule": {"shift": 1.0}, "default_steps": 10, "default_guidance": 1.5},
}


def _kind(kind: str) -> type[ShapesAdapter]:
    if kind not in KINDS:
        raise CapoError(f"unknown shapes model kind '{kind}' (known: {', '.join(KINDS)})")
    return KINDS[kind]


def new_settings(kind: str, size: str = "default", **overrides: Any) -> dict[str, Any]:
    """The ``capo_shapes.json`` content of a new model of ``kind`` and ``size`` (no weights)."""
    from capo.shapes.world import IMAGE_SIZE, VOCAB

    tokenizer = nets.WordTokenizer(VOCAB, max_length=12)
    widths = nets.net_size(size)
    settings = {
        "family": _kind(kind).family, "kind": kind, "size": size, "patch": widths.patch,
        "tokenizer": tokenizer.to_dict(),
        "text_encoder": nets.text_config(widths, tokenizer),
        "unet": nets.unet_config(widths, IMAGE_SIZE, IMAGE_CHANNELS),
        **json.loads(json.dumps(KIND_DEFAULTS[kind])),
    }
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise CapoError(f"unknown shapes model setting '{unknown[0]}'")
    return settings | overrides


def _from_settings(settings: dict[str, Any], opts: ShapesOptions,
                   state: dict[str, torch.Tensor] | None) -> ShapesAdapter:
    """The adapter of ``settings``; ``state`` (prefixed tensors) or a random init when None."""
    cls = _kind(settings.get("kind", ""))
    unet = nets.build_unet(settings["unet"])
    text = nets.build_text_encoder(settings["text_encoder"]) if opts.load_text_encoders else None
    if state is not None:
        parts = {"unet.": unet, "text_encoder.": text}
        for prefix, module in parts.items():
            if module is not None:
                sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                module.load_state_dict(sub, strict=True)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype if opts.dtype is not None else torch.float32, device)
    return cls(settings, unet, text, device, dtype)


def build_shapes_model(kind: str, size: str = "default", seed: int = 0, **options: Any) -> ShapesAdapter:
    """A randomly initialised shapes model (torch's RNG seeded with ``seed``, then restored)."""
    settings = new_settings(kind, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _from_settings(settings, ShapesOptions.parse(options), None)


def shipped_path(kind: str) -> Path:
    """Directory of the weights that ship in the package (``capo/shapes/weights/KIND``)."""
    _kind(kind)
    return Path(str(files("capo.shapes").joinpath("weights", kind)))


def load_shapes(kind: str, path: str | Path | None = None, **options: Any) -> ShapesAdapter:
    """Load a saved shapes model of ``kind`` from ``path`` (None: the shipped weights)."""
    opts = ShapesOptions.parse(options)
    where = shipped_path(kind) if path is None else Path(path)
    marker, weights = where / SHAPES_MARKER, where / WEIGHTS_FILE
    if not marker.is_file() or not weights.is_file():
        raise CapoError(f"not a saved shapes model (needs {SHAPES_MARKER} and {WEIGHTS_FILE})",
                        path=str(where))
    try:
        settings = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise CapoError(f"invalid JSON: {e}", path=str(marker)) from None
    if settings.get("kind") != kind:
        raise CapoError(f"holds a '{settings.get('kind')}' shapes model, not '{kind}'", path=str(marker))
    try:
        return _from_settings(settings, opts, load_file(str(weights)))
    except (RuntimeError, KeyError, TypeError) as e:
        raise CapoError(f"weights do not match the config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]})", path=str(weights)) from None


def load_shapes_vp(path: str | Path | None = None, **options: Any) -> ShapesAdapter:
    """``shapes-vp``: the shipped VP/ε model, or one saved by ``save_pretrained`` at ``path``."""
    return load_shapes("vp", path, **options)


def load_shapes_flow(path: str | Path | None = None, **options: Any) -> ShapesAdapter:
    """``shapes-flow``: the shipped rectified-flow model, or one saved at ``path``."""
    return load_shapes("flow", path, **options)
