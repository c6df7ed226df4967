"""Training diagnostics of ``capo train`` (issue 10): is β sensible, how noisy is βΔ_θ, is every
step clipped?

Per step (from the metrics of ``preference_step``, averaged over all pairs of the step):
E[ΔR_ca], E[βΔ_θ], std(βΔ_θ) over the step's pairs, the fraction of pairs with βΔ_θ within 0.1
of its target, the loss and its value at Δ_θ = 0 (the base model's: E[ΔR_ca²] for CaPO, 1 for
IPO), and whether the gradient norm was clipped. ``summary`` averages them over all steps and
over the last ``window`` steps, for train_summary.json. ``check`` returns, once, a plain-words
warning when a CaPO/IPO loss stays above its starting value after warm-up: the sign that β is
too large (βΔ_θ overshoots and jitters around its target instead of settling on it).
"""

from __future__ import annotations

import math
from typing import Any

#: per-step diagnostics kept and summarised (all means over the step's pairs, or 0/1 for clipped)
KEYS = ("loss", "loss_at_start", "delta_rca", "beta_delta_theta", "beta_delta_theta_std",
        "near_target", "clipped")
#: objectives whose loss has a fixed point, so a loss above its start means β is too large
WATCHED = frozenset({"capo", "ipo"})
#: the loss counts as above its start when its window mean exceeds RISE × the start's window mean
RISE = 1.1


def step_values(metrics: dict[str, float], grad_norm: float, max_grad_norm: float) -> dict[str, float]:
    """The step's metrics with std(βΔ_θ) = sqrt(E[(βΔ_θ)²] − E[βΔ_θ]²) over its pairs (in place of
    E[(βΔ_θ)²]) and clipped = 1 when grad_norm > max_grad_norm > 0 (the step was clipped), else 0."""
    out = dict(metrics)
    square = out.pop("beta_delta_theta_sq")
    out["beta_delta_theta_std"] = math.sqrt(max(square - out["beta_delta_theta"] ** 2, 0.0))
    out["clipped"] = float(0 < max_grad_norm < grad_norm)
    return out


class Diagnostics:
    """Collects the per-step diagnostics of one ``capo train`` process (steps after a resume)."""

    def __init__(self, objective: str, beta: float, max_steps: int, warmup_steps: int):
        self.objective, self.beta = objective, beta
        self.window = max(5, max_steps // 10)
        self.warmup = max(warmup_steps, max_steps // 10)
        self.history: dict[str, list[float]] = {k: [] for k in KEYS}
        self.warning: str | None = None

    def record(self, metrics: dict[str, float]) -> None:
        for k in KEYS:
            self.history[k].append(float(metrics[k]))

    def _mean(self, key: str, last: int | None = None) -> float:
        values = self.history[key][-last:] if last else self.history[key]
        return sum(values) / len(values)

    def check(self) -> str | None:
        """The 'β too large' warning the first time it applies (then None): after warm-up, the
        mean loss of the last ``window`` steps exceeds RISE × its mean starting value."""
        steps = len(self.history["loss"])
        if self.warning or self.objective not in WATCHED or steps < self.warmup + self.window:
            return None
        loss, start = self._mean("loss", self.window), self._mean("loss_at_start", self.window)
        if loss <= RISE * start:
            return None
        self.warning = (
            f"warning: the {self.objective} loss has stayed above its starting value for the last "
            f"{self.window} steps ({loss:.4g} against {start:.4g}, the loss of the untrained model). "
            f"beta = {self.beta:g} is probably too large: beta x the implicit reward margin overshoots "
            "and jitters around its target instead of settling on it. Try a smaller --beta "
            "(e.g. 10 times smaller), or more --draws per pair (docs/objectives.md).")
        return self.warning

    def summary(self) -> dict[str, Any]:
        """Means of every diagnostic over all steps and over the last ``window`` steps; mean.clipped
        is the fraction of clipped steps; beta_too_large tells whether ``check`` warned."""
        if not self.history["loss"]:
            return {"steps": 0}
        return {"steps": len(self.history["loss"]), "window": self.window,
                "mean": {k: self._mean(k) for k in KEYS},
                "last": {k: self._mean(k, self.window) for k in KEYS},
                "beta_too_large": self.warning is not None, "warning": self.warning}
