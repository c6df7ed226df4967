"""Stage ``evaluate``: base vs tuned on held-out prompts with shared initial noise (Sec. 5).

For each held-out prompt and seed s the base and the tuned model sample from the same initial
noise (seed = sample_seed(seed, prompt_id, s)). Each reward scores both images; the report gives,
per reward, the win-rate (%) of tuned over base (ties 1/2) with a bootstrap 95% interval over
prompts, and the mean raw score of each model (the paper's Table 2 layout). For shapes models
it adds the gold checker's accuracy per category (Table 3). Files: eval/results.json,
eval/results.md, eval/scores.csv (raw scores per image: prompt_id, category, seed_idx, then
NAME/base, NAME/tuned per reward and gold/base, gold/tuned for the checker's verdicts), eval/grid.png.

:class:`Evaluation` is the one evaluator: ``capo evaluate`` uses it for one tuned model, and
``capo experiment`` (``capo.experiments.evaluation``) for many tuned models against one cached
base. It works over a list of items (prompt, seed index), so subsets of the items can be sampled
and scored separately.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import torch
from PIL import Image
from tqdm.auto import tqdm

from capo import stats
from capo.config import doc
from capo.errors import CapoError
from capo.models.base import DiffusionAdapter
from capo.pipeline.generate import DTYPES, check_device, load_base, resolve_device, sample_seed
from capo.pipeline.prompts import Prompt, balanced_plan, load_prompts, subset
from capo.pipeline.rundir import RunDir, write_text_atomic
from capo.pipeline.score import DEFAULT_REWARDS, ScoreConfig, check_reward_options, load_scorer
from capo.pipeline.tuned import apply_trained
from capo.rewards.base import RewardModel


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


Item = tuple[Prompt, int]
"""One image of an evaluation: a prompt and its seed index s; base and tuned both start from the
initial noise of seed sample_seed(cfg.seed, prompt_id, s)."""

GOLD = "gold"  # the gold checker's verdicts (1.0 = correct), scored beside the rewards


def items_of(prompts: list[Prompt], seeds: int) -> list[Item]:
    """Items [P * S], prompt-major: (p, 0), ..., (p, S - 1) for each prompt p."""
    return [(p, s) for p in prompts for s in range(seeds)]


def eval_items(cfg: EvaluateConfig) -> list[Item]:
    """The items of ``cfg``: ``num_prompts`` x ``seeds``, or with ``images_per_category`` the
    category-balanced plan (``prompts.balanced_plan``: seeds 0..k_p - 1 of each prompt p used)."""
    prompts = load_prompts(cfg.prompts)
    if cfg.images_per_category is None:
        return items_of(subset(prompts, cfg.num_prompts, cfg.seed), cfg.seeds)
    return [(p, s) for p, k in balanced_plan(prompts, cfg.images_per_category, cfg.seed) for s in range(k)]


def prompt_matrix(items: list[Item], x: np.ndarray) -> np.ndarray:
    """Scores per item [N] (prompt-major) -> [P, S_max], ``stats.MISSING`` where a prompt has
    fewer seeds (balanced evaluations); a plain reshape when every prompt has S seeds."""
    rows = {pid: i for i, pid in enumerate(dict.fromkeys(p.prompt_id for p, _ in items))}
    out = np.full((len(rows), max(s for _, s in items) + 1), stats.MISSING)
    out[[rows[p.prompt_id] for p, _ in items], [s for _, s in items]] = np.asarray(x, dtype=np.float64)
    return out


@dataclass
class Evaluation:
    """The held-out evaluation of one base model (``capo evaluate`` and ``capo experiment``):
    items [N] = (prompt, seed index), the rewards ``names``; scores are per item, [N] per reward
    (and ``GOLD`` for prompts the gold checker reads). Rewards are loaded on first use and kept
    when ``keep_rewards`` (an experiment scores many models), else freed after each ``score``."""

    spec: dict[str, Any]
    cfg: EvaluateConfig
    items: list[Item]
    names: list[str]
    steps: int | None = None
    guidance: float | None = None
    keep_rewards: bool = False
    rewards: dict[str, RewardModel] = field(default_factory=dict)
    higher: dict[str, bool] = field(default_factory=dict)  # reward name -> higher_is_better

    @classmethod
    def of(cls, run: RunDir, cfg: EvaluateConfig, names: list[str], keep_rewards: bool = False) -> Evaluation:
        """The evaluation of ``run``'s base model with ``cfg`` (steps and guidance default to the
        run's generate settings)."""
        gen = run.load_config().get("generate", {})
        steps = cfg.steps if cfg.steps is not None else gen.get("steps")
        guidance = cfg.guidance if cfg.guidance is not None else gen.get("guidance")
        return cls(run.read_base_model(), cfg, eval_items(cfg), names, steps, guidance, keep_rewards)

    @property
    def prompts(self) -> list[Prompt]:
        """The distinct prompts [P] of the items, in order."""
        return list({p.prompt_id: p for p, _ in self.items}.values())

    def per_prompt(self, x: np.ndarray) -> np.ndarray:
        """Scores per item [N] -> [P, S] (rows: prompts; ``stats.MISSING`` for absent seeds)."""
        return prompt_matrix(self.items, x)

    def load_model(self, model_dir: Path | None = None) -> DiffusionAdapter:
        """The base model, with the trained weights in ``model_dir`` applied (None: the base itself)."""
        adapter = load_base(self.spec, resolve_device(self.cfg.device), self.cfg.dtype)
        if model_dir is not None:
            apply_trained(adapter, model_dir).denoiser.eval()
        return adapter

    def sample(self, adapter: DiffusionAdapter, desc: str) -> list[Image.Image]:
        """Images [N] of the items, in batches of cfg.batch_size."""
        images: list[Image.Image] = []
        with torch.inference_mode(), tqdm(total=len(self.items), desc=desc, unit="img") as bar:
            for b in range(0, len(self.items), self.cfg.batch_size):
                batch = self.items[b : b + self.cfg.batch_size]
                seeds = [sample_seed(self.cfg.seed, p.prompt_id, s) for p, s in batch]
                texts = [p.prompt for p, _ in batch]
                images += adapter.sample(texts, seeds, self.steps, self.guidance).images
                bar.update(len(batch))
        return images

    def reward(self, name: str) -> RewardModel:
        if name not in self.rewards:
            cfg = ScoreConfig(reward=[name], device=self.cfg.device, reward_options=self.cfg.reward_options)
            self.rewards[name] = load_scorer(name, cfg)
            self.higher[name] = bool(self.rewards[name].higher_is_better)
        return self.rewards[name]

    def score(self, groups: dict[str, list[Image.Image]]) -> dict[str, dict[str, np.ndarray]]:
        """Raw scores [N] per reward (and gold verdicts) of each group of images [N] ("base",
        "tuned", ...); each reward is loaded once for all groups."""
        texts = [p.prompt for p, _ in self.items] * len(groups)
        labels = [f"{g} prompt {p.prompt_id} seed {s}" for g in groups for p, s in self.items]
        images = [im for group in groups.values() for im in group]
        out: dict[str, dict[str, np.ndarray]] = {g: {} for g in groups}
        for name in self.names:
            raw = self.reward(name).score(images, texts, labels)
            for g, part in zip(groups, np.split(raw, len(groups)), strict=True):
                out[g][name] = part
            if not self.keep_rewards:
                del self.rewards[name]
        for g, group in groups.items():
            if (gold := self.gold(group)) is not None:
                out[g][GOLD] = gold
        return out

    def gold(self, images: list[Image.Image]) -> np.ndarray | None:
        """Gold checker verdicts [N] (1.0 correct) for shapes models and shapes prompts, else None."""
        if not self.spec["family"].startswith("shapes-"):
            return None
        from capo.shapes.checker import check_all
        from capo.shapes.world import parse_prompt

        try:
            specs = [parse_prompt(p.prompt) for p, _ in self.items]
        except CapoError:
            return None
        return check_all(images, specs).astype(np.float64)

    def results(self, base: dict[str, np.ndarray], tuned: dict[str, np.ndarray]) -> dict[str, Any]:
        """results.json: per reward the win-rate (%) of tuned over base with its bootstrap 95%
        interval over prompts and the mean raw scores (Table 2); gold accuracy per category."""
        out: dict[str, Any] = {"rewards": {}}
        for name in self.names:
            sign = 1.0 if self.higher[name] else -1.0  # a win is a better score, whatever the direction
            t, b = sign * self.per_prompt(tuned[name]), sign * self.per_prompt(base[name])
            low, high = stats.bootstrap_ci(t, b, n_boot=self.cfg.n_boot, seed=self.cfg.seed)
            out["rewards"][name] = {"win_rate": stats.win_rate(t, b), "ci_low": low, "ci_high": high,
                                    "mean_base": float(base[name].mean()),
                                    "mean_tuned": float(tuned[name].mean())}
        if GOLD in tuned:
            from capo.shapes.checker import accuracy_by_category

            cats = [p.category for p, _ in self.items]
            out[GOLD] = {"base": accuracy_by_category(base[GOLD], cats),
                         "tuned": accuracy_by_category(tuned[GOLD], cats),
                         "n": {c: cats.count(c) for c in out_categories(cats)}}
        return out

    def scores_table(self, base: dict[str, np.ndarray], tuned: dict[str, np.ndarray]) -> pa.Table:
        """scores.csv: prompt_id, category, seed_idx, then NAME/base, NAME/tuned per reward (and gold)."""
        cols: dict[str, Any] = {"prompt_id": [p.prompt_id for p, _ in self.items],
                                "category": [p.category for p, _ in self.items],
                                "seed_idx": [s for _, s in self.items]}
        for name in tuned:
            cols[f"{name}/base"], cols[f"{name}/tuned"] = base[name], tuned[name]
        return pa.table(cols)

    def write(self, run: RunDir, images: tuple[list[Image.Image], list[Image.Image]],
              base: dict[str, np.ndarray], tuned: dict[str, np.ndarray], out: Path | None = None
              ) -> dict[str, Any]:
        """eval/results.json, results.md, scores.csv (raw scores per image) and grid.png (first
        seed of the first cfg.grid_prompts prompts), atomically; returns the results."""
        results = self.results(base, tuned)
        out = out or run.eval_dir
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(results, indent=1) + "\n", out / "results.json")
        write_text_atomic(results_markdown(results), out / "results.md")
        pacsv.write_csv(self.scores_table(base, tuned), out / ".scores.csv.tmp")
        (out / ".scores.csv.tmp").replace(out / "scores.csv")
        first = [i for i, (_, s) in enumerate(self.items) if s == 0][: self.cfg.grid_prompts]
        image_grid([self.items[i][0].prompt for i in first], [images[0][i] for i in first],
                   [images[1][i] for i in first], out / "grid.png")
        return results


def out_categories(categories: list[str]) -> list[str]:
    """The categories of ``accuracy_by_category``'s summary, in its order (without "overall")."""
    from capo.shapes.checker import accuracy_by_category

    return [c for c in accuracy_by_category(np.zeros(len(categories)), categories) if c != "overall"]


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
    from capo.pipeline.evalshard import evaluate_sharded

    return evaluate_sharded(run, Evaluation.of(run, cfg, list(names)), tuned_dir,
                            output_dir(run, cfg, tuned_dir))


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
        if "n" in results["gold"]:
            n = {**results["gold"]["n"], "overall": sum(results["gold"]["n"].values())}
            lines.append("| n (images) | " + " | ".join(str(n[c]) for c in cats) + " |")
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
