"""Noise schedules and the conversion of every model output to ε (docs/design.md §2.1, §2.2).

Forward process x_t = α_t x + σ_t ε, log-SNR λ_t = log(α_t² / σ_t²), λ'_t = dλ_t/dt, where t is
the variable sampled uniformly. Each schedule's ``__call__(t)`` returns (α_t, σ_t, λ_t, λ'_t),
each of shape [B] for t of shape [B].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from capo.errors import CapoError


class Noise(NamedTuple):
    """A schedule at times t [B] (docs/design.md §2.1): x_t = α_t x + σ_t ε, λ_t = log(α_t² / σ_t²),
    λ'_t = dλ_t/dt; each [B]."""

    alpha: Tensor
    sigma: Tensor
    lam: Tensor
    dlam: Tensor


class Schedule(Protocol):
    """What the weighting and the trainer need from a schedule."""

    t_min: float
    t_max: float

    def __call__(self, t: Tensor) -> Noise: ...

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...

    def t_nodes(self) -> tuple[Tensor, Tensor]: ...


def _wide(device: torch.device) -> torch.dtype:
    """float64 for the schedule arithmetic, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _out_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; anything else is returned as float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_range(name: str, t_min: float, t_max: float, lo: float, hi: float) -> None:
    if not lo <= t_min <= t_max <= hi:
        raise CapoError(
            f"{name}: need {lo:g} <= t_min <= t_max <= {hi:g}, got t_min={t_min:g}, t_max={t_max:g}"
        )


class VPSchedule:
    """Discrete VP/DDPM schedule (SD1.5, SDXL): α_t² = ᾱ[i], σ_t² = 1 − ᾱ[i], t = i / T (§2).

    λ[i] = log(ᾱ[i] / (1 − ᾱ[i])); λ'[i] is the finite difference of that table per unit t:
    (λ[i+1] − λ[i−1]) / (2/T) inside, one-sided at the ends of the finite part of the table.
    Indices where ᾱ is 0 or 1 (λ infinite, e.g. zero terminal SNR) lie outside [t_min, t_max].
    """

    def __init__(self, alphas_cumprod: Tensor, t_min: float | None = None,
                 t_max: float | None = None):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        self.num_train_timesteps = T = ac.numel()
        finite = torch.nonzero((ac > 0) & (ac < 1)).flatten()
        if T < 2 or finite.numel() < 2 or finite.numel() != finite[-1] - finite[0] + 1:
            raise CapoError("alphas_cumprod: need at least two consecutive values in (0, 1)")
        lo, hi = int(finite[0]), int(finite[-1])
        lam = torch.full((T,), math.nan, dtype=torch.float64)
        dlam = torch.full((T,), math.nan, dtype=torch.float64)
        lam[lo : hi + 1] = torch.log(ac[lo : hi + 1] / (1 - ac[lo : hi + 1]))
        (dlam[lo : hi + 1],) = torch.gradient(lam[lo : hi + 1], spacing=1.0 / T)
        self.t_min = lo / T if t_min is None else float(t_min)
        self.t_max = hi / T if t_max is None else float(t_max)
        _check_range("VPSchedule", self.t_min, self.t_max, lo / T, hi / T)
        self._table = torch.stack([ac.sqrt(), (1 - ac).sqrt(), lam, dlam])  # [4, T]
        self._on: dict[torch.device, Tensor] = {}

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor | np.ndarray | Sequence[float],
                            **kwargs: float) -> VPSchedule:
        """Build from a scheduler's ``alphas_cumprod`` (length T)."""
        return cls(torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64)), **kwargs)

    def timestep_index(self, t: Tensor) -> Tensor:
        """index = round(t · T), clamped to [0, T − 1]; LongTensor of t's shape."""
        T = self.num_train_timesteps
        return torch.round(t.to(_wide(t.device)) * T).long().clamp(0, T - 1)

    def __call__(self, t: Tensor) -> Noise:
        """(α_t, σ_t, λ_t, λ'_t), each [B], read from the table at index round(t · T)."""
        if t.device not in self._on:
            self._on[t.device] = self._table.to(t.device, _wide(t.device))
        rows = self._on[t.device][:, self.timestep_index(t)].to(_out_dtype(t))
        return Noise(*rows.unbind(0))

    def sample_t(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        """t = randint(T) / T restricted to [t_min, t_max]; float32 [n]."""
        T = self.num_train_timesteps
        i_lo, i_hi = math.ceil(self.t_min * T - 1e-9), math.floor(self.t_max * T + 1e-9)
        gen_device = generator.device if generator is not None else "cpu"
        i = torch.randint(i_lo, i_hi + 1, (n,), generator=generator, device=gen_device)
        return (i.to(_wide(i.device)) / T).float().to(device or gen_device)

    def t_nodes(self) -> tuple[Tensor, Tensor]:
        """The training t-distribution exactly: every t that ``sample_t`` draws (float32 [N], the
        same values) and its probability 1 / N (float64 [N]), so E_t g = Σ_j p_j g(t_j)."""
        T = self.num_train_timesteps
        i_lo, i_hi = math.ceil(self.t_min * T - 1e-9), math.floor(self.t_max * T + 1e-9)
        t = (torch.arange(i_lo, i_hi + 1, dtype=torch.float64) / T).float()
        return t, torch.full(t.shape, 1.0 / t.numel(), dtype=torch.float64)


#: Gauss–Legendre nodes of FlowSchedule.t_nodes (E_u f of the sigmoid weighting to ~1e-12)
FLOW_NODES = 256


class FlowSchedule:
    """Rectified flow (SD3, FLUX): x_t = (1 − s) x + s ε with s = k u / (1 + (k − 1) u) (§2).

    α = 1 − s, σ = s, λ = 2 log((1 − s)/s), λ'_u = dλ/ds · ds/du with dλ/ds = −2 / (s (1 − s))
    and ds/du = k / (1 + (k − 1) u)². u is sampled uniformly in [t_min, t_max] ⊂ (0, 1).
    """

    def __init__(self, shift: float = 1.0, t_min: float = 1e-3, t_max: float = 1 - 1e-3):
        if not shift > 0:
            raise CapoError(f"FlowSchedule: shift must be > 0, got {shift}")
        self.shift, self.t_min, self.t_max = float(shift), float(t_min), float(t_max)
        _check_range("FlowSchedule", self.t_min, self.t_max, 0.0, 1.0)
        if self.t_min <= 0 or self.t_max >= 1:
            raise CapoError("FlowSchedule: t_min and t_max must lie strictly inside (0, 1)")

    def sigma_of(self, u: Tensor) -> Tensor:
        """s = k u / (1 + (k − 1) u), the shifted noise level; shape of u."""
        k = self.shift
        return k * u / (1 + (k - 1) * u)

    def __call__(self, t: Tensor) -> Noise:
        """(α, σ, λ, λ'_u), each [B], for u = t of shape [B]."""
        u, k = t.to(_wide(t.device)), self.shift
        s = self.sigma_of(u)
        lam = 2 * (torch.log1p(-s) - torch.log(s))
        dlam_ds = -2 / (s * (1 - s))
        ds_du = k / (1 + (k - 1) * u) ** 2
        out = (1 - s, s, lam, dlam_ds * ds_du)
        return Noise(*(v.to(_out_dtype(t)) for v in out))

    def sample_t(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        """u ~ U[t_min, t_max]; float32 [n]."""
        gen_device = generator.device if generator is not None else "cpu"
        r = torch.rand((n,), generator=generator, device=gen_device)
        return (self.t_min + (self.t_max - self.t_min) * r).to(device or gen_device)

    def t_nodes(self, n: int = FLOW_NODES) -> tuple[Tensor, Tensor]:
        """Quadrature of u ~ U[t_min, t_max]: nodes u_j (float64 [n]) and weights p_j (Σ p_j = 1)
        with E_u g(u) ≈ Σ_j p_j g(u_j). Gauss–Legendre in z = logit(u), u = σ(z), du = u (1 − u) dz,
        which turns the 1/u and 1/(1 − u) ends of λ'_u into a smooth integrand in z."""
        z, w = np.polynomial.legendre.leggauss(n)
        lo, hi = math.log(self.t_min / (1 - self.t_min)), math.log(self.t_max / (1 - self.t_max))
        u = torch.sigmoid(torch.as_tensor(lo + (hi - lo) * (z + 1) / 2, dtype=torch.float64))
        p = torch.as_tensor(w * (hi - lo) / 2, dtype=torch.float64) * u * (1 - u) / (self.t_max - self.t_min)
        return u, p / p.sum()


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample [B] tensor viewed as [B, 1, ..., 1] to broadcast against ``like``.

    It keeps its float32/64 dtype, so half-precision outputs are converted in float32.
    """
    return v.reshape(-1, *([1] * (like.dim() - 1)))


# ε̂ from a model output (docs/design.md §2.2); fn(out, x_t, α, σ) -> ε̂.
def _eps_from_epsilon(out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return out  # ε̂ = out


def _eps_from_v(out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return sigma * x_t + alpha * out  # ε̂ = σ_t x_t + α_t v̂


def _eps_from_flow(out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return x_t + alpha * out  # ε̂ = x_t + (1 − s) û, with α = 1 − s


PREDICTIONS: dict[str, Callable[..., Tensor]] = {
    "epsilon": _eps_from_epsilon,
    "v_prediction": _eps_from_v,
    "flow": _eps_from_flow,
}


# The output a perfect model gives for data x and noise ε; fn(x, ε, α, σ) -> target.
def _target_epsilon(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return eps  # ε


def _target_v(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * eps - sigma * x  # v = α ε − σ x


def _target_flow(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return eps - x  # u = ε − x


TARGETS: dict[str, Callable[..., Tensor]] = {
    "epsilon": _target_epsilon,
    "v_prediction": _target_v,
    "flow": _target_flow,
}


def _lookup(table: dict, prediction_type: str) -> Callable[..., Tensor]:
    if prediction_type not in table:
        raise CapoError(f"unknown prediction_type '{prediction_type}'; known: {sorted(table)}")
    return table[prediction_type]


def add_noise(x: Tensor, eps: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
    """x_t = α_t x + σ_t ε (docs/design.md §2.1); x, ε [B, ...], t [B] -> x_t [B, ...]."""
    noise = schedule(t)
    return _bcast(noise.alpha, x) * x + _bcast(noise.sigma, x) * eps


def to_epsilon(output: Tensor, x_t: Tensor, t: Tensor, prediction_type: str,
               schedule: Schedule) -> Tensor:
    """ε̂ from a raw model output (docs/design.md §2.2): output, x_t [B, ...], t [B] -> ε̂ [B, ...]."""
    noise = schedule(t)
    alpha, sigma = noise.alpha, noise.sigma
    fn = _lookup(PREDICTIONS, prediction_type)
    return fn(output, x_t, _bcast(alpha, x_t), _bcast(sigma, x_t))


def target_of(x: Tensor, eps: Tensor, t: Tensor, prediction_type: str,
              schedule: Schedule) -> Tensor:
    """The output a perfect model gives for data x and noise ε: ε, v = α ε − σ x or u = ε − x."""
    noise = schedule(t)
    alpha, sigma = noise.alpha, noise.sigma
    fn = _lookup(TARGETS, prediction_type)
    return fn(x, eps, _bcast(alpha, x), _bcast(sigma, x))


def per_sample_error(eps_hat: Tensor, eps: Tensor) -> Tensor:
    """e = mean over non-batch elements of (ε̂ − ε)² (docs/design.md §2.2), in float32; [B, ...] -> [B]."""
    diff = eps_hat.float() - eps.float()
    return diff.pow(2).flatten(1).mean(dim=1)
