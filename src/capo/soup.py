"""Model soups: merge k models fine-tuned from one base θ₀ (paper Sec. 5.2, docs/design.md §2.9).

Task vectors τ_i = θ_i − θ₀ are merged per tensor by ``merge_task_vectors``, linearly
(θ₀ + Σ w_i τ_i) or by a weighted spherical mean (slerp for two models, order-independent for
any k). LoRA adapters are first turned into dense deltas ΔW = s · B A, which are their task
vectors. Merging is done one tensor at a time in at least float32, and cast back to the base dtype.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from capo.errors import CapoError

StateDict = Mapping[str, Tensor]
_PARALLEL = 1e-6  # below this sin Ω the two vectors are (anti)parallel and slerp becomes lerp
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def _weights(k: int, weights: Sequence[float] | None) -> list[float]:
    """The merge weights w_1..w_k; uniform 1/k by default."""
    if k < 1:
        raise CapoError("merge: need at least one model")
    if weights is None:
        return [1.0 / k] * k
    if len(weights) != k:
        raise CapoError(f"merge: {len(weights)} weights given for {k} models")
    return [float(w) for w in weights]


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _check_like(base: StateDict, sd: StateDict, name: str) -> None:
    """``sd`` must hold the same keys and shapes as ``base``."""
    odd = sorted(set(base) ^ set(sd))
    if odd:
        where = "missing from" if odd[0] in base else "not in the base but in"
        raise CapoError(f"merge: key '{odd[0]}' {where} {name}")
    for key, value in sd.items():
        if value.shape != base[key].shape:
            raise CapoError(f"merge: key '{key}' of {name} has shape {tuple(value.shape)}, "
                            f"base has {tuple(base[key].shape)}")


def task_vectors(base: StateDict, state_dicts: Sequence[StateDict]) -> list[dict[str, Tensor]]:
    """τ_i = θ_i − θ₀ for every floating-point tensor (Sec. 5.2); one dict per model."""
    for i, sd in enumerate(state_dicts):
        _check_like(base, sd, f"model {i}")
    return [{k: sd[k].to(_work_dtype(v)) - v.to(_work_dtype(v)) for k, v in base.items()
             if v.is_floating_point()} for sd in state_dicts]


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation of two tensors viewed as vectors, same shape in and out.

    slerp(a, b; t) = sin((1 − t) Ω)/sin Ω · a + sin(t Ω)/sin Ω · b, Ω the angle between a and b,
    computed as 2 atan2(|â − b̂|, |â + b̂|). Zero or (anti)parallel vectors fall back to
    lerp (1 − t) a + t b.
    """
    norm_a, norm_b = a.norm().item(), b.norm().item()
    if norm_a == 0 or norm_b == 0:
        return (1 - t) * a + t * b
    unit_a, unit_b = a / norm_a, b / norm_b
    omega = 2 * math.atan2((unit_a - unit_b).norm().item(), (unit_a + unit_b).norm().item())
    sin_omega = math.sin(omega)
    if sin_omega < _PARALLEL:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * omega) / sin_omega) * a + (math.sin(t * omega) / sin_omega) * b


