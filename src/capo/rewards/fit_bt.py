"""``capo fit-bt``: a reward's Bradley-Terry scale by maximum likelihood on preference pairs.

Rewards without a published temperature (LAION aesthetic, CLIPScore) state a ``bt_scale`` that is
reasoned, not fitted (docs/rewards.md). Given pairs (prompt, chosen image, rejected image) judged
by people (or by a gold utility, in the shapes world), this fits the scale ``s`` of the
Bradley-Terry model of the paper's Eq. 2 with R = s · transform(raw):

    P(chosen > rejected) = sigma(s · Delta),   Delta = ±(transform(raw_chosen) - transform(raw_rejected))

(the sign is - for a reward whose lower raw score is better), by minimising the mean negative
log-likelihood NLL(s) = mean_i log(1 + exp(-s Delta_i)), which is convex in s (Newton's method).

    capo fit-bt --pairs PAIRS.parquet --reward laion-aesthetic [--reward-options '{...}'] [--out fit.json]

``PAIRS`` is a Parquet file or a ``datasets.save_to_disk`` directory with a prompt column and two
image columns (PNG/JPEG bytes, ``{"bytes": ..., "path": ...}`` as ``datasets`` stores images, or
file paths relative to the file); column names are options.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from capo.config import add_arguments, build, doc
from capo.errors import CapoError


@dataclasses.dataclass
class FitBTConfig:
    pairs: str = doc("preference pairs: a Parquet file or a datasets.save_to_disk directory", "")
    reward: str = doc("registry name of the reward to fit", "")
    reward_options: dict = doc("the reward's loader options, as score.reward_options", {})
    prompt_column: str = doc("column of the prompts", "prompt")
    chosen_column: str = doc("column of the preferred images", "chosen")
    rejected_column: str = doc("column of the other images", "rejected")
    limit: int = doc("use only the first N pairs (0: all)", 0, ge=0)
    out: str = doc("also write the fit as JSON to this file ('': print only)", "")


def nll_grad_hess(scale: float, delta: np.ndarray) -> tuple[float, float, float]:
    """NLL(s) = mean log(1 + exp(-s Δ)), its derivative -mean Δ σ(-s Δ) and second derivative
    mean Δ² σ(s Δ) σ(-s Δ); Δ float64 [N]."""
    z = scale * delta
    nll = float(np.mean(np.logaddexp(0.0, -z)))
    p = 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z), stable
    return nll, float(-np.mean(delta * (1.0 - p))), float(np.mean(delta**2 * p * (1.0 - p)))


def fit_bt_scale(delta: np.ndarray, iters: int = 100) -> dict[str, float]:
    """argmin_s NLL(s) (Eq. 2 with R = s · transform(raw)) by Newton's method with step halving from
    s = 0; with its standard error 1 / sqrt(N · NLL''(s)), the NLL and the pairs' agreement rate."""
    delta = np.asarray(delta, np.float64)
    if delta.size == 0 or not np.all(np.isfinite(delta)):
        raise CapoError("fit-bt: no pairs, or non-finite score differences")
    if np.all(delta >= 0) or np.all(delta <= 0):
        raise CapoError("fit-bt: the reward orders every pair the same way as (or against) the labels: "
                        "the maximum-likelihood scale is infinite")  # fmt: skip
    scale = 0.0
    nll, grad, hess = nll_grad_hess(scale, delta)
    for _ in range(iters):
        step = grad / hess
        while (trial := nll_grad_hess(scale - step, delta))[0] > nll + 1e-15:
            step /= 2
        scale -= step
        nll, grad, hess = trial
        if abs(step) < 1e-12 * max(1.0, abs(scale)):
            break
    return {"scale": scale, "scale_se": float(1.0 / np.sqrt(delta.size * hess)), "nll": nll,
            "agreement": float(np.mean(delta > 0)), "n": int(delta.size)}  # fmt: skip


def to_image(value: Any, root: Path) -> Image.Image:
    """PNG/JPEG bytes, a datasets image dict or a path (relative to ``root``) -> RGB image."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else root / value
        return Image.open(path).convert("RGB")
    raise CapoError(f"fit-bt: cannot read an image from a {type(value).__name__}")


def read_pairs(cfg: FitBTConfig) -> tuple[list[str], list[Any], list[Any], Path]:
    """(prompts, chosen, rejected) columns of the Parquet file or datasets directory."""
    path = Path(cfg.pairs)
    if path.is_dir():
        from datasets import load_from_disk

        table = load_from_disk(str(path)).with_format("arrow")[:]
    elif path.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    else:
        raise CapoError(f"{path}: no such Parquet file or datasets directory")
    columns = (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise CapoError(f"{path}: no column '{missing[0]}' (columns: {', '.join(table.column_names)})")
    n = table.num_rows if cfg.limit == 0 else min(cfg.limit, table.num_rows)
    prompts, chosen, rejected = (table.column(c).slice(0, n).to_pylist() for c in columns)
    return prompts, chosen, rejected, path if path.is_dir() else path.parent


def fit(cfg: FitBTConfig) -> dict[str, Any]:
    """Score both images of every pair with the reward and fit its Bradley-Terry scale."""
    from capo.calibration import TRANSFORMS
    from capo.rewards import load_reward

    if not cfg.pairs or not cfg.reward:
        raise CapoError("fit-bt: --pairs and --reward are required")
    prompts, chosen, rejected, root = read_pairs(cfg)
    reward = load_reward(cfg.reward, **cfg.reward_options)
    raw = [reward.score([to_image(v, root) for v in col], prompts) for col in (chosen, rejected)]
    transform = TRANSFORMS[reward.transform]
    sign = 1.0 if reward.higher_is_better else -1.0
    delta = sign * (transform(raw[0].astype(np.float64), 1e-6) - transform(raw[1].astype(np.float64), 1e-6))
    result = fit_bt_scale(delta)
    declared = float(reward.bt_scale)
    return {"reward": reward.name, "pairs": str(cfg.pairs), "transform": reward.transform, **result,
            "declared_bt_scale": declared, "nll_at_declared": nll_grad_hess(declared, delta)[0]}  # fmt: skip


def run(cfg: FitBTConfig) -> dict[str, Any]:
    result = fit(cfg)
    print(json.dumps(result, indent=1))
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def register(sub: Any) -> None:
    parser = sub.add_parser("fit-bt", help="fit a reward's Bradley-Terry scale on preference pairs",
                            description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--config", default=None, help="YAML file of FitBTConfig keys")
    add_arguments(parser, FitBTConfig)

    def func(args: argparse.Namespace) -> None:
        run(build(FitBTConfig, args, args.config))

    parser.set_defaults(func=func)
