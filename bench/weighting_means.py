"""E_t f(t) of each loss weighting under each family's training t-distribution (docs/objectives.md).

The factor that ``normalize_weighting`` divides f by (computed as ``capo train`` does, by
capo.weighting.mean_weight: exact over the VP timesteps, Gauss–Legendre quadrature for flow), so
also the factor between capo's beta with and without normalisation. Prints a Markdown table.

    python bench/weighting_means.py
"""

from __future__ import annotations

import math

from capo.models.diffusers_common import flow_schedule, vp_schedule
from capo.models.shapes import KIND_DEFAULTS, ShapesFlow
from capo.weighting import WEIGHTINGS, mean_weight

#: SD 1.x / 2.x / SDXL scheduler config (shapes-vp uses the same table)
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
}
SCHEDULES = {
    "shapes-vp, SD 1.x/2.x, SDXL (scaled-linear VP, 1000 steps)": lambda: vp_schedule(SD_SCHEDULER)[0],
    "shapes-flow (shift 1)": lambda: ShapesFlow.make_schedule(KIND_DEFAULTS["flow"]["schedule"]),
    "SD3 / SD3.5 (shift 3)": lambda: flow_schedule(3.0)[0],
    "FLUX.1 at 1024 px (dynamic shift e^1.15)": lambda: flow_schedule(math.exp(1.15))[0],
}
BIASES = (1.0, 1.5, 2.0)


def main() -> None:
    print("| schedule | constant | " + " | ".join(f"sigmoid b = {b:g}" for b in BIASES) + " |")
    print("|---" * (2 + len(BIASES)) + "|")
    for name, make in SCHEDULES.items():
        s = make()
        means = [mean_weight(WEIGHTINGS["constant"](), s)]
        means += [mean_weight(WEIGHTINGS["sigmoid"](bias=b), s) for b in BIASES]
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means) + " |")


if __name__ == "__main__":
    main()
