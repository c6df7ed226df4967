"""Stage ``evaluate``: win-rates of the tuned model over the base model on held-out prompts with
shared initial noise (Sec. 5), by the one evaluator (``capo.pipeline.evaluation``). Files:
eval/results.json, eval/results.md, eval/scores.csv, eval/grid.png (or RUN/eval-NAME-HASH for
another --tuned model); under torchrun / accelerate launch the prompt chunks are shared out over
the processes (``capo.pipeline.evalshard``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capo.config import doc
from capo.devices import DTYPES
from capo.errors import CapoError
from capo.pipeline.evalshard import evaluate_sharded
from capo.pipeline.evaluation import (  # noqa: F401 - the evaluator's names, imported from here too
    GOLD,
    Evaluation,
    Item,
    eval_items,
    image_grid,
    items_of,
    results_markdown,
)
from capo.pipeline.generate import check_device
from capo.pipeline.rundir import RunDir
from capo.pipeline.score import DEFAULT_REWARDS, check_reward_options


@dataclass
class EvaluateConfig:
    """Stage ``evaluate``: win-rates of the tuned model over the base model."""

    prompts: str = doc("held-out prompt file or built-in set", "shapes:heldout")
    num_prompts: int | None = doc("use a deterministic, category-balanced subset of this many prompts", None,
                                  ge=1)
    seeds: int = doc("seeds S per prompt (base and tuned share each initial noise)", 2, ge=1)
    images_per_category: int | None = doc(
        "category-balanced evaluation (GenEval): every category gets this many images, small "
        "categories more seeds per prompt (replaces num_prompts and seeds)", None, ge=1)
    seed: int = doc("base seed of the evaluation noise", 1000, ge=0)
    reward: list[str] = doc("rewards to report (default: those of the run's score stage)", [])
    tuned: str | None = doc("tuned model directory (default: RUN/model)", None)
    out: str | None = doc("output directory (default: RUN/eval for RUN/model, RUN/eval-NAME-HASH for "
                          "another --tuned DIR)", None)
    steps: int | None = doc("sampling steps (default: the run's generate setting)", None, ge=1)
    guidance: float | None = doc("guidance scale (default: the run's generate setting)", None, ge=0)
    batch_size: int = doc("samples per forward pass", 64, ge=1)
    chunk_size: int = doc("prompts per chunk: chunks go round-robin to the processes of a launcher", 64,
                          ge=1)
    n_boot: int = doc("bootstrap replicates of the win-rate interval", 1000, ge=1)
    grid_prompts: int = doc("prompts shown in eval/grid.png (first seed)", 8, ge=0)
    device: str = doc("device: auto, cpu, cuda, ...", "auto")
    dtype: str = doc("model dtype", "float32", choices=DTYPES)
    reward_options: dict = doc("per-reward loader options (default: those of the run's score stage)", {})

    def validate(self) -> None:
        check_reward_options(self.reward_options)
        check_device(self.device)
        if self.images_per_category is not None and self.num_prompts is not None:
            raise CapoError("config keys 'images_per_category' and 'num_prompts' exclude each other")


def with_score_options(run: RunDir, cfg: EvaluateConfig) -> EvaluateConfig:
    """``cfg`` with the reward options of the run's score stage when it gives none itself."""
    if cfg.reward_options:
        return cfg
    scored = run.load_config().get("score", {})
    return dataclasses.replace(cfg, reward_options=scored.get("reward_options", {}))


def check_tuned_base(run: RunDir, tuned_dir: Path) -> None:
    """A tuned model trained on another base model than the run's is refused (its train summary
    records the base; older summaries name their run, whose base_model.json is read)."""
    summary_path = tuned_dir / "train_summary.json"
    if not summary_path.is_file():
        return  # a merged model (soup) or weights from elsewhere: nothing recorded to compare
    summary = json.loads(summary_path.read_text())
    trained_on = summary.get("base_model")
    origin = Path(summary.get("config", {}).get("run", "")) / "base_model.json"
    if trained_on is None and origin.is_file():
        trained_on = json.loads(origin.read_text())
    base = run.read_base_model()
    if trained_on is not None and trained_on != base:
        name = (trained_on.get("path") or trained_on.get("family"), base.get("path") or base.get("family"))
        raise CapoError(f"was trained on base model {name[0]!r}, but this run's base is {name[1]!r}",
                        path=str(tuned_dir))


def output_dir(run: RunDir, cfg: EvaluateConfig, tuned_dir: Path) -> Path:
    """--out, else RUN/eval for the run's own model, else RUN/eval-NAME-HASH (never RUN/eval)."""
    if cfg.out:
        return Path(cfg.out)
    if tuned_dir.resolve() == run.model_dir.resolve():
        return run.eval_dir
    tag = hashlib.sha256(str(tuned_dir.resolve()).encode()).hexdigest()[:8]
    return run.root / f"eval-{tuned_dir.name}-{tag}"


def evaluate(run: RunDir, cfg: EvaluateConfig) -> dict[str, Any]:
    """Write eval/results.json, results.md, scores.csv, grid.png; returns the results dict. Under
    torchrun / accelerate launch the prompt chunks are split over the processes
    (``capo.pipeline.evalshard``)."""
    run.read_base_model()  # a run without `capo generate` is refused first
    tuned_dir = Path(cfg.tuned) if cfg.tuned else run.model_dir
    if not tuned_dir.is_dir():
        raise CapoError("no tuned model; run `capo train` first (or pass --tuned DIR)", path=str(tuned_dir))
    check_tuned_base(run, tuned_dir)
    cfg = with_score_options(run, cfg)
    scored = run.load_config().get("score", {}).get("reward")
    names = cfg.reward or scored or run.reward_names() or DEFAULT_REWARDS
    return evaluate_sharded(run, Evaluation.of(run, cfg, list(names)), tuned_dir,
                            output_dir(run, cfg, tuned_dir))
