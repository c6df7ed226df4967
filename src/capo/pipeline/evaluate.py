"""Stage ``evaluate``: base vs tuned on held-out prompts with shared initial noise (Sec. 5).

For each held-out prompt and seed s the base and the tuned model sample from the same initial
noise (seed = sample_seed(seed, prompt_id, s)). Each reward scores both images; the report gives,
per reward, the win-rate (%) of tuned over base (ties 1/2) with a bootstrap 95% interval over
prompts, and the mean raw score of each model (the paper's Table 2 layout). For shapes models
it adds the gold checker's accuracy per category (Table 3). Files: eval/results.json,
eval/results.md, eval/scores.csv, eval/grid.png.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import torch
from PIL import Image
from tqdm.auto import tqdm

from capo import stats
from capo.config import doc, to_dict
from capo.errors import CapoError
from capo.models.base import DiffusionAdapter
from capo.pipeline.generate import DTYPES, load_base, resolve_device, sample_seed
from capo.pipeline.prompts import Prompt, load_prompts, subset
from capo.pipeline.rundir import RunDir, write_text_atomic
from capo.pipeline.score import DEFAULT_REWARDS, ScoreConfig, check_reward_options, load_scorer, score_images


@dataclass
class EvaluateConfig:
    """Stage ``evaluate``: win-rates of the tuned model over the base model."""

    prompts: str = doc("held-out prompt file or built-in set", "shapes:heldout")
    num_prompts: int | None = doc("use a deterministic, category-balanced subset of this many prompts", None)
    seeds: int = doc("seeds S per prompt (base and tuned share each initial noise)", 2)
    seed: int = doc("base seed of the evaluation noise", 1000)
    reward: list[str] = doc("rewards to report (default: those of the run's score stage)", [])
    tuned: str | None = doc("tuned model directory (default: RUN/model)", None)
    steps: int | None = doc("sampling steps (default: the run's generate setting)", None)
    guidance: float | None = doc("guidance scale (default: the run's generate setting)", None)
    batch_size: int = doc("samples per forward pass", 64)
    n_boot: int = doc("bootstrap replicates of the win-rate interval", 1000)
    grid_prompts: int = doc("prompts shown in eval/grid.png (first seed)", 8)
    device: str = doc("device: auto, cpu, cuda, ...", "auto")
    dtype: str = doc("model dtype: float32, float16 or bfloat16", "float32")
    reward_options: dict = doc("per-reward loader options (default: those of the run's score stage)", {})

    def validate(self) -> None:
        check_reward_options(self.reward_options)
        for key in ("seeds", "batch_size", "n_boot"):
            if getattr(self, key) < 1:
                raise CapoError(f"config key '{key}' must be >= 1, got {getattr(self, key)}")
        if self.dtype not in DTYPES:
            raise CapoError(f"config key 'dtype' must be one of {', '.join(DTYPES)}, got '{self.dtype}'")


def sample_all(adapter: DiffusionAdapter, prompts: list[Prompt], cfg: EvaluateConfig, steps: int | None,
               guidance: float | None, desc: str) -> list[Image.Image]:
    """Images [P * S] (prompt-major), sample (p, s) from seed sample_seed(cfg.seed, id_p, s)."""
    rows = [(p, s) for p in prompts for s in range(cfg.seeds)]
    images: list[Image.Image] = []
    with torch.inference_mode(), tqdm(total=len(rows), desc=desc, unit="img") as bar:
        for b in range(0, len(rows), cfg.batch_size):
            batch = rows[b : b + cfg.batch_size]
            seeds = [sample_seed(cfg.seed, p.prompt_id, s) for p, s in batch]
            images += adapter.sample([p.prompt for p, _ in batch], seeds, steps, guidance).images
            bar.update(len(batch))
    return images


def reward_report(name: str, cfg: EvaluateConfig, base: list[Image.Image], tuned: list[Image.Image],
                  prompts: list[Prompt]) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Win-rate (%) with bootstrap CI and mean raw scores; raw scores [P, S] of base and tuned."""
    scorer = ScoreConfig(reward=[name], device=cfg.device, reward_options=cfg.reward_options)
    reward = load_scorer(name, scorer)
    texts = [p.prompt for p in prompts for _ in range(cfg.seeds)]
    labels = [f"prompt {p.prompt_id} seed {s}" for p in prompts for s in range(cfg.seeds)]
    raw_b = score_images(reward, name, base, texts, [f"base {x}" for x in labels]).reshape(len(prompts), -1)
    raw_t = score_images(reward, name, tuned, texts, [f"tuned {x}" for x in labels]).reshape(len(prompts), -1)
    sign = 1.0 if reward.higher_is_better else -1.0  # a win is a better score, whatever the direction
    low, high = stats.bootstrap_ci(sign * raw_t, sign * raw_b, n_boot=cfg.n_boot, seed=cfg.seed)
    result = {"win_rate": stats.win_rate(sign * raw_t, sign * raw_b), "ci_low": low, "ci_high": high,
              "mean_base": float(raw_b.mean()), "mean_tuned": float(raw_t.mean())}
    return result, raw_b, raw_t


def gold_report(spec: dict[str, Any], prompts: list[Prompt], cfg: EvaluateConfig,
                base: list[Image.Image], tuned: list[Image.Image]) -> dict[str, dict[str, float]] | None:
    """Gold accuracy per category (shapes models with prompts of the shapes grammar), else None."""
    if not spec["family"].startswith("shapes-"):
        return None
    from capo.shapes.checker import gold_accuracy
    from capo.shapes.world import parse_prompt

    try:
        specs = [parse_prompt(p.prompt) for p in prompts for _ in range(cfg.seeds)]
    except CapoError:
        return None
    return {"base": gold_accuracy(base, specs), "tuned": gold_accuracy(tuned, specs)}


