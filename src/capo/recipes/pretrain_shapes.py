"""``capo shapes pretrain``: train a shapes model (text encoder + UNet) from the renderer.

The data are (caption, image) pairs from ``capo.shapes.world.pretraining_batch``, rendered once
into a pool that training cycles through. Each step draws x ~ pool, ε ~ N(0, I), a time t and
minimises the weighted denoising loss L = mean_b w(t_b) ‖out(x_t, t_b, c) − target‖², with
x_t = α_t x + σ_t ε and target = ε (vp) or ε − x (flow). The recipes follow the real models:
vp samples t uniformly (DDPM) and weights with min-SNR-γ, w = min(SNR_t, γ) / SNR_t (Hang et
al. 2023); flow samples u = sigmoid(n), n ~ N(0, 1) ("logit-normal", SD3, Esser et al. 2024)
with w = 1. Captions are replaced by the empty prompt with probability ``cond_dropout`` so the
model also learns p(x | ∅) for classifier-free guidance (Ho & Salimans 2022). AdamW with linear
warm-up and cosine decay; the saved weights are an exponential moving average.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from capo.config import add_arguments, build, doc, to_dict
from capo.errors import CapoError
from capo.models.shapes import KINDS, ShapesAdapter, build_shapes_model, encode_images
from capo.schedules import add_noise, target_of
from capo.shapes import nets

README = "README.txt"


@dataclass
class PretrainConfig:
    """Settings of ``capo shapes pretrain`` (YAML section ``pretrain`` or flags)."""

    kind: str = doc("model kind: vp (VP, ε-prediction) | flow (rectified flow)", "vp")
    out: str = doc("output directory (the save_pretrained layout)", "")
    size: str = doc("network size: default | tiny", "default")
    steps: int = doc("optimizer steps (the LR schedule's length)", 3000)
    minutes: float | None = doc("wall-clock cap in minutes; stops early and saves", None)
    batch_size: int = doc("images per step", 64)
    learning_rate: float = doc("AdamW peak learning rate", 2e-3)
    warmup_steps: int = doc("linear warm-up steps, then cosine decay to 0", 100)
    weight_decay: float = doc("AdamW weight decay", 0.0)
    max_grad_norm: float = doc("gradient-norm clipping threshold (0: off)", 1.0)
    ema_decay: float = doc("EMA decay of the saved weights (0: save the raw weights)", 0.995)
    cond_dropout: float = doc("probability of training on the empty prompt (for CFG)", 0.1)
    caption_noise: float = doc("probability of a wrong caption (world.pretraining_batch)", 0.0)
    t_sampling: str | None = doc("time sampling: uniform | logit_normal (None: the kind's recipe)", None)
    min_snr_gamma: float | None = doc("min-SNR-γ loss weight, 0 off (None: the kind's recipe)", None)
    pool_size: int = doc("rendered (caption, image) pairs that training cycles through", 20000)
    seed: int = doc("seed of the initial weights, the data and the noise", 0)
    threads: int | None = doc("torch CPU threads (None: torch's default)", None)
    default_steps: int | None = doc("sampling steps saved as the model's default", None)
    default_guidance: float | None = doc("CFG scale saved as the model's default", None)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise CapoError(f"config key 'kind': unknown shapes model kind '{self.kind}' "
                            f"(known: {', '.join(KINDS)})")
        nets.net_size(self.size)
        if self.t_sampling is not None and self.t_sampling not in T_SAMPLERS:
            raise CapoError(f"config key 't_sampling': unknown '{self.t_sampling}' "
                            f"(known: {', '.join(T_SAMPLERS)})")
        if not self.out:
            raise CapoError("config key 'out': an output directory is required")
        for key in ("steps", "batch_size", "pool_size"):
            if getattr(self, key) < 1:
                raise CapoError(f"config key '{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("cond_dropout", "caption_noise", "ema_decay"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise CapoError(f"config key '{key}' must lie in [0, 1), got {getattr(self, key)}")


def render_pool(n: int, caption_noise: float, seed: int) -> tuple[list[str], np.ndarray]:
    """n (caption, image) pairs from ``pretraining_batch``: captions, uint8 images [n, H, W, 3]."""
    from capo.shapes.world import pretraining_batch

    rng, texts, images = np.random.default_rng(seed), [], []
    for start in tqdm(range(0, n, 500), desc="render pool", unit="chunk"):
        t, im = pretraining_batch(rng, min(500, n - start), caption_noise=caption_noise)
        texts += t
        images.append(im)
    return texts, np.concatenate(images)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay ½(1 + cos(π p)) to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def uniform_t(schedule: Any, n: int, generator: torch.Generator) -> torch.Tensor:
    """t ~ the schedule's own ``sample_t`` (uniform), [n]."""
    return schedule.sample_t(n, generator=generator)


