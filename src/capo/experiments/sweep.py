"""``capo sweep CONFIG``: choose each objective's β (and learning rate) on the validation prompts.

A sweep is an experiment (``capo experiment``'s runner, shared data, resume) whose only table is
``sweep``: per base model, objective x β (x learning rate), pairs by ``sweep_rule`` (FRS), each
cell trained on the train prompts and evaluated on ``evaluate.prompts`` (the validation set;
the test set is refused). The criterion is declared in the config and written to
OUT/sweep/criterion.json BEFORE any cell runs; a rerun with another criterion is an error. Per
(model, objective) the grid point with the highest criterion is chosen (ties: the smaller
divergence from the base, then grid order). Gold accuracy is reported for reading only and never
enters the choice.

Divergence from the base: the mean squared difference of base and tuned images (pixels in [0, 1])
sampled from the same initial noise, mean over the evaluated images (category-balanced when the
evaluation is) -- how far the objective moved the model, so objectives that move it by different
amounts can be compared on a reward-divergence frontier.

Outputs (OUT/sweep/): criterion.json, sweep.md, sweep.json, chosen.yaml (``hyper:`` for
``capo experiment --set`` or a config), frontier-MODEL.png (win-rate per reward and gold against
divergence, one line per objective, the chosen point starred).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

from capo.errors import CapoError
from capo.experiments.evaluation import IMAGES, decode_png
from capo.experiments.matrix import CellRef, ExperimentConfig, Layout, Plan
from capo.experiments.runner import add_matrix_arguments, config_path, resolve_stages, run_experiment
from capo.pipeline.evaluation import image_msd as msd_of
from capo.pipeline.rundir import write_text_atomic

Stat = dict[str, Any]
#: criterion -> its value from the validation win-rate stats of the trained rewards
CRITERIA: dict[str, Callable[[list[Stat]], float]] = {
    "mean_win": lambda wins: float(np.mean([w["value"] for w in wins])),
    "min_win": lambda wins: float(np.min([w["value"] for w in wins])),
    "mean_low": lambda wins: float(np.mean([w["low"] for w in wins])),
}
#: prompt sets a sweep must not choose on
TEST_SETS = ("shapes:test", "shapes:heldout")


def image_msd(eval_dir: Path) -> float:
    """Mean over evaluated images of their divergence from the base (``evaluation.image_msd``):
    results.json's ``divergence``, or (evaluations written before it was recorded) recomputed from
    images.parquet (base and tuned share each initial noise)."""
    path = eval_dir / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if "divergence" in results:
        return float(results["divergence"])
    table = pq.read_table(eval_dir / IMAGES, columns=["base", "tuned"]).to_pydict()
    base, tuned = ([decode_png(x) for x in table[g]] for g in ("base", "tuned"))
    return float(np.mean(msd_of(base, tuned)))


def divergence(layout: Layout, plan: Plan, refs: tuple[CellRef, ...]) -> float | None:
    """image_msd averaged over the finished training seeds of an entry (None: none finished)."""
    dirs = [layout.ref(plan, r) / "eval" for r in refs]
    values = [image_msd(d) for d in dirs if (d / IMAGES).is_file()]
    return float(np.mean(values)) if values else None


def declare(layout: Layout, cfg: ExperimentConfig) -> dict[str, Any]:
    """Write OUT/sweep/criterion.json before the run; a different criterion later is refused."""
    wanted = {"criterion": cfg.criterion, "rewards": list(cfg.rewards),
              "prompts": cfg.evaluate.get("prompts"),
              "images_per_category": cfg.evaluate.get("images_per_category"), "gold": "reading only",
              "ties": "smaller divergence, then grid order"}
    path = layout.root / "sweep" / "criterion.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != wanted:
            raise CapoError(f"this sweep was declared with {saved}; its criterion cannot change after the "
                            "run started (use a new --out)", path=str(path))
        return saved
    write_text_atomic(json.dumps(wanted, indent=1) + "\n", path)
    return wanted


def collect(layout: Layout) -> list[dict[str, Any]]:
    """One row per sweep entry: model, objective, beta, lr, win per reward, gold, divergence, criterion."""
    from capo.experiments.tables import load_context

    ctx = load_context(layout)
    criterion = CRITERIA[ctx.settings["criterion"]]
    rows = []
    for e in (e for e in ctx.plan.entries if e.table == "sweep"):
        cell = ctx.plan.cells[e.refs[0].cell]
        wins = {r: ctx.win(e.refs, r) for r in ctx.rewards}
        done = all(w is not None for w in wins.values())
        rows.append({"model": e.model, "objective": e.row, "beta": cell.beta, "lr": cell.lr,
                     "wins": wins, "gold": ctx.gold(e.refs), "gold_base": ctx.gold(e.refs, "base"),
                     "divergence": divergence(layout, ctx.plan, e.refs),
                     "criterion": criterion(list(wins.values())) if done else None})
    return rows


def choose(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, objective) -> its chosen row: highest criterion, then smaller divergence, then grid order."""
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for i, row in enumerate(rows):
        if row["criterion"] is None:
            continue
        key = (row["model"], row["objective"])
        rank = lambda r, j: (-r["criterion"], r["divergence"] or 0.0, j)  # noqa: E731
        if key not in chosen or rank(row, i) < rank(chosen[key], chosen[key]["_index"]):
            chosen[key] = {**row, "_index": i}
    return chosen