def with_score_options(run: RunDir, cfg: EvaluateConfig) -> EvaluateConfig:
    """``cfg`` with the reward options of the run's score stage when it gives none itself."""
    if cfg.reward_options:
        return cfg
    scored = run.load_config().get("score", {})
    return dataclasses.replace(cfg, reward_options=scored.get("reward_options", {}))


def evaluate(run: RunDir, cfg: EvaluateConfig) -> dict[str, Any]:
    """Write eval/results.json, results.md, scores.csv, grid.png; returns the results dict."""
    spec = run.read_base_model()
    tuned_dir = Path(cfg.tuned) if cfg.tuned else run.model_dir
    if not tuned_dir.is_dir():
        raise CapoError("no tuned model; run `capo train` first (or pass --tuned DIR)", path=str(tuned_dir))
    cfg = with_score_options(run, cfg)
    scored = run.load_config().get("score", {}).get("reward")
    names = cfg.reward or scored or run.reward_names() or DEFAULT_REWARDS
    prompts = subset(load_prompts(cfg.prompts), cfg.num_prompts, cfg.seed)
    gen = run.load_config().get("generate", {})
    steps = cfg.steps if cfg.steps is not None else gen.get("steps")
    guidance = cfg.guidance if cfg.guidance is not None else gen.get("guidance")
    adapter = load_base(spec, resolve_device(cfg.device), cfg.dtype)
    base = sample_all(adapter, prompts, cfg, steps, guidance, "evaluate base")
    from capo.pipeline.train import apply_trained

    apply_trained(adapter, tuned_dir).denoiser.eval()
    tuned = sample_all(adapter, prompts, cfg, steps, guidance, "evaluate tuned")
    del adapter
    results: dict[str, Any] = {"rewards": {}}
    columns: dict[str, Any] = {"prompt_id": [p.prompt_id for p in prompts for _ in range(cfg.seeds)],
                               "seed_idx": [s for _ in prompts for s in range(cfg.seeds)]}
    for name in names:
        results["rewards"][name], raw_b, raw_t = reward_report(name, cfg, base, tuned, prompts)
        columns[f"{name}/base"], columns[f"{name}/tuned"] = raw_b.reshape(-1), raw_t.reshape(-1)
    gold = gold_report(spec, prompts, cfg, base, tuned)
    if gold is not None:
        results["gold"] = gold
    write_outputs(run, results, pa.table(columns), (prompts, base, tuned), cfg)
    run.save_config("evaluate", to_dict(cfg))
    return results


Grid = tuple[list[Prompt], list[Image.Image], list[Image.Image]]


def write_outputs(run: RunDir, results: dict[str, Any], scores: pa.Table, grid: Grid,
                  cfg: EvaluateConfig) -> None:
    """eval/results.json, results.md, scores.csv (raw scores per image) and grid.png, atomically."""
    out = run.eval_dir
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(results, indent=1) + "\n", out / "results.json")
    write_text_atomic(results_markdown(results), out / "results.md")
    pacsv.write_csv(scores, out / ".scores.csv.tmp")
    (out / ".scores.csv.tmp").replace(out / "scores.csv")
    prompts, base, tuned = grid
    k = min(cfg.grid_prompts, len(prompts))
    image_grid([p.prompt for p in prompts[:k]], base[:: cfg.seeds][:k], tuned[:: cfg.seeds][:k],
               out / "grid.png")


def results_markdown(results: dict[str, Any]) -> str:
    """Table 2 layout (per reward: Win (%) and Score; rows base, tuned) and Table 3 for gold."""
    names = list(results["rewards"])
    r = results["rewards"]
    head = "| Model | " + " | ".join(f"{n} Win (%) | {n} Score" for n in names) + " |"
    rule = "|---|" + "---:|---:|" * len(names)
    base = "| base | " + " | ".join(f"- | {r[n]['mean_base']:.4g}" for n in names) + " |"
    tuned = "| tuned | " + " | ".join(
        f"{r[n]['win_rate']:.1f} [{r[n]['ci_low']:.1f}, {r[n]['ci_high']:.1f}] | {r[n]['mean_tuned']:.4g}"
        for n in names) + " |"
    lines = ["Win-rate of tuned over base (95% bootstrap interval) and mean reward score", "",
             head, rule, base, tuned]
    if "gold" in results:
        cats = [c for c in results["gold"]["base"] if c != "overall"] + ["overall"]
        lines += ["", "Gold accuracy (exact checker)", "",
                  "| Model | " + " | ".join(cats) + " |", "|---|" + "---:|" * len(cats)]
        for model in ("base", "tuned"):
            acc = results["gold"][model]
            lines.append(f"| {model} | " + " | ".join(f"{acc[c]:.3f}" for c in cats) + " |")
    return "\n".join(lines) + "\n"


def image_grid(texts: list[str], base: list[Image.Image], tuned: list[Image.Image], path: Path) -> None:
    """2 x K grid (row 1 base, row 2 tuned, same seed per column) with the prompts as titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(1, len(texts))
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k, 3.8), squeeze=False)
    for j in range(k):
        for i, (label, images) in enumerate((("base", base), ("tuned", tuned))):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(images):
                ax.imshow(np.asarray(images[j].convert("RGB")), interpolation="nearest")
            if j == 0:
                ax.set_ylabel(label)
        if j < len(texts):
            axes[0][j].set_title("\n".join(_wrap(texts[j], 18)), fontsize=6)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)


def _wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return [*lines, cur]