def logit_normal_t(schedule: Any, n: int, generator: torch.Generator) -> torch.Tensor:
    """u = sigmoid(n), n ~ N(0, 1) (SD3's logit-normal), kept inside [t_min, t_max]; [n]."""
    u = torch.sigmoid(torch.randn(n, generator=generator))
    return u.clamp(schedule.t_min, schedule.t_max)


#: --t-sampling -> sampler(schedule, n, generator) -> t [n]
T_SAMPLERS = {"uniform": uniform_t, "logit_normal": logit_normal_t}
#: per-kind recipe used where the config leaves t_sampling / min_snr_gamma unset
KIND_RECIPES: dict[str, dict[str, Any]] = {
    "vp": {"t_sampling": "uniform", "min_snr_gamma": 5.0},
    "flow": {"t_sampling": "logit_normal", "min_snr_gamma": 0.0},
}


def min_snr_weight(schedule: Any, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """w = min(SNR_t, γ) / SNR_t with SNR_t = exp(λ_t) (min-SNR-γ for ε-prediction); γ = 0: w = 1."""
    if gamma <= 0:
        return torch.ones_like(t)
    snr = torch.exp(schedule(t).lam).float()
    return torch.clamp(snr, max=gamma) / snr


def denoising_loss(adapter: ShapesAdapter, x: torch.Tensor, texts: list[str],
                   generator: torch.Generator, t_sampling: str = "uniform",
                   min_snr_gamma: float = 0.0) -> torch.Tensor:
    """L = mean_b w(t_b) ‖out(x_t, t_b, c) − target(x, ε, t_b)‖², x_t = α_t x + σ_t ε; x [B, 3, H, W]."""
    t = T_SAMPLERS[t_sampling](adapter.schedule, x.shape[0], generator)
    eps = torch.randn(x.shape, generator=generator)
    x_t = add_noise(x, eps, t, adapter.schedule).float()
    target = target_of(x, eps, t, adapter.prediction_type, adapter.schedule).float()
    hidden = adapter.text_encoder(input_ids=adapter.tokenizer(texts)).last_hidden_state
    out = adapter.denoise(x_t, t, {"encoder_hidden_states": hidden})
    per_sample = (out - target).pow(2).flatten(1).mean(dim=1)
    return (min_snr_weight(adapter.schedule, t, min_snr_gamma) * per_sample).mean()


class EMA:
    """θ_ema ← d θ_ema + (1 − d) θ with d = min(decay, (1 + n) / (10 + n)) at update n."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay, self.updates = params, decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s)


def _new_model(cfg: PretrainConfig) -> ShapesAdapter:
    adapter = build_shapes_model(cfg.kind, cfg.size, seed=cfg.seed, device="cpu")
    overrides = {"default_steps": cfg.default_steps, "default_guidance": cfg.default_guidance}
    adapter.settings |= {k: v for k, v in overrides.items() if v is not None}
    return adapter


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Train a new shapes model per ``cfg``, save it to ``cfg.out`` with a README; the summary."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    adapter = _new_model(cfg)
    texts, pool = render_pool(cfg.pool_size, cfg.caption_noise, cfg.seed)
    deadline = start + 60 * cfg.minutes if cfg.minutes else math.inf
    steps_done, loss_avg = train_loop(adapter, cfg, texts, pool, deadline)
    adapter.save_pretrained(cfg.out)
    summary = {"steps_done": steps_done, "loss_ema": loss_avg,
               "minutes": (time.perf_counter() - start) / 60, "threads": torch.get_num_threads(),
               "command": command_of(cfg), "config": to_dict(cfg)}
    write_readme(Path(cfg.out), summary)
    return summary


def train_loop(adapter: ShapesAdapter, cfg: PretrainConfig, texts: list[str], pool: np.ndarray,
               deadline: float) -> tuple[int, float | None]:
    """AdamW steps on ``denoising_loss`` until ``cfg.steps`` or ``deadline``; leaves the EMA
    weights in the model (eval mode). Returns (steps done, smoothed loss)."""
    params = [*adapter.denoiser.parameters(), *adapter.text_encoder.parameters()]
    adapter.denoiser.train()
    adapter.text_encoder.train()
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    rng, gen = np.random.default_rng(cfg.seed + 1), torch.Generator().manual_seed(cfg.seed)
    recipe = KIND_RECIPES[cfg.kind] | {k: v for k in KIND_RECIPES[cfg.kind]
                                       if (v := getattr(cfg, k)) is not None}
    bar, loss_avg, step = tqdm(total=cfg.steps, desc=f"pretrain {cfg.kind}", unit="step"), None, 0
    while step < cfg.steps and time.perf_counter() < deadline:
        idx = rng.integers(len(texts), size=cfg.batch_size)
        drop = rng.random(cfg.batch_size) < cfg.cond_dropout
        batch_texts = ["" if d else texts[i] for i, d in zip(idx, drop, strict=True)]
        loss = denoising_loss(adapter, encode_images(pool[idx]), batch_texts, gen, **recipe)
        for group in opt.param_groups:
            group["lr"] = cfg.learning_rate * lr_factor(step, cfg.warmup_steps, cfg.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        if ema is not None:
            ema.update()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}")
    bar.close()
    if ema is not None:
        ema.copy_to_params()
    adapter.denoiser.eval()
    adapter.text_encoder.eval()
    return step, loss_avg


def command_of(cfg: PretrainConfig) -> str:
    """The ``capo shapes pretrain`` command line that reproduces ``cfg`` (non-default flags)."""
    flags = []
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), f.default
        if value != default or f.name in ("kind", "out"):
            flags += ["--" + f.name.replace("_", "-"), str(value)]
    return shlex.join(["capo", "shapes", "pretrain", *flags])


def write_readme(out: Path, summary: dict[str, Any]) -> None:
    """README.txt: the exact command, the measured time and the resolved config."""
    lines = [
        f"shapes-{summary['config']['kind']} model trained by capo shapes pretrain.",
        f"command: {summary['command']}",
        f"measured wall time: {summary['minutes']:.1f} min ({summary['threads']} torch threads), "
        f"{summary['steps_done']} steps, final smoothed loss {summary['loss_ema']}",
        "config: " + json.dumps(summary["config"], sort_keys=True),
    ]
    (out / README).write_text("\n".join(lines) + "\n")


def register(subparsers: Any) -> None:
    """``capo shapes pretrain --kind vp|flow --out DIR [--steps N] [--minutes M] [--config FILE]``."""
    shapes = subparsers.add_parser("shapes", help="the embedded shapes world (pretrain its models)")
    sub = shapes.add_subparsers(dest="shapes_command", metavar="SHAPES_COMMAND")
    p = sub.add_parser("pretrain", help="train a shapes model from the renderer")
    p.add_argument("--config", default=None, help="YAML file whose 'pretrain' section sets defaults")
    add_arguments(p, PretrainConfig)
    p.set_defaults(func=lambda args: _run(build(PretrainConfig, args, args.config, "pretrain")))
    shapes.set_defaults(func=lambda args: shapes.print_help())


def _run(cfg: PretrainConfig) -> None:
    summary = pretrain(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
