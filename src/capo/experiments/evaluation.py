"""Held-out evaluation shared across the cells of an experiment (the ``evaluate`` stage, base once).

``capo evaluate`` samples and scores the base model every time it runs; an experiment compares
dozens of tuned models with one base model, so :class:`EvalSet` samples, scores and checks the
base model once per base model (cached in DATA/eval-base/) and keeps the reward models loaded.
Each tuned model is then sampled from the same initial noise (seed sample_seed(seed, prompt, s),
as in ``capo evaluate``) and its eval/ directory gets the same files as ``capo evaluate`` writes
(results.json, results.md, scores.csv, grid.png) plus images.parquet (prompt, category, base and
tuned PNGs, for the report's per-category grids), written last: it marks the evaluation
complete. scores.csv also holds each prompt's category and the gold checker's verdict per image
(columns gold/base, gold/tuned: 1 = correct).
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

from capo import stats
from capo.config import to_dict
from capo.errors import CapoError
from capo.pipeline.evaluate import EvaluateConfig, sample_all, write_outputs
from capo.pipeline.generate import load_base, png_bytes, resolve_device
from capo.pipeline.prompts import Prompt, load_prompts, subset
from capo.pipeline.rundir import RunDir, write_table_atomic, write_text_atomic
from capo.pipeline.score import ScoreConfig, load_scorer, score_images
from capo.rewards.base import RewardModel

GOLD = "gold"
IMAGES = "images.parquet"


def gold_summary(ok: np.ndarray, categories: list[str]) -> dict[str, float]:
    """Gold accuracy per category and ``overall`` = mean over categories (GenEval, as
    ``checker.gold_accuracy``) from verdicts ok [P, S] and the prompts' categories [P]."""
    cats = np.asarray(categories)
    acc = {c: float(ok[cats == c].mean()) for c in dict.fromkeys(categories)}
    return {"overall": float(np.mean(list(acc.values()))), **acc}


