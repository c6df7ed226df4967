"""Held-out evaluation shared across the cells of an experiment (the ``evaluate`` stage, base once).

``capo evaluate`` samples and scores the base model every time it runs; an experiment compares
dozens of tuned models with one base model, so :func:`load_eval_set` samples, scores and checks
the base model once per base model (cached in DATA/eval-base/) and keeps the reward models loaded.
Each tuned model is then evaluated by the same :class:`capo.pipeline.evaluate.Evaluation` as
``capo evaluate`` (same initial noise, same files: results.json, results.md, scores.csv,
grid.png), plus images.parquet (prompt, category, base and tuned PNGs, for the report's
per-category grids), written last: it marks the evaluation complete.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capo.config import to_dict
from capo.pipeline.evaluate import EvaluateConfig
from capo.pipeline.evaluation import GOLD, Evaluation
from capo.pipeline.generate import png_bytes
from capo.pipeline.rundir import RunDir, write_table_atomic, write_text_atomic

__all__ = ["GOLD", "IMAGES", "EvalSet", "load_eval_set"]

IMAGES = "images.parquet"


def decode_png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@dataclass
class EvalSet:
    """One base model's evaluation with the base model's images [N] and scores (name -> [N])."""

    evaluation: Evaluation
    base_images: list[Image.Image]
    base: dict[str, np.ndarray]

    def evaluate(self, where: Path, model_dir: Path, desc: str) -> dict[str, Any]:
        """Sample, score and write WHERE/eval/ for the tuned weights in ``model_dir``."""
        ev = self.evaluation
        images = ev.sample(ev.load_model(model_dir), desc)
        tuned = ev.score({"tuned": images})["tuned"]
        run = RunDir.at(where)
        results = ev.write(run, (self.base_images, images), self.base, tuned)
        write_table_atomic(pa.table({
            "prompt_id": [p.prompt_id for p, _ in ev.items],
            "prompt": [p.prompt for p, _ in ev.items],
            "category": [p.category for p, _ in ev.items],
            "seed_idx": [s for _, s in ev.items],
            "base": [png_bytes(im) for im in self.base_images],
            "tuned": [png_bytes(im) for im in images]}), run.eval_dir / IMAGES)  # last: marks eval/ done
        return results


def load_eval_set(data: RunDir, cfg: EvaluateConfig, cache: Path) -> EvalSet:
    """The EvalSet of the data root's base model; the base model's images and scores are read from
    ``cache`` when it holds them for the same settings, else sampled, scored and written there."""
    ev = Evaluation.of(data, cfg, list(cfg.reward), keep_rewards=True)
    for name in ev.names:
        ev.reward(name)
    meta = {"spec": ev.spec, "evaluate": to_dict(cfg), "steps": ev.steps, "guidance": ev.guidance,
            "higher_is_better": dict(ev.higher)}
    if (cache / "meta.json").is_file() and json.loads((cache / "meta.json").read_text()) == meta:
        images = pq.read_table(cache / IMAGES).column("image").to_pylist()
        scores = pq.read_table(cache / "scores.parquet")
        return EvalSet(ev, [decode_png(b) for b in images],
                       {n: scores.column(n).to_numpy() for n in scores.column_names})
    images = ev.sample(ev.load_model(), "evaluate base")
    base = ev.score({"base": images})["base"]
    write_table_atomic(pa.table({"image": [png_bytes(im) for im in images]}), cache / IMAGES)
    write_table_atomic(pa.table(base), cache / "scores.parquet")
    write_text_atomic(json.dumps(meta, indent=1) + "\n", cache / "meta.json")  # last: marks the cache done
    return EvalSet(ev, images, base)