def combine_linear(taus: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ_i w_i τ_i, the task vector of a linear soup (Sec. 5.2)."""
    return sum((w * tau for w, tau in zip(weights, taus, strict=True)), torch.zeros_like(taus[0]))


def combine_slerp(taus: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Weighted spherical mean of k task vectors, Σ_i c_i τ_i: slerp generalised to k models.

    With w_i the weights normalised to sum 1 and û_i = τ_i / |τ_i| the directions, q is their
    weighted spherical (Karcher) mean on the unit sphere, the fixed point of
        q = Σ_i w_i (θ_i / sin θ_i) û_i / Σ_j w_j θ_j cot θ_j,   θ_i = ∠(q, û_i)
    (Buss & Fillmore 2001, the zero of Σ_i w_i log_q(û_i)); the merged task vector takes q's
    coefficients onto the raw vectors: c_i = w_i (θ_i / sin θ_i) / Σ_j w_j θ_j cot θ_j. It is a
    symmetric function of the pairs (τ_i, w_i), so the order of the models does not matter; for
    k = 2 it is the closed-form slerp(τ_1, τ_2; t = w_2 / (w_1 + w_2)), since q then lies at angle
    tΩ from û_1 and c_1 = sin((1 − t)Ω)/sin Ω. Parallel vectors give c_i = w_i (linear). A zero
    task vector, directions with no unique mean (opposite ones) or no convergence fall back to the
    normalised linear merge Σ_i w_i τ_i, as ``slerp`` does for two. Scalars in float64 on the
    k x k Gram matrix of the directions.
    """
    if any(w <= 0 for w in weights):
        raise CapoError(f"slerp merge: weights must be > 0, got {list(weights)}")
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    flat = torch.stack([tau.reshape(-1).to(torch.float64) for tau in taus])
    norms = flat.norm(dim=1)
    c = w
    if bool((norms > 0).all()):
        unit = flat / norms[:, None]
        c = _spherical_mean_coefficients(unit @ unit.T, w)
    return sum((float(ci) * tau for ci, tau in zip(c, taus, strict=True)), torch.zeros_like(taus[0]))


def _spherical_mean_coefficients(gram: Tensor, w: Tensor, steps: int = 200) -> Tensor:
    """c [k] of ``combine_slerp`` from the Gram matrix [k, k] of unit vectors and weights w [k]
    (sum 1); w itself when the mean is not unique. q = Σ a_i û_i is kept as coefficients a [k];
    each step moves q along the Karcher gradient v = Σ_i w_i log_q(û_i) by exp_q(v)."""
    a = w / (w @ gram @ w).clamp_min(0).sqrt()
    if not torch.isfinite(a).all():
        return w
    for _ in range(steps):
        theta = torch.arccos((gram @ a).clamp(-1.0, 1.0))  # θ_i = ∠(q, û_i)
        if bool((torch.sin(theta) < _PARALLEL).logical_and(theta > 1.0).any()):
            return w  # an opposite direction: no unique mean
        ratio = torch.where(torch.sin(theta) < _PARALLEL, torch.ones_like(theta), theta / torch.sin(theta))
        v = w * ratio - (w * ratio * torch.cos(theta)).sum() * a  # Σ w_i θ_i/sin θ_i (û_i − cos θ_i q)
        size = (v @ gram @ v).clamp_min(0).sqrt()
        if size < 1e-11:
            return w * ratio / (w * ratio * torch.cos(theta)).sum()
        a = torch.cos(size) * a + torch.sin(size) / size * v
        a = a / (a @ gram @ a).sqrt()  # back onto the sphere against rounding
    return w


COMBINES: dict[str, Callable[[Sequence[Tensor], Sequence[float]], Tensor]] = {
    "linear": combine_linear,
    "slerp": combine_slerp,
}


def merge_task_vectors(base: StateDict, taus: Sequence[StateDict], method: str = "linear",
                       weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """The model soup θ = θ₀ + COMBINES[method](τ_1..τ_k), per tensor (Sec. 5.2).

    τ_i maps base weight names to task vectors (θ_i − θ₀ from ``task_vectors``, or a LoRA's
    dense deltas from ``lora_delta``); a tensor a model leaves alone has τ_i = 0. Uniform
    weights 1/k by default. One tensor at a time in at least float32, cast back to the base dtype;
    non-float tensors are the base's.
    """
    if method not in COMBINES:
        raise CapoError(f"merge: unknown method '{method}'; known: {sorted(COMBINES)}")
    combine, w = COMBINES[method], _weights(len(taus), weights)
    for i, delta in enumerate(taus):
        for key, value in delta.items():
            if key not in base or base[key].shape != value.shape:
                raise CapoError(f"merge: model {i} key '{key}' {tuple(value.shape)} matches no "
                                "base tensor (pass task vectors or dense deltas from lora_delta)")
    merged = {key: value.clone() for key, value in base.items()}
    for key in sorted(set().union(*taus)):
        theta0 = base[key]
        dt = _work_dtype(theta0)
        per_model = [d[key].to(dt) if key in d else torch.zeros_like(theta0, dtype=dt) for d in taus]
        merged[key] = (theta0.to(dt) + combine(per_model, w)).to(theta0.dtype)
    return merged


def _lora_pairs(lora: StateDict, adapter_name: str | None) -> dict[str, dict[str, Tensor]]:
    """{module: {"A": lora_A weight, "B": lora_B weight}} from peft/diffusers key names."""
    found: dict[str, dict[str, Tensor]] = {}
    adapters = set()
    for key, value in lora.items():
        if ".lora_" not in key:
            continue  # base weights of a full peft model state dict
        m = _LORA_KEY.match(key)
        if m is None:
            raise CapoError(f"LoRA: unsupported key '{key}' (only lora_A/lora_B weights)")
        if adapter_name is not None and m["adapter"] not in (None, adapter_name):
            continue
        adapters.add(m["adapter"])
        found.setdefault(m["module"], {})[m["ab"]] = value
    if len(adapters) > 1:
        raise CapoError(f"LoRA: several adapters {sorted(map(str, adapters))}; pick adapter_name")
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise CapoError(f"LoRA: module '{module}' lacks lora_{({'A', 'B'} - set(ab)).pop()}")
    return found


def _strip(module: str, prefixes: Sequence[str]) -> str:
    for prefix in prefixes:
        if module.startswith(prefix):
            module = module[len(prefix):]
    return module


def lora_delta(lora_state_dict: StateDict, scaling: float | None = None, *,
               alpha: float | None = None, adapter_name: str | None = None,
               strip_prefixes: Sequence[str] = ("base_model.model.",)) -> dict[str, Tensor]:
    """Dense deltas ΔW = s · B A of a LoRA, keyed by the base weight name ``module.weight``.

    B [out, r] or [out, r, 1, 1], A [r, in] or [r, in, kh, kw] -> ΔW [out, in] or
    [out, in, kh, kw] (linear and conv layers, as peft's merge). s = ``scaling``, or alpha / r
    with r read from A. Keys follow peft/diffusers: ``….lora_A[.ADAPTER].weight``.
    """
    if (scaling is None) == (alpha is None):
        raise CapoError("lora_delta: give exactly one of scaling or alpha")
    deltas = {}
    for module, ab in _lora_pairs(lora_state_dict, adapter_name).items():
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        if b.shape[1] != rank or any(d != 1 for d in b.shape[2:]):
            raise CapoError(f"LoRA: module '{module}': lora_B {tuple(b.shape)} does not match "
                            f"lora_A {tuple(a.shape)}")
        s = scaling if scaling is not None else alpha / rank
        dt = _work_dtype(a)
        deltas[_strip(module, strip_prefixes) + ".weight"] = s * torch.einsum(
            "or,r...->o...", b.flatten(1).to(dt), a.to(dt))
    return deltas