def chosen_yaml(chosen: dict[tuple[str, str], dict[str, Any]]) -> str:
    """``hyper: {MODEL: {OBJECTIVE: {beta[, learning_rate]}}}`` of the chosen rows (the learning
    rate only when the sweep varied it; otherwise the train section's stays)."""
    hyper: dict[str, dict[str, Any]] = {}
    for (model, objective), row in chosen.items():
        lr = {} if row["lr"] is None else {"learning_rate": row["lr"]}
        hyper.setdefault(model, {})[objective] = {"beta": row["beta"], **lr}
    return yaml.safe_dump({"hyper": hyper}, sort_keys=False)


def _fmt(stat: Stat | None, f: str = "{:.1f}") -> str:
    if stat is None:
        return "n/a"
    return f"{f.format(stat['value'])} [{f.format(stat['low'])}, {f.format(stat['high'])}]"


def markdown(rows: list[dict[str, Any]], chosen: dict, declared: dict[str, Any]) -> str:
    rewards = list(rows[0]["wins"]) if rows else []
    lines = [f"Sweep on `{declared['prompts']}`; criterion (declared before the run): "
             f"`{declared['criterion']}` over {', '.join(rewards)}; gold: reading only. "
             "Chosen rows are marked with *.", "",
             "| Model | Objective | β | lr | " + " | ".join(f"{r} win (%)" for r in rewards)
             + " | criterion | divergence (image MSD) | gold (base → tuned) |",
             "|" + "---|" * (7 + len(rewards))]
    for row in rows:
        mark = "*" if row.get("chosen") else ""
        crit = "n/a" if row["criterion"] is None else f"{row['criterion']:.1f}{mark}"
        div = "n/a" if row["divergence"] is None else f"{row['divergence']:.3g}"
        gold = (f"{row['gold_base']['value']:.3f} → {_fmt(row['gold'], '{:.3f}')}" if row["gold"] else "n/a")
        lines.append(f"| {row['model']} | {row['objective']} | {row['beta']:g} | "
                     f"{'train' if row['lr'] is None else format(row['lr'], 'g')} | "
                     + " | ".join(_fmt(row["wins"][r]) for r in rewards) + f" | {crit} | {div} | {gold} |")
    return "\n".join(lines) + "\n"


def write_sweep(layout: Layout) -> str:
    """OUT/sweep/: sweep.md, sweep.json, chosen.yaml, frontier-MODEL.png; returns sweep.md's text."""
    from capo.report.plots import frontier

    declared = json.loads((layout.root / "sweep" / "criterion.json").read_text())
    rows = collect(layout)
    chosen = choose(rows)
    picked = {c["_index"] for c in chosen.values()}
    rows = [{**r, "chosen": i in picked} for i, r in enumerate(rows)]
    out = layout.root / "sweep"
    text = markdown(rows, chosen, declared)
    write_text_atomic(text, out / "sweep.md")
    write_text_atomic(json.dumps({"declared": declared, "rows": rows}, indent=1) + "\n", out / "sweep.json")
    write_text_atomic(chosen_yaml(chosen), out / "chosen.yaml")
    for model in dict.fromkeys(r["model"] for r in rows):
        frontier([r for r in rows if r["model"] == model], out / f"frontier-{model}.png",
                 f"base model {model}, {declared['prompts']}: criterion {declared['criterion']}; "
                 "gold for reading only")
    return text


def sweep_command(args: argparse.Namespace) -> None:
    from capo.experiments.matrix import expand, load_experiment

    path = config_path(args.config)
    cfg = load_experiment(path, [*(args.set or []), "tables=[sweep]"], args.out)
    if not cfg.sweep_betas:
        raise CapoError("config key 'sweep_betas' is empty: nothing to sweep", path=path)
    if cfg.evaluate.get("prompts") in TEST_SETS:
        raise CapoError(f"evaluate.prompts is the test set '{cfg.evaluate['prompts']}': a sweep chooses on "
                        "validation prompts (e.g. shapes:val)", path=path)
    stages = resolve_stages(cfg, path)
    layout = Layout(Path(cfg.out))
    if args.dry_run:
        plan = expand(cfg, stages.train)
        print(f"{len(plan.cells)} sweep cells; criterion {cfg.criterion}; output {cfg.out}")
        for cell in plan.ordered():
            print(f"  {cell.key}  steps {cell.steps}")
        return
    declare(layout, cfg)
    if not args.tables_only:
        run_experiment(cfg, stages, args.only)
    print(write_sweep(layout), end="")
    print(f"[capo sweep] chosen values in {layout.root / 'sweep' / 'chosen.yaml'}")


def register(sub: Any) -> None:
    """``capo sweep CONFIG [--out DIR] [--set KEY=VALUE ...] [--only GLOB] [--dry-run] [--tables-only]``."""
    p = sub.add_parser("sweep", help="choose each objective's beta (and lr) on validation prompts",
                       description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1])
    add_matrix_arguments(
        p, config="experiment YAML file with sweep_betas, or the shipped one: sweep",
        out="sweep directory (default: the config's 'out')",
        example="--set 'sweep_betas={capo: [10, 100]}'", tables="only rewrite OUT/sweep/ from finished cells",
    )  # fmt: skip
    p.set_defaults(func=sweep_command)
