"""The experiment's tables (paper Tables 1, 2, 5; the key comparison; over-optimisation) as JSON
and Markdown, every number with its 95% interval, computed from the cells' eval/scores.csv.

Statistics (``capo.stats``), for an entry with K training seeds, P held-out prompts, S noise seeds:
- win-rate (%) of tuned over base, ties 1/2 (Sec. 5): pooled over the K·S samples of each prompt;
  interval = percentile bootstrap resampling prompts (the K seeds' samples of a prompt move
  together). The per-seed win-rates are listed beside it (JSON ``per_seed``), so the spread over
  training seeds is visible too; the bootstrap interval does not include that spread.
- mean raw score: the same pooling and prompt bootstrap (``stats.mean_and_ci``).
- gold accuracy: GenEval's overall = (1/|C|) Σ_c acc_c, the mean of per-category accuracies;
  interval = stratified bootstrap (prompts resampled within each category).
- differences (key comparison, A − B): per-prompt differences of the pooled win scores (or gold
  verdicts), bootstrapped over prompts (paired: both models share base images and noise).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pacsv
import yaml

from capo import stats
from capo.experiments.evaluation import GOLD, IMAGES
from capo.experiments.matrix import METHODS, CellRef, Layout, Plan, parse_key_cell
from capo.pipeline.rundir import write_text_atomic

LEVEL = 0.95
Stat = dict[str, Any]  # {"kind", "value", "low", "high", "seeds", "planned", "per_seed"?}
#: stat kind -> format of one number
FORMATS: dict[str, str] = {"win": "{:.1f}", "score": "{:.4g}", "gold": "{:.3f}", "diff": "{:+.1f}",
                           "gold_diff": "{:+.3f}"}


@dataclass
class Scores:
    """One evaluated model: raw scores base / tuned [P, S] per reward (and "gold" verdicts), the
    prompts' categories [P]."""

    categories: list[str]
    base: dict[str, np.ndarray]
    tuned: dict[str, np.ndarray]


def read_scores(eval_dir: Path, done: str = IMAGES) -> Scores | None:
    """Scores of a finished evaluation (eval/scores.csv), None if it has not finished (its file
    ``done``, written last, is missing: images.parquet for an experiment's cell, scores.csv for
    ``capo evaluate``). A balanced evaluation's prompts have different numbers of seeds: the
    [P, S_max] arrays hold ``stats.MISSING`` where a prompt has no such seed."""
    if not (eval_dir / done).is_file():
        return None
    t = pacsv.read_csv(eval_dir / "scores.csv").to_pydict()
    prompts = list(dict.fromkeys(t["prompt_id"]))
    row = {p: i for i, p in enumerate(prompts)}
    cats = dict(zip(t["prompt_id"], t["category"], strict=True))
    idx = ([row[p] for p in t["prompt_id"]], t["seed_idx"])

    def grid(column: str) -> np.ndarray:
        out = np.full((len(prompts), max(t["seed_idx"]) + 1), stats.MISSING)
        out[idx] = np.asarray(t[column], dtype=np.float64)
        return out

    names = [c[: -len("/base")] for c in t if c.endswith("/base")]
    return Scores([str(cats[p]) for p in prompts], {n: grid(f"{n}/base") for n in names},
                  {n: grid(f"{n}/tuned") for n in names})


def pool(runs: list[Scores]) -> Scores:
    """K runs (training seeds) -> one [P, K*S] Scores; every run shares the base images."""
    return Scores(runs[0].categories, {n: np.concatenate([r.base[n] for r in runs], 1) for n in runs[0].base},
                  {n: np.concatenate([r.tuned[n] for r in runs], 1) for n in runs[0].tuned})


