"""The one evaluator (docs/design.md §1.2, §2.10): base vs tuned on held-out items with shared
initial noise.

An :class:`Evaluation` is the evaluation of one base model over a list of items (prompt, seed
index s): both models sample item (p, s) from the initial noise of seed
sample_seed(seed, prompt_id, s); each reward scores every image; the gold checker adds verdicts for
shapes prompts. It writes eval/results.json (per reward the win-rate (%) of tuned over base, ties
1/2, with a bootstrap 95% interval over prompts, and the mean raw scores: the paper's Table 2
layout; gold accuracy per category: Table 3), results.md, scores.csv (raw scores per image:
prompt_id, category, seed_idx, then NAME/base, NAME/tuned per reward and gold/base, gold/tuned,
then image_msd, the item's divergence from the base) and grid.png. results.json's ``divergence``
is the mean image_msd over the items: how far the tuned model moved from the base (the x axis of
the reward-divergence frontiers, docs/results.md). ``capo evaluate`` (``capo.pipeline.evaluate``,
over processes with ``capo.pipeline.evalshard``) uses it for one tuned model, ``capo experiment``
(``capo.experiments.evaluation``) for many tuned models against one cached base; subsets of the
items can be sampled and scored separately.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import torch
from PIL import Image
from tqdm.auto import tqdm

from capo import stats
from capo.models.base import WORLDS, DiffusionAdapter
from capo.pipeline.generate import load_base, resolve_device, sample_seed
from capo.pipeline.prompts import Prompt, balanced_plan, gold_checker, load_prompts, subset
from capo.pipeline.rundir import RunDir, write_text_atomic
from capo.pipeline.score import ScoreConfig, load_scorer
from capo.pipeline.tuned import apply_trained
from capo.rewards.base import RewardModel

if TYPE_CHECKING:
    from capo.pipeline.evaluate import EvaluateConfig

Item = tuple[Prompt, int]
"""One image of an evaluation: a prompt and its seed index s; base and tuned both start from the
initial noise of seed sample_seed(cfg.seed, prompt_id, s)."""

GOLD = "gold"  # the gold checker's verdicts (1.0 = correct), scored beside the rewards


def image_msd(base: list[Image.Image], tuned: list[Image.Image]) -> np.ndarray:
    """Divergence of each item from the base [N]: mean over pixels and channels of
    (x_tuned - x_base)^2, pixels scaled to [0, 1]; base and tuned images [N] share initial noise."""
    arr = lambda im: np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0  # noqa: E731
    return np.array([np.mean((arr(t) - arr(b)) ** 2) for b, t in zip(base, tuned, strict=True)])


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
        """Gold verdicts [N] (1.0 correct) when the model's world has a gold metric for these prompts
        (``prompts.gold_checker``: the shapes checker for shapes models and prompts), else None."""
        check = gold_checker(WORLDS.get(self.spec["family"]), [p for p, _ in self.items])
        return None if check is None else check(images)

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

    def scores_table(self, base: dict[str, np.ndarray], tuned: dict[str, np.ndarray], msd: np.ndarray
                     ) -> pa.Table:
        """scores.csv: prompt_id, category, seed_idx, then NAME/base, NAME/tuned per reward (and gold),
        then image_msd [N]."""
        cols: dict[str, Any] = {"prompt_id": [p.prompt_id for p, _ in self.items],
                                "category": [p.category for p, _ in self.items],
                                "seed_idx": [s for _, s in self.items]}
        for name in tuned:
            cols[f"{name}/base"], cols[f"{name}/tuned"] = base[name], tuned[name]
        cols["image_msd"] = msd
        return pa.table(cols)

    def write(self, run: RunDir, images: tuple[list[Image.Image], list[Image.Image]],
              base: dict[str, np.ndarray], tuned: dict[str, np.ndarray], out: Path | None = None,
              msd: np.ndarray | None = None) -> dict[str, Any]:
        """eval/results.json, results.md, scores.csv (raw scores per image) and grid.png (first
        seed of the first cfg.grid_prompts prompts), atomically; returns the results. ``msd``: the
        items' image_msd [N] (None: computed from ``images``, which must then be complete)."""
        msd = image_msd(*images) if msd is None else msd
        results = {**self.results(base, tuned), "divergence": float(np.mean(msd))}
        out = out or run.eval_dir
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(results, indent=1) + "\n", out / "results.json")
        write_text_atomic(results_markdown(results), out / "results.md")
        pacsv.write_csv(self.scores_table(base, tuned, msd), out / ".scores.csv.tmp")
        (out / ".scores.csv.tmp").replace(out / "scores.csv")
        first = [i for i, (_, s) in enumerate(self.items) if s == 0][: self.cfg.grid_prompts]
        image_grid([self.items[i][0].prompt for i in first], [images[0][i] for i in first],
                   [images[1][i] for i in first], out / "grid.png")
        return results


def out_categories(categories: list[str]) -> list[str]:
    """The categories of ``accuracy_by_category``'s summary, in its order (without "overall")."""
    from capo.shapes.checker import accuracy_by_category

    return [c for c in accuracy_by_category(np.zeros(len(categories)), categories) if c != "overall"]


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
