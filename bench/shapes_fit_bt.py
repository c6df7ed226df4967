"""``capo fit-bt`` on the shapes world's preference data: fitted vs declared Bradley-Terry scales.

    python bench/shapes_fit_bt.py [--groups 300] [--work /tmp/capo-shapes-fit-bt]

Writes held-out preference pairs as train_preference makes them (groups of 6 variants of a held-out
prompt, every pair labelled by the hidden utility 3·alignment + 4·aesthetic + 0.3·noise) to
WORK/pairs.parquet, then runs ``capo fit-bt`` for shapes-alignment, shapes-aesthetic and
shapes-preference and prints one JSON line per reward. Figures: docs/rewards.md ("capo fit-bt").
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capo.recipes.train_preference import PreferenceTrainConfig, group_pairs, make_groups
from capo.rewards.fit_bt import FitBTConfig, fit


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=300)
    parser.add_argument("--work", type=Path, default=Path("/tmp/capo-shapes-fit-bt"))
    args = parser.parse_args()
    cfg = PreferenceTrainConfig()
    data = make_groups("heldout", args.groups, cfg, np.random.default_rng(1))
    pairs = group_pairs(args.groups, cfg.group_size, data["utility"])
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "pairs.parquet"
    columns = {
        "prompt": [data["prompts"][w] for w, _ in pairs],
        "chosen": [png(data["images"][w]) for w, _ in pairs],
        "rejected": [png(data["images"][lo]) for _, lo in pairs],
    }
    pq.write_table(pa.table(columns), path)
    for reward in ("shapes-alignment", "shapes-aesthetic", "shapes-preference"):
        result = fit(FitBTConfig(pairs=str(path), reward=reward))
        print(json.dumps({k: result[k] for k in ("reward", "n", "scale", "scale_se", "declared_bt_scale",
                                                 "nll", "nll_at_declared", "agreement")}))  # fmt: skip


if __name__ == "__main__":
    main()