def decode_png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@dataclass
class EvalSet:
    """One base model's held-out evaluation: prompts [P] x seeds [S], the loaded rewards, and the
    base model's images [P * S] (prompt-major) and scores (reward or "gold" -> [P, S])."""

    spec: dict[str, Any]
    cfg: EvaluateConfig
    prompts: list[Prompt]
    steps: int | None
    guidance: float | None
    rewards: dict[str, RewardModel]
    base_images: list[Image.Image]
    base: dict[str, np.ndarray]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.prompts), self.cfg.seeds

    def score(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        """Raw scores [P, S] of ``images`` by every reward, and the gold verdicts (shapes prompts)."""
        texts = [p.prompt for p in self.prompts for _ in range(self.cfg.seeds)]
        labels = [f"prompt {p.prompt_id} seed {s}" for p in self.prompts for s in range(self.cfg.seeds)]
        out = {name: score_images(r, name, images, texts, labels).reshape(self.shape)
               for name, r in self.rewards.items()}
        gold = gold_verdicts(self.spec, self.prompts, self.cfg.seeds, images)
        return out if gold is None else {**out, GOLD: gold}

    def sample(self, model_dir: Path | None, desc: str) -> list[Image.Image]:
        """Images [P * S] of the base model with the weights in ``model_dir`` (None: the base itself)."""
        adapter = load_base(self.spec, resolve_device(self.cfg.device), self.cfg.dtype)
        if model_dir is not None:
            from capo.pipeline.train import apply_trained

            apply_trained(adapter, model_dir).denoiser.eval()
        return sample_all(adapter, self.prompts, self.cfg, self.steps, self.guidance, desc)

    def results(self, tuned: dict[str, np.ndarray]) -> dict[str, Any]:
        """results.json of ``capo evaluate``: per reward win-rate with its CI and mean scores; gold."""
        out: dict[str, Any] = {"rewards": {}}
        for name, reward in self.rewards.items():
            sign = 1.0 if reward.higher_is_better else -1.0
            t, b = sign * tuned[name], sign * self.base[name]
            low, high = stats.bootstrap_ci(t, b, n_boot=self.cfg.n_boot, seed=self.cfg.seed)
            out["rewards"][name] = {"win_rate": stats.win_rate(t, b), "ci_low": low, "ci_high": high,
                                    "mean_base": float(self.base[name].mean()),
                                    "mean_tuned": float(tuned[name].mean())}
        if GOLD in tuned:
            cats = [p.category for p in self.prompts]
            out[GOLD] = {"base": gold_summary(self.base[GOLD], cats),
                         "tuned": gold_summary(tuned[GOLD], cats)}
        return out

    def scores_table(self, tuned: dict[str, np.ndarray]) -> pa.Table:
        """scores.csv: prompt_id, category, seed_idx, then NAME/base, NAME/tuned per reward (and gold)."""
        P, S = self.shape
        cols: dict[str, Any] = {"prompt_id": [p.prompt_id for p in self.prompts for _ in range(S)],
                                "category": [p.category for p in self.prompts for _ in range(S)],
                                "seed_idx": [s for _ in range(P) for s in range(S)]}
        for name in tuned:
            cols[f"{name}/base"], cols[f"{name}/tuned"] = self.base[name].reshape(-1), tuned[name].reshape(-1)
        return pa.table(cols)

    def evaluate(self, where: Path, model_dir: Path, desc: str) -> dict[str, Any]:
        """Sample, score and write WHERE/eval/ for the tuned weights in ``model_dir``."""
        images = self.sample(model_dir, desc)
        tuned = self.score(images)
        results = self.results(tuned)
        run = RunDir.at(where)
        grid = (self.prompts, self.base_images, images)
        write_outputs(run, results, self.scores_table(tuned), grid, self.cfg)
        P, S = self.shape
        write_table_atomic(pa.table({
            "prompt_id": [p.prompt_id for p in self.prompts for _ in range(S)],
            "prompt": [p.prompt for p in self.prompts for _ in range(S)],
            "category": [p.category for p in self.prompts for _ in range(S)],
            "seed_idx": [s for _ in range(P) for s in range(S)],
            "base": [png_bytes(im) for im in self.base_images],
            "tuned": [png_bytes(im) for im in images]}), run.eval_dir / IMAGES)  # last: marks eval/ done
        return results


def gold_verdicts(spec: dict[str, Any], prompts: list[Prompt], seeds: int,
                  images: list[Image.Image]) -> np.ndarray | None:
    """Gold checker verdicts [P, S] (1.0 correct) for shapes models and shapes prompts, else None."""
    if not spec["family"].startswith("shapes-"):
        return None
    from capo.shapes.checker import check_all
    from capo.shapes.world import parse_prompt

    try:
        specs = [parse_prompt(p.prompt) for p in prompts for _ in range(seeds)]
    except CapoError:
        return None
    return check_all(images, specs).astype(np.float64).reshape(len(prompts), seeds)


def load_eval_set(data: RunDir, cfg: EvaluateConfig, cache: Path) -> EvalSet:
    """The EvalSet of the data root's base model; the base model's images and scores are read from
    ``cache`` when it holds them for the same settings, else sampled, scored and written there."""
    spec = data.read_base_model()
    gen = data.load_config().get("generate", {})
    steps = cfg.steps if cfg.steps is not None else gen.get("steps")
    guidance = cfg.guidance if cfg.guidance is not None else gen.get("guidance")
    prompts = subset(load_prompts(cfg.prompts), cfg.num_prompts, cfg.seed)
    rewards = {name: load_scorer(name, ScoreConfig(reward=[name], device=cfg.device,
                                                   reward_options=cfg.reward_options))
               for name in cfg.reward}
    es = EvalSet(spec, cfg, prompts, steps, guidance, rewards, [], {})
    meta = {"spec": spec, "evaluate": to_dict(cfg), "steps": steps, "guidance": guidance,
            "higher_is_better": {n: bool(r.higher_is_better) for n, r in rewards.items()}}
    if (cache / "meta.json").is_file() and json.loads((cache / "meta.json").read_text()) == meta:
        images = pq.read_table(cache / IMAGES).column("image").to_pylist()
        es.base_images = [decode_png(b) for b in images]
        scores = pq.read_table(cache / "scores.parquet")
        es.base = {n: scores.column(n).to_numpy().reshape(es.shape) for n in scores.column_names}
        return es
    es.base_images = es.sample(None, "evaluate base")
    es.base = es.score(es.base_images)
    write_table_atomic(pa.table({"image": [png_bytes(im) for im in es.base_images]}), cache / IMAGES)
    write_table_atomic(pa.table({n: v.reshape(-1) for n, v in es.base.items()}), cache / "scores.parquet")
    write_text_atomic(json.dumps(meta, indent=1) + "\n", cache / "meta.json")  # last: marks the cache done
    return es