def interval(boot: np.ndarray) -> tuple[float, float]:
    low, high = np.quantile(boot, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(low), float(high)


def stratified_means(x: np.ndarray, categories: list[str], n_boot: int, seed: int,
                     weights: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """(mean over categories of the per-category means of x [P, S] (or per-prompt means [P] with
    image counts ``weights`` [P]), its [n_boot] bootstrap replicates resampling prompts within each
    category). A category's mean is over its images (``stats.MISSING`` seeds left out), as
    GenEval's per-category accuracy."""
    per_prompt, counts = stats.per_prompt_means(x) if np.ndim(x) == 2 else (np.asarray(x), weights)
    cats = np.asarray(categories)
    groups = list(dict.fromkeys(categories))
    w = (lambda c: None) if counts is None else (lambda c: counts[cats == c])  # noqa: E731
    mean = lambda c: float(np.average(per_prompt[cats == c], weights=w(c)))  # noqa: E731
    value = float(np.mean([mean(c) for c in groups]))
    boot = np.mean([stats.bootstrap_means(per_prompt[cats == c], n_boot, seed + i, w(c))
                    for i, c in enumerate(groups)], axis=0)
    return value, boot


@dataclass
class Context:
    """What every table reads: the plan, the scores of finished cells (cached), the settings."""

    layout: Layout
    plan: Plan
    rewards: list[str]
    sign: dict[str, float]
    n_boot: int
    seed: int
    settings: dict[str, Any]
    cache: dict[CellRef, Scores | None] = field(default_factory=dict)

    def runs(self, refs: tuple[CellRef, ...]) -> list[Scores]:
        for ref in refs:
            if ref not in self.cache:
                self.cache[ref] = read_scores(self.layout.ref(self.plan, ref) / "eval")
        return [s for s in (self.cache[r] for r in refs) if s is not None]

    def base(self, model: str) -> Scores | None:
        """Any finished cell of ``model`` (they share the base model's scores)."""
        refs = [r for e in self.plan.entries if e.model == model for r in e.refs]
        return next((s for r in refs for s in self.runs((r,))), None)

    def stat(self, kind: str, refs: tuple[CellRef, ...], fn: Callable[[list[Scores]], tuple], **extra: Any
             ) -> Stat | None:
        runs = self.runs(refs)
        if not runs:
            return None
        value, low, high, per_seed = fn(runs)
        return {"kind": kind, "value": value, "low": low, "high": high, "seeds": len(runs),
                "planned": len(refs), "per_seed": per_seed, **extra}

    def win(self, refs: tuple[CellRef, ...], name: str, **extra: Any) -> Stat | None:
        sign = self.sign.get(name, 1.0)

        def fn(runs: list[Scores]) -> tuple:
            t, b = sign * pool(runs).tuned[name], sign * pool(runs).base[name]
            low, high = stats.bootstrap_ci(t, b, self.n_boot, self.seed, LEVEL)
            return (stats.win_rate(t, b), low, high,
                    [stats.win_rate(sign * r.tuned[name], sign * r.base[name]) for r in runs])

        return self.stat("win", refs, fn, **extra)

    def score(self, refs: tuple[CellRef, ...], name: str, which: str = "tuned") -> Stat | None:
        def fn(runs: list[Scores]) -> tuple:
            return (*stats.mean_and_ci(getattr(pool(runs), which)[name], self.n_boot, self.seed, LEVEL),
                    [float(getattr(r, which)[name].mean()) for r in runs])

        return self.stat("score", refs, fn)

    def gold(self, refs: tuple[CellRef, ...], which: str = "tuned") -> Stat | None:
        def fn(runs: list[Scores]) -> tuple:
            p = pool(runs)
            value, boot = stratified_means(getattr(p, which)[GOLD], p.categories, self.n_boot, self.seed)
            per_seed = [stratified_means(getattr(r, which)[GOLD], r.categories, 1, 0)[0] for r in runs]
            return (value, *interval(boot), per_seed)

        runs = self.runs(refs)
        return self.stat("gold", refs, fn) if runs and GOLD in runs[0].tuned else None

    def diff(self, a: tuple[CellRef, ...], b: tuple[CellRef, ...], name: str) -> Stat | None:
        """A − B of the win-rate on reward ``name`` (or of gold accuracy: name "gold"), paired by prompt."""
        ra, rb = self.runs(a), self.runs(b)
        if not ra or not rb or (name == GOLD and GOLD not in ra[0].tuned):
            return None
        pa, pb = pool(ra), pool(rb)
        if name == GOLD:
            ma, counts = stats.per_prompt_means(pa.tuned[GOLD])
            mb = stats.per_prompt_means(pb.tuned[GOLD])[0]
            value, boot = stratified_means(ma - mb, pa.categories, self.n_boot, self.seed, counts)
            return {"kind": "gold_diff", "value": value, "low": interval(boot)[0], "high": interval(boot)[1]}
        sign = self.sign.get(name, 1.0)
        wa, counts = stats.per_prompt_means(stats.wins(sign * pa.tuned[name], sign * pa.base[name]))
        wb = stats.per_prompt_means(stats.wins(sign * pb.tuned[name], sign * pb.base[name]))[0]
        d = 100 * (wa - wb)
        low, high = interval(stats.bootstrap_means(d, self.n_boot, self.seed, counts))
        value = d.mean() if counts is None else (counts * d).sum() / counts.sum()
        return {"kind": "diff", "value": float(value), "low": low, "high": high}


OBJECTIVE_LABELS = {"dpo": "DPO", "ipo": "IPO", "capo": "CaPO"}
Table = dict[str, Any]  # {"columns": [str], "rows": [[str | Stat | None]]}


def _obj(name: str) -> str:
    return OBJECTIVE_LABELS.get(name, name)


def table1(ctx: Context, model: str) -> Table:
    """Rows objective x trained reward; win-rate on every reward (the trained one highlighted)."""
    rows = [[_obj(e.row), e.column, *[ctx.win(e.refs, r, highlight=r == e.column) for r in ctx.rewards],
             ctx.gold(e.refs)] for e in ctx.plan.entries_of("table1", model)]
    return {"columns": ["Objective", "Trained on", *[f"{r} win (%)" for r in ctx.rewards], "Gold acc."],
            "rows": rows}


def _base_row(ctx: Context, model: str, first: list[str], win_column: bool) -> list[Any]:
    refs = next(((r,) for e in ctx.plan.entries if e.model == model for r in e.refs if ctx.runs((r,))), ())
    cells = [[None, ctx.score(refs, r, "base")] if win_column else [ctx.score(refs, r, "base")]
             for r in ctx.rewards]
    return [*first, *[c for pair in cells for c in pair], ctx.gold(refs, "base") if refs else None]


def table2(ctx: Context, model: str) -> Table:
    """Rows objective x {SUM, SOUP, FRS} (and the base model); win-rate and mean score per reward."""
    rows = [_base_row(ctx, model, ["base", "-"], True)]
    for e in ctx.plan.entries_of("table2", model):
        stats_ = [s for r in ctx.rewards for s in (ctx.win(e.refs, r), ctx.score(e.refs, r))]
        rows.append([_obj(e.row), e.column, *stats_, ctx.gold(e.refs)])
    columns = [f"{r} {k}" for r in ctx.rewards for k in ("win (%)", "score")]
    return {"columns": ["Objective", "Method", *columns, "Gold acc."], "rows": rows}


def table5(ctx: Context, model: str) -> Table:
    """Rows loss weighting (CaPO + FRS); win-rate per reward and gold accuracy."""
    rows = [[e.row, *[ctx.win(e.refs, r) for r in ctx.rewards], ctx.gold(e.refs)]
            for e in ctx.plan.entries_of("table5", model)]
    return {"columns": ["Weighting", *[f"{r} win (%)" for r in ctx.rewards], "Gold acc."], "rows": rows}


def key_table(ctx: Context, model: str) -> Table:
    """The key cells (pooled over their training seeds), then A − B of the first against each other."""
    by_key = {(e.row, METHODS[e.column]): e for e in ctx.plan.entries_of("table2", model)}
    keys = [k for k in (parse_key_cell(c) for c in ctx.settings["key_cells"]) if k in by_key]
    name = lambda k: f"{_obj(k[0])} / {next(m for m, r in METHODS.items() if r == k[1])}"  # noqa: E731
    rows = [[name(k), *[ctx.win(by_key[k].refs, r) for r in ctx.rewards], ctx.gold(by_key[k].refs)]
            for k in keys]
    for other in keys[1:]:
        a, b = by_key[keys[0]].refs, by_key[other].refs
        rows.append([f"{name(keys[0])} − {name(other)}", *[ctx.diff(a, b, r) for r in ctx.rewards],
                     ctx.diff(a, b, GOLD)])
    return {"columns": ["Cell", *[f"{r} win (%)" for r in ctx.rewards], "Gold acc."], "rows": rows}


def overopt_table(ctx: Context, model: str) -> Table:
    """Rows training step (0 = the base model); per objective gold accuracy and trained-reward win-rate."""
    entries = ctx.plan.entries_of("overopt", model)
    reward = ctx.settings["overopt_reward"]
    objectives = list(dict.fromkeys(e.column for e in entries))
    cell = {(e.row, e.column): e for e in entries}
    base = next(iter(entries)).refs if entries else ()
    tie = {"kind": "win", "value": 50.0, "low": 50.0, "high": 50.0, "seeds": 1, "planned": 1,
           "per_seed": [50.0]}
    rows = [["0 (base)", *[s for _ in objectives for s in (ctx.gold(base, "base"), tie)]]]
    for step in sorted({int(e.row) for e in entries}):
        refs = [cell[(str(step), o)].refs for o in objectives]
        rows.append([str(step), *[s for r in refs for s in (ctx.gold(r), ctx.win(r, reward))]])
    columns = [f"{_obj(o)} {c}" for o in objectives for c in ("gold acc.", f"{reward} win (%)")]
    return {"columns": ["Step", *columns], "rows": rows}


#: table name -> (title, builder, table of the plan it needs)
TABLES: dict[str, tuple[str, Callable[[Context, str], Table], str]] = {
    "table1": ("Table 1: single reward. Win-rate (%) over the base model on every reward; the reward "
               "trained on is in bold", table1, "table1"),
    "table2": ("Table 2: multi-reward. Win-rate (%) and mean raw score per reward, gold accuracy",
               table2, "table2"),
    "key": ("Key comparison: win-rate (%) pooled over training seeds (per-seed values in JSON); "
            "differences A − B paired by prompt", key_table, "table2"),
    "table5": ("Table 5: loss weighting, CaPO + FRS", table5, "table5"),
    "overopt": ("Reward over-optimisation: gold accuracy (never trained on) and win-rate on the trained "
                "learned reward, along training steps", overopt_table, "overopt"),
}


def fmt(stat: Stat | str | None) -> str:
    """One Markdown cell: a label, "n/a", or "58.1 [54.2, 61.9]" (+ seeds done if fewer than planned)."""
    if stat is None or isinstance(stat, str):
        return "n/a" if stat is None else stat
    f = FORMATS[stat["kind"]]
    text = f"{f.format(stat['value'])} [{f.format(stat['low'])}, {f.format(stat['high'])}]"
    if stat.get("seeds", 1) < stat.get("planned", 1):
        text += f" ({stat['seeds']}/{stat['planned']} seeds)"
    return f"**{text}**" if stat.get("highlight") else text


def to_markdown(title: str, model: str, table: Table) -> str:
    lines = [f"### {title} — base model `{model}`", "", "| " + " | ".join(table["columns"]) + " |",
             "|" + "---|" * len(table["columns"])]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in table["rows"]]
    return "\n".join(lines) + "\n"


def load_context(layout: Layout) -> Context:
    """The tables' context from experiment.yaml, plan.json and the base evaluations' metadata."""
    resolved = yaml.safe_load(layout.config_path.read_text())
    settings, evaluate = resolved["experiment"], resolved["stages"]["evaluate"]
    sign: dict[str, float] = {}
    for model in settings["models"]:
        meta = layout.base_eval(model) / "meta.json"
        if meta.is_file():
            up = json.loads(meta.read_text())["higher_is_better"]
            sign |= {n: 1.0 if higher else -1.0 for n, higher in up.items()}
    return Context(layout, layout.load_plan(), list(settings["rewards"]), sign, int(evaluate["n_boot"]),
                   int(evaluate["seed"]), settings)


def build_tables(layout: Layout) -> dict[str, Any]:
    """tables.json content: name -> {"title", "models": {model: Table}} for the tables of the plan."""
    ctx = load_context(layout)
    out: dict[str, Any] = {}
    for name, (title, builder, needs) in TABLES.items():
        models = [m for m in ctx.settings["models"] if ctx.plan.entries_of(needs, m)]
        if models and (name != "key" or ctx.settings["key_cells"]):
            out[name] = {"title": title, "models": {m: builder(ctx, m) for m in models}}
    return out


NOTE = ("Every cell: value [95% interval]. Win-rate and score intervals: percentile bootstrap over "
        "held-out prompts, training seeds pooled per prompt; gold accuracy: mean over categories, "
        "bootstrap stratified by category. n/a: cell not evaluated yet.")


def write_tables(layout: Layout) -> str:
    """Write tables/tables.json, tables.md and NAME.json / NAME.md; returns tables.md's text."""
    tables = build_tables(layout)
    parts = [NOTE, ""]
    for name, t in tables.items():
        md = "\n".join(to_markdown(t["title"], m, table) for m, table in t["models"].items())
        write_text_atomic(md, layout.tables_dir / f"{name}.md")
        write_text_atomic(json.dumps(t, indent=1) + "\n", layout.tables_dir / f"{name}.json")
        parts.append(md)
    text = "\n".join(parts)
    write_text_atomic(text, layout.tables_dir / "tables.md")
    write_text_atomic(json.dumps({"note": NOTE, "tables": tables}, indent=1) + "\n",
                      layout.tables_dir / "tables.json")
    return text
